"""The few X.509 and EC-key operations the edge's identity needs, done by OpenSSL's libcrypto.

Why not the ``cryptography`` package: the edge ships as one binary with a 15 MB budget, and
cryptography's Rust bindings alone take about 5 MB of it compressed. The binary already holds
libcrypto (OpenSSL 3), because Python's ``ssl`` module links it; ``ssl`` just does not expose
keys, certificate requests or certificate fields. This module reaches that same library through
ctypes. It does no cryptography of its own: every key, signature, encoding and check is
OpenSSL's; the Python here only moves bytes in and out and frees what OpenSSL allocated.

What it offers: a P-256 key kept as PKCS#8 PEM (``generate_p256_key``, ``load_private_key``),
a signed certificate request (``make_csr``), the certificates in a PEM text with the fields the
edge reads (``read_certificates``), and two checks (``is_issued_by``, ``key_matches``). Any
failure raises ``OpenSSLError`` with what was being done and OpenSSL's own reasons.

Rules kept throughout: every function's ``argtypes`` and ``restype`` are set, pointers are
``c_void_p`` (a default ``int`` restype would truncate them); everything allocated is freed in a
``finally``; no variadic function is called (ctypes cannot pass their arguments portably); and
OpenSSL's per-thread error queue is cleared before each operation and drained after a failure,
so one call's errors never show up in the next.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# Imported for its side effect: _ssl loads libcrypto.so.3, which _libcrypto() then finds.
import ssl  # noqa: F401
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from ctypes import POINTER, byref, c_char_p, c_int, c_long, c_size_t, c_ulong, c_void_p
from dataclasses import dataclass, field
from typing import NoReturn

__all__ = [
    "Certificate",
    "OpenSSLError",
    "PrivateKey",
    "generate_p256_key",
    "is_issued_by",
    "key_matches",
    "load_private_key",
    "make_csr",
    "read_certificates",
    "version",
]

_MIN_VERSION = 0x3000_0000  # OpenSSL_version_num() of 3.0.0; EVP_PKEY_eq and friends are 3.x
_OPENSSL_VERSION = 0
_NID_COMMON_NAME = 13
# How PEM marks an encrypted key: PKCS#8's own label, or the traditional format's header.
_ENCRYPTED_PEM = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")
_NID_ORGANIZATION_NAME = 17
_NID_BASIC_CONSTRAINTS = 87
_MBSTRING_UTF8 = 0x1000
_BIO_CTRL_INFO = 3
_ERR_LIB_PEM = 9
_PEM_R_NO_START_LINE = 108
_ERR_SYSTEM_FLAG = 0x8000_0000
# RFC 2253 names (like ``openssl x509 -nameopt RFC2253,-esc_msb``): UTF-8 stays readable.
_XN_FLAG_RFC2253_UTF8 = 0x0111_0313
_INT_MAX = 2**31 - 1

_P = c_void_p
# name: (restype, argtypes), for every libcrypto function this module calls.
_SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "OpenSSL_version_num": (c_ulong, []),
    "OpenSSL_version": (c_char_p, [c_int]),
    "ERR_get_error": (c_ulong, []),
    "ERR_clear_error": (None, []),
    "ERR_error_string_n": (None, [c_ulong, c_char_p, c_size_t]),
    "CRYPTO_free": (None, [_P, c_char_p, c_int]),
    "BIO_new": (_P, [_P]),
    "BIO_s_mem": (_P, []),
    "BIO_new_mem_buf": (_P, [c_char_p, c_int]),
    "BIO_ctrl": (c_long, [_P, c_int, c_long, _P]),
    "BIO_free": (c_int, [_P]),
    "EVP_sha256": (_P, []),
    "EVP_PKEY_CTX_new_from_name": (_P, [_P, c_char_p, c_char_p]),
    "EVP_PKEY_CTX_free": (None, [_P]),
    "EVP_PKEY_keygen_init": (c_int, [_P]),
    "EVP_PKEY_CTX_set_group_name": (c_int, [_P, c_char_p]),
    "EVP_PKEY_generate": (c_int, [_P, POINTER(_P)]),
    "EVP_PKEY_eq": (c_int, [_P, _P]),
    "EVP_PKEY_free": (None, [_P]),
    "PEM_write_bio_PKCS8PrivateKey": (c_int, [_P, _P, _P, c_char_p, c_int, _P, _P]),
    "PEM_read_bio_PrivateKey": (_P, [_P, _P, _P, c_char_p]),
    "PEM_read_bio_X509": (_P, [_P, _P, _P, _P]),
    "PEM_write_bio_X509_REQ": (c_int, [_P, _P]),
    "d2i_X509": (_P, [_P, POINTER(_P), c_long]),
    "i2d_X509": (c_int, [_P, POINTER(_P)]),
    "X509_free": (None, [_P]),
    "X509_get_subject_name": (_P, [_P]),
    "X509_get_issuer_name": (_P, [_P]),
    "X509_get0_pubkey": (_P, [_P]),
    "X509_get_ext_d2i": (_P, [_P, c_int, POINTER(c_int), POINTER(c_int)]),
    "X509_verify": (c_int, [_P, _P]),
    "BASIC_CONSTRAINTS_free": (None, [_P]),
    "X509_NAME_new": (_P, []),
    "X509_NAME_free": (None, [_P]),
    "X509_NAME_add_entry_by_txt": (c_int, [_P, c_char_p, c_int, c_char_p, c_int, c_int, c_int]),
    "X509_NAME_get_index_by_NID": (c_int, [_P, c_int, c_int]),
    "X509_NAME_get_entry": (_P, [_P, c_int]),
    "X509_NAME_ENTRY_get_data": (_P, [_P]),
    "X509_NAME_cmp": (c_int, [_P, _P]),
    "X509_NAME_print_ex": (c_int, [_P, _P, c_int, c_ulong]),
    "ASN1_STRING_to_UTF8": (c_int, [POINTER(_P), _P]),
    "X509_REQ_new": (_P, []),
    "X509_REQ_free": (None, [_P]),
    "X509_REQ_set_version": (c_int, [_P, c_long]),
    "X509_REQ_set_subject_name": (c_int, [_P, _P]),
    "X509_REQ_set_pubkey": (c_int, [_P, _P]),
    "X509_REQ_sign": (c_int, [_P, _P, _P]),
}


class OpenSSLError(Exception):
    """libcrypto could not be used, or refused an operation; the message says which and why."""


@dataclass(frozen=True)
class PrivateKey:
    """A private key as unencrypted PKCS#8 PEM; its ``repr`` leaves the key out."""

    pem: bytes = field(repr=False)


@dataclass(frozen=True)
class Certificate:
    """One X.509 certificate and the fields of it that the edge reads."""

    der: bytes = field(repr=False)
    # RFC 2253, for messages.
    subject: str
    # Every common name in the subject, in order: a subject may hold none or several.
    common_names: tuple[str, ...]
    # Every organization (O) in the subject, in order.
    organizations: tuple[str, ...]
    # The BasicConstraints extension's CA flag; False when the extension is absent.
    is_ca: bool


@functools.cache
def _libcrypto() -> ctypes.CDLL:
    # _ssl has already loaded libcrypto.so.3, from the system in a venv or from the unpacked
    # binary in a Nuitka build; dlopen by soname hands back that very library, so the ssl
    # module and this one share one OpenSSL.
    try:
        lib = ctypes.CDLL("libcrypto.so.3")
    except OSError:
        found = ctypes.util.find_library("crypto")
        if found is None:
            raise OpenSSLError(
                "cannot find OpenSSL's libcrypto (neither libcrypto.so.3 nor any libcrypto)"
            ) from None
        try:
            lib = ctypes.CDLL(found)
        except OSError as exc:
            raise OpenSSLError(f"cannot load OpenSSL's libcrypto {found}: {exc}") from exc
    try:
        version_num = lib.OpenSSL_version_num
    except AttributeError:
        raise OpenSSLError(f"{lib._name} is not an OpenSSL 1.1 or later libcrypto") from None
    version_num.restype = c_ulong
    version_num.argtypes = []
    version = version_num()
    if version < _MIN_VERSION:
        raise OpenSSLError(
            f"{lib._name} is OpenSSL {version >> 28}.{(version >> 20) & 0xFF}; 3.0 or later"
            " is needed"
        )
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            function = getattr(lib, name)
        except AttributeError:
            raise OpenSSLError(f"{lib._name} lacks {name}") from None
        function.restype = restype
        function.argtypes = argtypes
    return lib


def version() -> str:
    """The version of the OpenSSL in use, as ``ssl.OPENSSL_VERSION`` puts it."""
    return _libcrypto().OpenSSL_version(_OPENSSL_VERSION).decode("ascii", "replace")


def _error_codes() -> list[int]:
    lib = _libcrypto()
    codes = []
    while code := lib.ERR_get_error():
        codes.append(code)
    return codes


def _describe(codes: list[int]) -> str:
    lib = _libcrypto()
    reasons: list[str] = []
    for code in codes:
        text = ctypes.create_string_buffer(256)
        lib.ERR_error_string_n(code, text, len(text))
        reason = text.value.decode("utf-8", "replace")
        # Nested ASN.1 structures repeat one reason per level, which says nothing more.
        if not reasons or reasons[-1] != reason:
            reasons.append(reason)
    return "; ".join(reasons) or "OpenSSL gave no reason"


def _fail(doing: str) -> NoReturn:
    raise OpenSSLError(f"{doing}: {_describe(_error_codes())}")


@contextmanager
def _owned(pointer: int | None, free: Callable[[int], object], doing: str) -> Iterator[int]:
    """``pointer``, freed on leaving; a NULL one is OpenSSL's failure at ``doing``."""
    if not pointer:
        _fail(doing)
    try:
        yield pointer
    finally:
        free(pointer)


def _reading_bio(data: bytes) -> AbstractContextManager[int]:
    if len(data) > _INT_MAX:
        raise OpenSSLError(f"{len(data)} bytes are too many for OpenSSL to read at once")
    lib = _libcrypto()
    # The BIO reads ``data`` in place; ``data`` outlives it, as the caller holds it.
    return _owned(lib.BIO_new_mem_buf(data, len(data)), lib.BIO_free, "making a memory BIO")


@contextmanager
def _writing_bio() -> Iterator[int]:
    lib = _libcrypto()
    with _owned(lib.BIO_new(lib.BIO_s_mem()), lib.BIO_free, "making a memory BIO") as bio:
        yield bio


def _bio_contents(bio: int) -> bytes:
    data = c_void_p()
    length = _libcrypto().BIO_ctrl(bio, _BIO_CTRL_INFO, 0, ctypes.addressof(data))
    if length <= 0 or not data.value:
        return b""
    return ctypes.string_at(data.value, length)


def _start() -> ctypes.CDLL:
    """libcrypto, with this thread's error queue empty, for an operation to begin."""
    lib = _libcrypto()
    lib.ERR_clear_error()
    return lib


@contextmanager
def _key(key: PrivateKey) -> Iterator[int]:
    lib = _libcrypto()
    # Refused before OpenSSL tries it: decrypting with a wrong passphrase fails with "bad
    # decrypt" only most of the time, and otherwise (one time in 256 or so, when the padding
    # happens to check out) with an ASN.1 error that says nothing of encryption.
    if any(marker in key.pem for marker in _ENCRYPTED_PEM):
        raise OpenSSLError(
            "reading a PEM private key: the key is encrypted; Outpost reads unencrypted keys only"
        )
    # A non-NULL passphrase stops OpenSSL from ever prompting on the terminal.
    with (
        _reading_bio(key.pem) as bio,
        _owned(
            lib.PEM_read_bio_PrivateKey(bio, None, None, b""),
            lib.EVP_PKEY_free,
            "reading a PEM private key",
        ) as pkey,
    ):
        yield pkey


@contextmanager
def _x509(cert: Certificate) -> Iterator[int]:
    lib = _libcrypto()
    buffer = ctypes.create_string_buffer(cert.der, len(cert.der))
    cursor = c_void_p(ctypes.addressof(buffer))
    with _owned(
        lib.d2i_X509(None, byref(cursor), len(cert.der)), lib.X509_free, "decoding a certificate"
    ) as x509:
        yield x509


def _pkcs8_pem(pkey: int) -> bytes:
    lib = _libcrypto()
    with _writing_bio() as bio:
        if lib.PEM_write_bio_PKCS8PrivateKey(bio, pkey, None, None, 0, None, None) != 1:
            _fail("writing the key as PKCS#8 PEM")
        return _bio_contents(bio)


def generate_p256_key() -> PrivateKey:
    """A new EC key on the P-256 curve."""
    lib = _start()
    with _owned(
        lib.EVP_PKEY_CTX_new_from_name(None, b"EC", None),
        lib.EVP_PKEY_CTX_free,
        "preparing EC key generation",
    ) as ctx:
        if lib.EVP_PKEY_keygen_init(ctx) != 1:
            _fail("preparing EC key generation")
        if lib.EVP_PKEY_CTX_set_group_name(ctx, b"P-256") != 1:
            _fail("choosing the P-256 curve")
        pkey = c_void_p()
        if lib.EVP_PKEY_generate(ctx, byref(pkey)) != 1:
            _fail("generating a P-256 key")
        with _owned(pkey.value, lib.EVP_PKEY_free, "generating a P-256 key") as generated:
            return PrivateKey(_pkcs8_pem(generated))


def load_private_key(pem: bytes) -> PrivateKey:
    """The unencrypted private key in ``pem`` (PKCS#8 or a traditional format), as PKCS#8."""
    _start()
    with _key(PrivateKey(pem)) as pkey:
        return PrivateKey(_pkcs8_pem(pkey))


def make_csr(key: PrivateKey, common_name: str) -> bytes:
    """A PEM certificate signing request whose subject is only CN=``common_name``, carrying
    ``key``'s public key and signed by it with SHA-256."""
    lib = _start()
    encoded = common_name.encode("utf-8")
    with (
        _key(key) as pkey,
        _owned(lib.X509_REQ_new(), lib.X509_REQ_free, "making a CSR") as req,
        _owned(lib.X509_NAME_new(), lib.X509_NAME_free, "making a CSR's subject") as name,
    ):
        # Version 1, the only one, is encoded as 0.
        if lib.X509_REQ_set_version(req, 0) != 1:
            _fail("setting the CSR's version")
        if (
            lib.X509_NAME_add_entry_by_txt(
                name, b"CN", _MBSTRING_UTF8, encoded, len(encoded), -1, 0
            )
            != 1
        ):
            _fail(f"setting the CSR's common name to {common_name!r}")
        if lib.X509_REQ_set_subject_name(req, name) != 1:
            _fail("setting the CSR's subject")
        if lib.X509_REQ_set_pubkey(req, pkey) != 1:
            _fail("putting the public key in the CSR")
        # X509_REQ_sign returns the signature's length, 0 on failure.
        if lib.X509_REQ_sign(req, pkey, lib.EVP_sha256()) <= 0:
            _fail("signing the CSR")
        with _writing_bio() as bio:
            if lib.PEM_write_bio_X509_REQ(bio, req) != 1:
                _fail("writing the CSR as PEM")
            return _bio_contents(bio)


def _name_text(name: int) -> str:
    with _writing_bio() as bio:
        if _libcrypto().X509_NAME_print_ex(bio, name, 0, _XN_FLAG_RFC2253_UTF8) < 0:
            _fail("printing a certificate's subject")
        return _bio_contents(bio).decode("utf-8", "replace")


def _name_entries(name: int, nid: int, what: str) -> tuple[str, ...]:
    """Every entry of the name with ``nid``, in order, as text."""
    lib = _libcrypto()
    names = []
    index = -1
    while (index := lib.X509_NAME_get_index_by_NID(name, nid, index)) >= 0:
        data = lib.X509_NAME_ENTRY_get_data(lib.X509_NAME_get_entry(name, index))
        utf8 = c_void_p()
        length = lib.ASN1_STRING_to_UTF8(byref(utf8), data)
        if length < 0:
            _fail(f"converting a certificate's {what} to UTF-8")
        try:
            raw = ctypes.string_at(utf8.value, length) if length else b""
        finally:
            lib.CRYPTO_free(utf8, None, 0)
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise OpenSSLError(f"a certificate's {what} is not UTF-8: {exc}") from exc
    return tuple(names)


def _is_ca(x509: int) -> bool:
    lib = _libcrypto()
    critical = c_int()
    constraints = lib.X509_get_ext_d2i(x509, _NID_BASIC_CONSTRAINTS, byref(critical), None)
    if not constraints:
        # X509_get_ext_d2i reports through ``critical``: -1 absent, -2 present more than once,
        # otherwise present but undecodable.
        if critical.value == -1:
            return False
        if critical.value == -2:
            raise OpenSSLError("the certificate has more than one BasicConstraints extension")
        _fail("decoding the certificate's BasicConstraints extension")
    try:
        # The struct's first field is ``int ca``.
        return c_int.from_address(constraints).value != 0
    finally:
        lib.BASIC_CONSTRAINTS_free(constraints)


def _der(x509: int) -> bytes:
    lib = _libcrypto()
    length = lib.i2d_X509(x509, None)
    if length <= 0:
        _fail("encoding a certificate as DER")
    buffer = ctypes.create_string_buffer(length)
    cursor = c_void_p(ctypes.addressof(buffer))
    if lib.i2d_X509(x509, byref(cursor)) != length:
        _fail("encoding a certificate as DER")
    return buffer.raw


def _certificate(x509: int) -> Certificate:
    subject = _libcrypto().X509_get_subject_name(x509)
    return Certificate(
        der=_der(x509),
        subject=_name_text(subject),
        common_names=_name_entries(subject, _NID_COMMON_NAME, "common name"),
        organizations=_name_entries(subject, _NID_ORGANIZATION_NAME, "organization"),
        is_ca=_is_ca(x509),
    )


def _is_end_of_pem(codes: list[int]) -> bool:
    """Whether these errors from a PEM read only say that no further PEM block was found."""
    if len(codes) != 1 or codes[0] & _ERR_SYSTEM_FLAG:
        return False
    # ERR_GET_LIB and ERR_GET_REASON are inline functions in OpenSSL 3, so not exported.
    library, reason = (codes[0] >> 23) & 0xFF, codes[0] & 0x7F_FFFF
    return library == _ERR_LIB_PEM and reason == _PEM_R_NO_START_LINE


def read_certificates(pem: bytes) -> list[Certificate]:
    """Every certificate in the PEM text ``pem``, in order; an empty list if it holds none.

    Text outside PEM blocks, and PEM blocks of other kinds, are skipped; a certificate block
    that does not decode raises OpenSSLError.
    """
    lib = _start()
    certificates = []
    with _reading_bio(pem) as bio:
        while x509 := lib.PEM_read_bio_X509(bio, None, None, None):
            with _owned(x509, lib.X509_free, "reading a PEM certificate"):
                certificates.append(_certificate(x509))
        codes = _error_codes()
    if not _is_end_of_pem(codes):
        raise OpenSSLError(f"reading PEM certificate {len(certificates) + 1}: {_describe(codes)}")
    return certificates


def is_issued_by(cert: Certificate, issuer: Certificate) -> bool:
    """Whether ``issuer`` directly issued ``cert``: ``cert`` names ``issuer``'s subject as its
    issuer, and its signature verifies with ``issuer``'s public key."""
    lib = _start()
    with _x509(cert) as child, _x509(issuer) as parent:
        if lib.X509_NAME_cmp(lib.X509_get_issuer_name(child), lib.X509_get_subject_name(parent)):
            return False
        # Borrowed from ``parent``: not to be freed.
        public_key = lib.X509_get0_pubkey(parent)
        if not public_key:
            _fail("reading the issuer's public key")
        verified = lib.X509_verify(child, public_key) == 1
    # A signature that does not verify leaves reasons in the queue; the answer is False.
    lib.ERR_clear_error()
    return verified


def key_matches(cert: Certificate, key: PrivateKey) -> bool:
    """Whether ``cert`` carries the public half of ``key``."""
    lib = _start()
    with _x509(cert) as x509, _key(key) as pkey:
        public_key = lib.X509_get0_pubkey(x509)
        if not public_key:
            _fail("reading the certificate's public key")
        # 1 equal; 0 different; -1 or -2 keys of different kinds, which do not match either.
        matches = lib.EVP_PKEY_eq(public_key, pkey) == 1
    lib.ERR_clear_error()
    return matches
