"""Result files written whole or not at all, and a failed write as one line.

Every file fae writes as a result (robustness.json/csv, image grids, samples, a report's tables and
figures, an experiment's table and status) goes through `written`: the bytes go to a partial file
beside the destination (a unique hidden name in the same folder, so on the same filesystem), which
is synced and then renamed over the destination, or hard-linked to it where an earlier result must
never be replaced (`replace=False`: the link fails if the name exists, in the same atomic step). A
reader therefore sees the old file or the new one, never a part. When the write fails (a full disk,
a quota, a file-size limit, a read-only or forbidden folder) the partial file is removed and a
`WriteFailed` (a UserError) names the file, the reason and the free space; the retry, with space
freed, writes it.

Python's tempfile does not do this: its files are made in another folder, with mode 0600, and are
not renamed into place.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from fae.errors import UserError

# the errors of a write the user can fix: room, quota, a file-size limit, a read-only or forbidden folder
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
PARTIALS = itertools.count()  # a unique name for each file being written (a signal handler may write too)


class WriteFailed(UserError):
    """A result file could not be written; nothing was left under its name."""


def free_space(folder: Path) -> str:
    """The free space of the filesystem holding `folder` (or its nearest existing parent), as text."""
    for place in (folder, *folder.parents):
        try:
            free = shutil.disk_usage(place).free
        except OSError:
            continue
        return f"{free / 2**20:.0f} MiB free" if free < 2**30 else f"{free / 2**30:.1f} GiB free"
    return "free space unknown"


def write_failed(path: Path, err: OSError) -> WriteFailed:
    reason = err.strerror or "the write was cut short"  # numpy reports a short write without an errno
    return WriteFailed(f"could not write {path} ({reason}; {free_space(path.parent)} on its disk); nothing was left "
                       "under that name")  # fmt: skip


def is_write_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in WRITE_ERRNOS


def is_short_write(err: BaseException) -> bool:
    """numpy's way of saying that the system wrote less than asked (a full disk, a file-size limit)."""
    return isinstance(err, OSError) and err.errno is None and "requested and" in str(err)


@contextmanager
def written(path: Path, *, replace: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s content into; in place once the block ends without an error.

    replace: False keeps an earlier file of that name: a UserError says it exists, and nothing changes.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}-{next(PARTIALS)}")
    try:
        with open(partial, "xb") as file:  # the umask's permissions, as any file the user writes
            yield file
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(partial, path)
        else:
            os.link(partial, path)  # fails, atomically, if the name is taken
    except FileExistsError as err:
        if err.filename2 is None or Path(err.filename2) != path:
            raise
        raise UserError(f"{path} exists: give another name (fae never overwrites a result)") from None
    except OSError as err:
        if not (is_write_error(err) or is_short_write(err)):
            raise
        raise write_failed(path, err) from None
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: Path, text: str, *, replace: bool = True) -> Path:
    """`text` (UTF-8) into `path`, whole or not at all; returns `path`."""
    with written(path, replace=replace) as file:
        file.write(text.encode())
    return Path(path)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where the system
    or its filesystem cannot. Python's os module has no such call, hence ctypes."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def replace_folder(new: Path, old: Path) -> None:
    """The folder `new`, made whole beside `old`, put in its place: `old`'s earlier content is removed
    after the swap, so that a reader finds the earlier folder or the new one, whole. Where the system
    cannot swap atomically, `old` is moved aside first (for an instant neither name holds it)."""
    if not old.exists():
        os.rename(new, old)
        return
    if not exchange(new, old):
        aside = old.with_name(f".{old.name}.old-{os.getpid()}-{next(PARTIALS)}")
        os.rename(old, aside)
        os.rename(new, old)
        new = aside
    shutil.rmtree(new)  # the earlier content, now under the partial name


def share_as_umask(handle: int) -> None:
    """Give a file made by tempfile.mkstemp (mode 0600) the permissions the umask gives any new file, so
    that the other users of a shared data folder can read a cache written there."""
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(handle, 0o666 & ~mask)
