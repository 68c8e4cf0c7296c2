"""Atomic file writes: a failure never leaves a half-written file or damages an existing one.

The finished file gets the permissions any other tool would give it (``0666`` less the umask):
``mkstemp`` makes its temporary file ``0600``, which would hide run folders from the group
that shares them."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ditkit.errors import DitkitError, EnvironmentFault, UserError

_FAULTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "an input/output error",
}
_FAULT_TEXT = (
    ("No space left", "the disk is full"),
    ("StorageFull", "the disk is full"),
    ("unexpected pos", "the disk is full (the write stopped short)"),
    ("Read-only file system", "the file system is read-only"),
    ("ReadOnlyFilesystem", "the file system is read-only"),
    ("Permission denied", "permission denied"),
    ("PermissionDenied", "permission denied"),
)


def environment_reason(err: BaseException, paths: tuple = ()) -> str | None:
    """Why the machine refused a write (disk full, read-only, permissions), or ``None`` when
    ``err`` is not such a refusal. Understands ``OSError`` and the text of the errors that
    safetensors and torch raise for the same conditions (a ``RuntimeError`` or
    ``SafetensorError`` with no errno), with ``paths`` (the files being written) taken out of
    the text first: a file named ``No space left.onnx`` is no full disk."""
    if isinstance(err, EnvironmentFault):
        return getattr(err, "reason", None) or str(err)
    if isinstance(err, OSError) and err.errno is not None:
        return _FAULTS.get(err.errno)  # by its number only: the text holds file names
    if isinstance(err, (DitkitError, ValueError, TypeError, KeyError)):
        return None  # ditkit's own (and the user's) errors are never the machine's refusal
    text = str(err)
    for name in (getattr(err, "filename", None), getattr(err, "filename2", None), *paths):
        if name:
            text = text.replace(str(name), "")
    for needle, reason in _FAULT_TEXT:
        if needle in text:
            return reason
    return None


def environment_fault(
    err: BaseException, what: str, kept: str = "nothing written earlier was lost", paths: tuple = ()
) -> EnvironmentFault | None:
    """An :class:`EnvironmentFault` saying ``what`` could not be written and why, or ``None``.
    A fault made here for an inner file is restated for ``what`` (e.g. the whole checkpoint)."""
    if isinstance(err, EnvironmentFault) and not hasattr(err, "reason"):
        return err
    reason = environment_reason(err, (what, *paths))
    if reason is None:
        return None
    fault = EnvironmentFault(f"{what} could not be written: {reason}; {kept}")
    fault.reason = reason
    return fault


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open(path, "w")`` would have: 0666 less the umask."""
    os.chmod(path, 0o666 & ~current_umask())


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) into ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def check_output(path: str | os.PathLike) -> None:
    """Refuse, as a :class:`UserError`, an output path that cannot become a file: a folder,
    a dangling symbolic link (the user meant its target, which is missing), or a path below
    something that is a file."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise UserError(
            f"{path}: a symbolic link to {os.readlink(path)}, which does not "
            "exist; give the real path of the file to write, or remove the link"
        )
    if path.is_dir():
        raise UserError(f"{path}: a folder; give the path of a file to write")
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise UserError(
                    f"{path}: {parent} is a file, not a folder; give a path inside a folder"
                )
            break


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block succeeds the file is synced and
    renamed onto ``path``, when it fails the temporary file is removed."""
    path = Path(path)
    check_output(path)
    kept = (
        f"the previous {path.name} is untouched"
        if path.exists()
        else "nothing written earlier was lost"
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        if err.errno in (errno.ENOTDIR, errno.EEXIST):
            check_output(path)  # a parent turned out to be a file
            raise UserError(
                f"{path}: a part of this path is not a folder; give a path inside a folder"
            ) from None
        raise (environment_fault(err, str(path), kept) or err) from None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield tmp
        honour_umask(tmp)  # again: some writers (safetensors) replace the file with a 0600 one
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            if os.path.exists(tmp):
                os.unlink(tmp)
        fault = environment_fault(err, str(path), kept, (tmp, os.path.basename(tmp), path.name))
        if fault is not None:
            raise fault from None
        raise
