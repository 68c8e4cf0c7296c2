"""One writer per run folder: an exclusive lock held for the whole run.

Two ``ditkit train`` processes writing one ``--out`` folder would interleave their checkpoints
and scalars and both report success. The first process takes ``RUN/.lock`` with
``fcntl.flock`` (exclusive, non-blocking) and keeps it until it returns; a second one fails at
once (:class:`RunLockedError`, exit status 2) naming the holder's PID and host, which the holder
wrote into the file. Under ``torchrun`` only rank 0 takes it (the other ranks do not write).

The kernel drops a ``flock`` when its process dies (SIGKILL, OOM, a preempted node), so a lock
file left by a killed run blocks nothing: ``--resume`` simply takes it again. On NFS, Linux
emulates ``flock`` with byte-range locks, which the server tracks across nodes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from ditkit.errors import EnvironmentFault, UserError

LOCK_NAME = ".lock"


class RunLockedError(UserError):
    """Another process holds the run folder's lock."""


class RunLock:
    """The held lock of one run folder; :meth:`release` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(path: Path) -> str:
    """Who holds (or last held) the lock file ``path``: ``PID 123 on host h``, from its
    contents; ``an unknown process`` when they cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            info = json.loads(os.read(fd, 4096).decode("utf-8"))
        finally:
            os.close(fd)
        return f"PID {int(info['pid'])} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


def acquire(run: Path) -> RunLock:
    """Take ``run/.lock`` exclusively (creating ``run``), or raise :class:`RunLockedError`
    naming the holder. The file is opened without following a symlink (a planted one is
    refused) and without truncating it before the lock is ours."""

    run = Path(run)
    path = run / LOCK_NAME
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if os.path.islink(path):
            raise UserError(
                f"{path} is a symbolic link; ditkit does not write through links "
                "it did not make: remove it and start again"
            ) from None
        raise EnvironmentFault(
            f"{path}: cannot create the run's lock file: {err.strerror or err}; nothing was written"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockedError(
            f"{run} is in use: another ditkit train ({holder(path)}) holds {path}; wait for it "
            "to finish or stop it, or choose another --out folder"
        ) from None
    except OSError as err:
        os.close(fd)
        raise EnvironmentFault(
            f"{path}: cannot lock the run folder: {err.strerror or err} "
            "(does the file system support locks?)"
        ) from None
    try:  # ours now: say who holds it, for the next one's message
        os.ftruncate(fd, 0)
        os.write(
            fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode()
        )
    except OSError:
        pass  # the lock works without its label
    return RunLock(path, fd)


__all__ = ["RunLock", "RunLockedError", "acquire", "holder", "LOCK_NAME"]
