"""Container processes the agent can lose and find again: output pipes that outlive the agent,
and exit watching without being the parent.

A container writes to pipes whose read ends the agent holds. If only the agent held them, a
killed agent would leave the container writing into a pipe with no reader (SIGPIPE). So a
*holder* (``tail --pid=<container> -f /dev/null``: a few hundred kilobytes, and it ends with the
container) keeps a copy of each read end, in its own session so that it outlives the agent; a
restarted agent opens ``/proc/<holder>/fd/<n>``, which is the same pipe, and reads on. While
no agent reads, the pipe buffer (enlarged to 1 MiB) fills and the container's writes wait;
nothing is lost.

Exits: the agent is a child subreaper, so a container's init, once ``runc create`` has exited,
becomes its child and its exit status can be collected. A container adopted after an agent
restart is not the new agent's child: its exit is still seen (a pidfd becomes readable), but
its exit code is unknown. ``Exit`` makes the end one event that any number of tasks wait for
(the container's supervisor, a graceful stop).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

PIPE_SIZE = 1 << 20
_PR_SET_CHILD_SUBREAPER = 36
_F_SETPIPE_SZ = 1031


def become_subreaper() -> None:
    """Orphaned container processes become our children, so their exit codes are ours."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


@dataclass(frozen=True)
class Pipes:
    """The container's ends (to pass to ``runc create``) and ours (to read)."""

    stdout_write: int
    stderr_write: int
    stdout_read: int
    stderr_read: int


def open_pipes() -> Pipes:
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    for fd in (out_w, err_w):
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError as exc:
            # A capped /proc/sys/fs/pipe-max-size keeps the default 64 KiB: smaller, still safe.
            if exc.errno != errno.EPERM:
                raise
    return Pipes(out_w, err_w, out_r, err_r)


async def hold(pipes: Pipes, container_pid: int) -> int:
    """Start the holder of ``pipes``' read ends; it ends by itself once the container has
    (``tail --pid`` checks every second), so none is left behind whatever happens to us."""
    holder = await trio.lowlevel.open_process(
        ["tail", f"--pid={container_pid}", "-f", "/dev/null"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(pipes.stdout_read, pipes.stderr_read),
        start_new_session=True,
    )
    return holder.pid


def reopen_pipes(holder_pid: int, holder_fds: tuple[int, int]) -> tuple[int, int] | None:
    """Our read ends again, from a holder left by an earlier agent; None if it is gone."""
    try:
        return tuple(  # type: ignore[return-value]
            os.open(f"/proc/{holder_pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC) for fd in holder_fds
        )
    except OSError:
        return None


def stop_holder(holder_pid: int) -> None:
    try:
        os.kill(holder_pid, 9)
    except ProcessLookupError:
        return
    # Our child if we started it; an earlier agent's holders belong to init now.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(holder_pid, 0)


class Exit:
    """A process's end, which any number of tasks may wait for.

    One task runs ``watch``: it waits for the process's pidfd to become readable and collects
    the exit status. Every other task awaits ``wait``, which returns once ``watch`` has, so
    that nothing polls the process. ``ProcessLookupError`` if the process is gone already.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = os.pidfd_open(pid)
        self._code: int | None = None
        self._ended = trio.Event()

    async def watch(self) -> None:
        """Wait for the process to end, collect its status and wake every ``wait``.

        Cancelled, it stops watching and the process is not waited for: the agent is stopping,
        and the next one watches it again after adopting it.
        """
        try:
            await trio.lowlevel.wait_readable(self._fd)
            # The pidfd is readable: the process has ended, so this does not block.
            self._code = _exit_code(self._fd)
        finally:
            os.close(self._fd)
        self._ended.set()

    async def wait(self) -> int | None:
        """The exit code (128+signal when killed), or None when it is not ours to know."""
        await self._ended.wait()
        return self._code


def _exit_code(pidfd: int) -> int | None:
    try:
        result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    except ChildProcessError:
        return None
    if result is None:
        return None
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return 128 + result.si_status


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_runc_orphans() -> int:
    """Collect runc's helper processes that were orphaned onto us (we are a subreaper) and
    ended: ``runc:[1:CHILD]`` from creates, ``runc:[2:INIT]`` from execs cut short. Left as
    zombies they are never freed, and one inside a container's PID namespace keeps that
    container's init from finishing its exit. Only those are touched: trio waits for its own
    subprocesses, and containers are waited for by pid."""
    reaped = 0
    for children in Path("/proc/self/task").glob("*/children"):
        try:
            pids = children.read_text().split()
        except OSError:
            continue
        for pid in map(int, pids):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            state = stat[stat.rindex(")") + 2 :].split(" ", 1)[0]
            if state == "Z" and name.startswith("runc:["):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                    reaped += 1
    return reaped
