"""Writing files that a reader sees whole, and that a link planted in their place cannot redirect.

Every file kdcl writes into a run folder or a cache (checkpoints, resume states, tables, the
teacher cache's shards) is written to a new temporary file beside it, created exclusively
(``O_EXCL``: never an existing file, never through a link), then renamed over the final
name with ``os.replace``. A rename replaces whatever stands at the final name, a symbolic
link included, and never writes through it: the link's target keeps its contents. A reader
sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kdcl.errors import KdclError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The permissions an ordinary new file gets (mkstemp's own are 0600).
FILE_MODE = 0o666 & ~_umask()


def new_file_beside(path: Path) -> Path:
    """A new, empty file in ``path``'s folder with a unique hidden name, created exclusively,
    with the permissions of an ordinary new file."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return Path(name)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a new temporary file to write ``path``'s contents into; when the block ends
    without an error it replaces ``path`` (a link there is replaced, not followed), else
    it is removed and ``path`` keeps what it had."""
    tmp = new_file_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if disk_full(err):
            raise KdclError(
                f"cannot write {path}: no space left on the disk of {path.parent}",
                fix="free space there (or point hydra.run.dir and cache_dir at another disk), then run the same "
                "command again: the files written before are whole, and the run resumes from its last checkpoint",
            ) from None
        raise


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk (or the quota) is full: an OSError of ENOSPC or EDQUOT,
    or torch's writer failing its write (it keeps no errno)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, RuntimeError) and "file write failed" in str(err)


def write_replacing(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a new file that then replaces ``path`` (:func:`replacing`)."""
    with replacing(Path(path)) as tmp:
        write(tmp)


def write_text(path: Path, text: str) -> None:
    """``text`` into ``path``, whole or not at all, through no link."""
    write_replacing(path, lambda tmp: tmp.write_text(text))


def open_lock(path: Path, otherwise: str = "or set cache=false"):
    """The lock file ``path``, opened for appending (it is never written); a link at its name
    is refused, not followed. ``otherwise``: the way round it a message offers."""
    try:
        return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666), "a")
    except OSError as err:
        raise KdclError(
            f"cannot open the lock file {path} ({err.strerror}; a symbolic link there is refused)",
            fix=f"delete {path} (a lock file holds nothing), {otherwise}",
        ) from None


def writable_folder(folder: Path, what: str, fix: str) -> Path:
    """``folder``, made if needed; one message (``what`` cannot be written there, and
    ``fix``) when it cannot be made or written into."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable, why = os.access(folder, os.W_OK | os.X_OK), "permission denied"
    except OSError as err:
        writable, why = False, err.strerror or type(err).__name__
    if not writable:
        raise KdclError(f"cannot write {what} into {folder} ({why})", fix=fix)
    return folder
