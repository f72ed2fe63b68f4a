"""The lock a save holds on its directory (flock, so two saves take turns), and waiting for it.

A save that finds the lock held waits: after LOCK_WARN_AFTER seconds it warns (RuntimeWarning)
saying whose lock it is, and after its `lock_timeout` (DEFAULT_LOCK_TIMEOUT unless given; None
or math.inf: no limit) it gives up with an AdapterError, having written nothing. A holder that
was stopped (SIGSTOP) or hangs would otherwise block every later save, silently and for ever.

Whose lock: the holder records its pid, host and the time it took the lock in a small file
outside the directory, since the directory holds only what its readers expect: in RECORDS, in
one of 256 slots chosen by the directory's device and inode (which the record holds too), so
that the records of holders killed before they could delete theirs never pile up. The
kernel's own list (/proc/locks, on Linux) names the pid of any holder, one that records nothing
(another program, an older version of this package) included, and tells a record left by a
killed holder from the live one.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import numbers
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path

from .errors import AdapterError

DEFAULT_LOCK_TIMEOUT = 300.0  # seconds a save waits for another save's lock
LOCK_WARN_AFTER = 5.0  # seconds of waiting before the warning saying whose lock it is
RECORDS = "soslora_ext-locks"  # under tempfile.gettempdir()


def check_lock_timeout(value, where: str) -> float:
    """`value` as seconds (None: no limit, math.inf); anything else than a number >= 0 is an
    AdapterError naming lock_timeout."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise AdapterError(f"{where}: lock_timeout must be a number of seconds >= 0 (None or "
                           f"math.inf: no limit), got {value!r}; nothing was written")
    return float(value)


@contextlib.contextmanager
def locked(directory: Path, timeout: float, where: str):
    """Holds an exclusive flock on the directory, waiting at most `timeout` seconds for it;
    yields whether it could be taken (not where flock is missing: some network file systems)."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield False
        return
    record = None
    try:
        held = _acquire(fcntl, fd, directory, timeout, where)
        if held:
            record = _write_record(directory)
        yield held
    finally:
        if record is not None:  # deleted before the lock is let go (were the slot taken by
            with contextlib.suppress(OSError):  # another directory's record since, its waiters
                record.unlink()  # name that holder by the kernel's pid)
        os.close(fd)


def _acquire(fcntl, fd: int, directory: Path, timeout: float, where: str) -> bool:
    start, delay, warned = time.monotonic(), 0.005, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno == errno.EINTR:
                continue
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False  # no flock on this file system
        waited = time.monotonic() - start
        if waited >= timeout:
            raise AdapterError(
                f"{where}: gave up after {timeout:g} s waiting for the lock on {directory}, "
                f"held by {holder(directory)}: another save is writing there, or one that is "
                "stopped or hung (end that process, or give a larger lock_timeout); nothing "
                "was written")
        if not warned and waited >= LOCK_WARN_AFTER:
            warned = True
            limit = "no limit" if math.isinf(timeout) else f"lock_timeout={timeout:g} s"
            warnings.warn(f"{where}: waiting for the lock on {directory}: held by "
                          f"{holder(directory)}; another save is writing there, or one that is "
                          f"stopped or hung ({limit})", RuntimeWarning)
        pause = min(delay, timeout - waited)
        if not warned:
            pause = min(pause, LOCK_WARN_AFTER - waited)
        time.sleep(max(0.0, pause))
        delay = min(2 * delay, 0.25)


# ---- whose lock --------------------------------------------------------------------------------
def _record_path(directory: Path) -> tuple[Path, list[int]]:
    """(the record's slot, [device, inode] of the directory)."""
    st = os.stat(directory)
    slot = hashlib.sha256(f"{st.st_dev}:{st.st_ino}".encode()).hexdigest()[:2]
    return Path(tempfile.gettempdir()) / RECORDS / f"{slot}.json", [st.st_dev, st.st_ino]


def _write_record(directory: Path) -> Path | None:
    """Records this process as the holder; None where it cannot (the lock works without)."""
    try:
        path, identity = _record_path(directory)
        with contextlib.suppress(FileExistsError):
            path.parent.mkdir()
            path.parent.chmod(0o1777)  # every user's saves record here, as in /tmp
        text = json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), since=time.time(),
                               directory=identity))
        with open(path, "w") as f:
            f.write(text)
        return path
    except OSError:
        return None


def _kernel_holders(directory: Path) -> list[int]:
    """Pids holding a lock on the directory per /proc/locks (empty where there is none)."""
    try:
        st = os.stat(directory)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[1] != "->" and fields[5] == device:
            with contextlib.suppress(ValueError):
                if int(fields[4]) > 0:
                    pids.append(int(fields[4]))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def holder(directory: Path) -> str:
    """Who holds the directory's lock, as well as can be told: 'pid P on host H for N s'."""
    kernel = _kernel_holders(directory)
    try:
        path, identity = _record_path(directory)
        record = json.loads(path.read_text())
        pid, host, since = record["pid"], record["host"], float(record["since"])
        if not (isinstance(pid, int) and isinstance(host, str)
                and record["directory"] == identity):
            raise ValueError  # another directory's (a record of the same slot)
    except (OSError, ValueError, KeyError, TypeError):
        record = None
    if record is not None:
        here = host == socket.gethostname()
        # A record left by a killed holder: its process is gone, or another one holds the lock.
        stale = here and (not _alive(pid) or (kernel and pid not in kernel))
        if not stale:
            return f"pid {pid} on host {host} for {max(0.0, time.time() - since):.0f} s"
    if kernel:
        return (f"pid {', '.join(map(str, kernel))} (for an unknown time: it records nothing; "
                "another program, or an older version of this package)")
    return ("another process, which records nothing (another program, an older version of "
            "this package, or one on another host)")
