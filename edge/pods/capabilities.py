"""Linux capability names, and the spellings a manifest may use for them."""

from __future__ import annotations

# Every Linux capability up to 6.x, in kernel order.
_CAPABILITY_NAMES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP"
    " LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER"
    " SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE"
    " SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP"
    " MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF"
    " CHECKPOINT_RESTORE"
)
ALL_CAPABILITIES = tuple(f"CAP_{name}" for name in _CAPABILITY_NAMES.split())


def capability_name(name: str) -> str | None:
    """``NET_ADMIN``, ``net_admin`` or ``CAP_NET_ADMIN`` → ``CAP_NET_ADMIN``; ``ALL`` → ``ALL``;
    ``None`` for a name Linux does not know.
    """
    upper = name.upper()
    if upper == "ALL":
        return "ALL"
    full = upper if upper.startswith("CAP_") else f"CAP_{upper}"
    return full if full in ALL_CAPABILITIES else None
