"""The OCI distribution API client: manifests and blobs from one repository of one registry.

- **Auth.** Anonymous first; on 401 the registry's challenge decides: ``Basic`` sends the
  credentials, ``Bearer`` fetches a token from the challenge's realm (with the credentials, or
  anonymously) and sends it. The token is kept for the following requests and fetched again
  when the registry rejects it.
- **Verification.** Every manifest and blob is checked against its digest and size while it
  streams in (``edge.images.digest``); a mismatch deletes what was received.
- **Resume.** A blob is appended to a partial file; after a broken connection the next attempt
  asks for the rest with ``Range`` and keeps hashing where it stopped. A registry that ignores
  the range gets the whole blob again.
- **Retries.** Connection failures, timeouts, 429 and 5xx answers are retried with exponential
  backoff and full jitter (``edge.backoff``, honouring ``Retry-After``) up to
  ``RetryPolicy.attempts``; then ``RegistryUnavailableError``. Answers that would not change
  on a retry (401, 403, 404, a digest mismatch) fail at once.

Plain HTTP is used for loopback registries and for hosts listed in ``plain_http``; everything
else is HTTPS, verified against ``ssl_context`` (default: the system's trust store).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection
from types import TracebackType
from typing import Protocol, TypeVar

import httpx2
import tenacity
import trio

from edge.images.auth import (
    Credentials,
    basic_header,
    parse_challenges,
    parse_token_response,
    token_params,
)
from edge.images.digest import Verifier, digest_hex, sha256_digest, verify_bytes
from edge.images.errors import (
    AuthenticationError,
    DigestMismatchError,
    ImageNotFoundError,
    PullError,
    RegistryUnavailableError,
)
from edge.images.manifest import ACCEPT, MAX_MANIFEST_BYTES, Descriptor
from edge.images.policy import DEFAULT_RETRY, RetryPolicy
from edge.images.reference import Reference

log = logging.getLogger(__name__)
T = TypeVar("T")

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_MAX_ERROR_BODY = 16 * 1024
_HASH_CHUNK = 1024 * 1024


class PartialFile(Protocol):
    """A trio file (``trio.open_file(path, "a+b")``) holding a partial download."""

    async def read(self, size: int = -1, /) -> bytes: ...
    async def write(self, data: bytes, /) -> int: ...
    async def seek(self, offset: int, whence: int = 0, /) -> int: ...
    async def truncate(self, size: int | None = None, /) -> int: ...


class _RetryableStatus(Exception):
    """A 429 or 5xx answer: the registry is there but cannot serve now."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, httpx2.TransportError | _RetryableStatus)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (``name[:port]``, ``[v6]:port``) is this machine."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


async def _error_detail(response: httpx2.Response) -> str:
    """The registry's own words about an error (``{"errors": [{"code", "message"}]}``)."""
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > _MAX_ERROR_BODY:
            break
    try:
        errors = json.loads(body).get("errors") or []
        words = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors]
    except (ValueError, AttributeError):
        return ""
    return f" ({'; '.join(w for w in words if w)})" if any(words) else ""


class _RegistryAuth(httpx2.Auth):
    """The challenge-response exchange of the distribution spec, as an httpx2 auth flow."""

    def __init__(self, registry: str, repository: str, credentials: Credentials | None) -> None:
        self.registry = registry
        self.repository = repository
        self.credentials = credentials
        self.header: str | None = None

    async def async_auth_flow(
        self, request: httpx2.Request
    ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        if self.header is not None:
            request.headers["Authorization"] = self.header
        response = yield request
        if response.status_code != 401:
            return
        challenges = parse_challenges(response.headers.get("www-authenticate", ""))
        bearer = next((c for c in challenges if c.scheme == "bearer" and "realm" in c.params), None)
        if bearer is not None:
            token_request = httpx2.Request(
                "GET", bearer.params["realm"], params=token_params(bearer, self.repository)
            )
            if self.credentials is not None:
                token_request.headers["Authorization"] = basic_header(self.credentials)
            token_response = yield token_request
            await token_response.aread()
            self.header = f"Bearer {self._token(token_response)}"
        elif self.credentials is not None and any(c.scheme == "basic" for c in challenges):
            self.header = basic_header(self.credentials)
        else:
            return
        request.headers["Authorization"] = self.header
        yield request

    def _token(self, response: httpx2.Response) -> str:
        where = (
            f"the token service of {self.registry} ({response.request.url.copy_with(query=None)})"
        )
        if response.status_code in (401, 403):
            who = f"user {self.credentials.username!r}" if self.credentials else "anonymous access"
            raise AuthenticationError(
                f"{where} refused {who} for {self.repository} (HTTP {response.status_code});"
                " check the image pull secret"
            )
        if response.status_code == 429 or response.status_code >= 500:
            raise _RetryableStatus(f"{where} answered HTTP {response.status_code}", None)
        if response.status_code != 200:
            raise PullError(f"{where} answered HTTP {response.status_code}")
        try:
            return parse_token_response(response.content)
        except ValueError as exc:
            raise PullError(f"{where}: {exc}") from exc


class RegistryClient:
    """A session with one repository (``Reference.name``) of one registry; use ``async with``."""

    def __init__(
        self,
        reference: Reference,
        *,
        credentials: Credentials | None = None,
        plain_http: Collection[str] = (),
        ssl_context: ssl.SSLContext | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        self.reference = reference
        self.retry = retry
        host = reference.api_host
        scheme = "http" if host in plain_http or is_loopback(host) else "https"
        self._base = f"{scheme}://{host}/v2/{reference.repository}"
        self._client = httpx2.AsyncClient(
            auth=_RegistryAuth(reference.registry, reference.repository, credentials),
            verify=ssl_context or ssl.create_default_context(),
            timeout=httpx2.Timeout(retry.timeout_s),
            follow_redirects=True,
            trust_env=False,
            headers={"Accept-Encoding": "identity"},
        )

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.aclose()

    # -- requests and retries --------------------------------------------------------------------

    def _wait(self, state: tenacity.RetryCallState) -> float:
        # Full jitter, so that gateways cut off together do not all retry together.
        delay = self.retry.backoff.delay(state.attempt_number)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _RetryableStatus) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self.retry.max_s))
        return delay

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "registry request failed; retrying",
            extra={
                "registry": self.reference.registry,
                "attempt": state.attempt_number,
                "of": self.retry.attempts,
                "error": exc,
            },
        )

    async def _retrying(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.retry.attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception(_transient),
            sleep=trio.sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            return await retrying(operation)
        except (httpx2.TransportError, _RetryableStatus) as exc:
            detail = str(exc) or type(exc).__name__
            raise RegistryUnavailableError(
                f"{self.reference.registry} is unavailable: {what} failed {self.retry.attempts}"
                f" times, last with: {detail}",
                registry=self.reference.registry,
                attempts=self.retry.attempts,
            ) from exc
        except httpx2.HTTPError as exc:
            # Not a passing fault (too many redirects, an invalid URL in a challenge): say so.
            raise PullError(f"{self.reference.registry}: {what}: {exc}") from exc

    async def _check(self, response: httpx2.Response, what: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        detail = await _error_detail(response)
        where = f"{self.reference.registry}: {what}"
        if status in (401, 403):
            raise AuthenticationError(
                f"{where}: access denied (HTTP {status}){detail}; give credentials for"
                f" {self.reference.registry} (an image pull secret) or check them"
            )
        if status == 404:
            raise ImageNotFoundError(f"{where}: not found{detail}")
        if status == 429 or status >= 500:
            retry_after = response.headers.get("retry-after", "")
            raise _RetryableStatus(
                f"{where}: HTTP {status}{detail}",
                float(retry_after) if retry_after.isdigit() else None,
            )
        raise PullError(f"{where}: unexpected HTTP {status}{detail}")

    @contextlib.asynccontextmanager
    async def _get(
        self, path: str, headers: dict[str, str] | None = None
    ) -> AsyncGenerator[httpx2.Response, None]:
        async with self._client.stream("GET", f"{self._base}/{path}", headers=headers) as response:
            yield response

    # -- manifests -------------------------------------------------------------------------------

    async def get_manifest(self, target: str, size: int | None = None) -> tuple[bytes, str, str]:
        """``(body, content type, digest)`` of the manifest or index for a tag or digest,
        verified: against ``target`` when it is a digest, else against the registry's
        ``Docker-Content-Digest`` header when it sends one."""
        what = f"manifest {self.reference.repository}:{target}"

        async def attempt() -> tuple[bytes, str, str | None]:
            async with self._get(f"manifests/{target}", {"Accept": ACCEPT}) as response:
                await self._check(response, what)
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_MANIFEST_BYTES:
                        raise PullError(f"{what} is larger than {MAX_MANIFEST_BYTES} bytes")
                ctype = response.headers.get("content-type", "")
                return body, ctype, response.headers.get("docker-content-digest")

        body, content_type, header_digest = await self._retrying(what, attempt)
        expected = target if target.startswith("sha256:") else header_digest
        if expected is not None and not expected.startswith("sha256:"):
            # Another algorithm in the header: the content is still checked against ours.
            expected = None
        verify_bytes(body, expected or sha256_digest(body), size, what=what)
        return body, content_type, expected or sha256_digest(body)

    # -- blobs -----------------------------------------------------------------------------------

    async def fetch_blob(
        self,
        descriptor: Descriptor,
        partial: PartialFile,
        on_progress: Callable[[int], None],
    ) -> None:
        """Download a blob into ``partial`` (a trio file opened ``"a+b"``, positioned anywhere),
        continuing after what it already holds, and verify it.

        ``on_progress`` gets the bytes added (negative when a download starts over). Raises
        ``DigestMismatchError`` having emptied ``partial``.
        """
        what = f"blob {descriptor.digest} of {self.reference.name}"
        digest_hex(descriptor.digest)
        verifier = await self._resume(partial, descriptor, what)
        on_progress(verifier.received)

        async def restart() -> None:
            nonlocal verifier
            await partial.truncate(0)
            on_progress(-verifier.received)
            verifier = Verifier(descriptor.digest, descriptor.size, what=what)

        async def attempt() -> None:
            if verifier.received == descriptor.size:
                return
            offset = verifier.received
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            async with self._get(f"blobs/{descriptor.digest}", headers) as response:
                if response.status_code == 416:
                    # The registry has less than we hold: the partial file is not its blob.
                    await restart()
                    raise _RetryableStatus(f"{what}: the registry refused range {offset}-", 0)
                await self._check(response, what)
                if offset and not _continues_at(response, offset):
                    await restart()
                async for chunk in response.aiter_bytes():
                    verifier.update(chunk)
                    await partial.write(chunk)
                    on_progress(len(chunk))

        try:
            await self._retrying(what, attempt)
            verifier.verify()
        except DigestMismatchError:
            await partial.truncate(0)
            raise

    async def _resume(self, partial: PartialFile, descriptor: Descriptor, what: str) -> Verifier:
        """A verifier that has seen what ``partial`` holds from an earlier, interrupted pull."""
        verifier = Verifier(descriptor.digest, descriptor.size, what=what)
        await partial.seek(0)
        try:
            while chunk := await partial.read(_HASH_CHUNK):
                verifier.update(chunk)
        except DigestMismatchError:
            # More than the blob's size: not a prefix of this blob.
            await partial.truncate(0)
            return Verifier(descriptor.digest, descriptor.size, what=what)
        return verifier


def _continues_at(response: httpx2.Response, offset: int) -> bool:
    """Whether a response to ``Range: bytes=offset-`` starts exactly at ``offset``."""
    if response.status_code != 206:
        return False
    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
    return match is not None and int(match.group(1)) == offset
