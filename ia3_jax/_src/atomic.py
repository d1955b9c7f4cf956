"""One writer per path and crash-safe directory replacement: the protocol of every ia3_jax save.

`save_adapter`, `save_peft` and ``ia3-jax finetune`` write this way:

1. `locked(path)`: ``fcntl.flock`` on ``<path>.ia3-lock``. The kernel releases the lock when its
   holder exits, killed or not, so a stale lock cannot exist; host and pid are written into the
   file only so that a refused writer can name the holder.
2. Under the lock every leftover is a dead save's. `recover` renames back the old copy that a kill
   between `commit`'s two renames left; `sweep` then deletes the staging, trash and (now obsolete)
   replaced directories of `path`, matched by exact name prefix, never by glob.
3. The caller writes into the fresh name `new_staging(path)`; `commit` fsyncs every file and
   directory in it, calls ``check(path)`` (the last look at what is about to be replaced), renames
   an existing `path` aside, renames the staging directory in, fsyncs the parent, and deletes the
   aside copy, renamed to a trash name first so that a half-deleted copy never has a name that
   `recover` trusts.

`replaced_directory` runs the three steps around the caller's writes. A kill at any step leaves the
old directory at `path`, the new one, or (between the two renames)
the old one under its replaced name, which `recover` puts back. POSIX local or mounted filesystems.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator

from ia3_jax._src.errors import CheckpointError

RESERVED = ".ia3-"  # names next to `path` that start with its name and this belong to its saves
LOCK = ".ia3-lock"
STAGING = ".ia3-staging-"
REPLACED = ".ia3-replaced-"
TRASH = ".ia3-trash-"


def prefix(path: str, marker: str) -> str:
    """The start of the names of `path`'s temporary directories of kind `marker`.

    Glob characters are replaced (orbax globs inside what it writes); a hash of the exact name keeps
    ``run[0]`` and ``run_0_`` apart.
    """
    name = os.path.basename(path)
    safe = re.sub(r"[][*?]", "_", name)
    return os.path.join(os.path.dirname(path), f"{safe}{marker}{hashlib.sha256(name.encode()).hexdigest()[:8]}-")


def leftovers(path: str, marker: str) -> list[str]:
    """The entries next to `path` whose names start with ``prefix(path, marker)``."""
    parent, start = os.path.split(prefix(path, marker))
    try:
        names = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(os.path.join(parent, n) for n in names if n.startswith(start))


def new_staging(path: str) -> str:
    """A fresh name next to `path` (same filesystem: the rename into place is atomic); not created."""
    return prefix(path, STAGING) + secrets.token_hex(4)


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Holds ``<path>.ia3-lock`` for the body; `CheckpointError` naming the holder if another has it."""
    import fcntl  # POSIX only: imported here so that `import ia3_jax` works everywhere, saves on POSIX

    lock = path + LOCK
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace") or "a process that is just starting"
            os.close(fd)
            raise CheckpointError(
                f"another save to {path} is running ({holder} holds {lock}): one writer per path. "
                "Wait for it to finish, or save elsewhere."
            ) from None
        try:  # the previous holder unlinks the file as it releases it: lock the file that has the name
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        os.unlink(lock)  # before the release, so that a writer waiting on this inode sees it is gone
        os.close(fd)


def fsync_path(path: str) -> None:
    """Flushes one file, or one directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str) -> None:
    """Flushes every file and directory under `directory` (itself included) to disk."""
    for root, _, files in os.walk(directory, topdown=False):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def discard(directory: str, path: str) -> None:
    """Deletes a directory of `path`'s saves; one with a loadable name is renamed to a trash name first."""
    if STAGING not in os.path.basename(directory) and TRASH not in os.path.basename(directory):
        trash = prefix(path, TRASH) + secrets.token_hex(4)
        os.rename(directory, trash)
        directory = trash
    if os.path.isdir(directory) and not os.path.islink(directory):
        _remove_tree(directory)
    else:
        os.unlink(directory)


def _remove_tree(directory: str, attempts: int = 50, pause_s: float = 0.1) -> None:
    """`shutil.rmtree`, retried while a directory refills: when one item of an orbax save raises, the
    items already launched finish writing from orbax's background threads into the staging directory
    being deleted (``ENOTEMPTY``). Bounded (5 s): a writer that never stops is not ours to wait for."""
    for attempt in range(attempts):
        try:
            shutil.rmtree(directory)
            return
        except OSError as err:
            if err.errno != errno.ENOTEMPTY or attempt == attempts - 1:
                raise
            time.sleep(pause_s)


def recover(path: str) -> str | None:
    """Renames back the copy that a kill between `commit`'s renames left aside; returns its old name."""
    copies = leftovers(path, REPLACED)
    if os.path.lexists(path) or not copies:
        return None
    copy = max(copies, key=os.path.getmtime)  # `sweep` keeps one; several only if swept by hand midway
    os.rename(copy, path)
    fsync_path(os.path.dirname(path))
    return copy


def sweep(path: str) -> None:
    """Deletes what dead saves of `path` left next to it: call under the lock, after `recover`."""
    for marker in (STAGING, TRASH, REPLACED):
        for leftover in leftovers(path, marker):
            discard(leftover, path)


def commit(staging: str, path: str, check: Callable[[str], object]) -> None:
    """Puts the complete `staging` directory at `path`, replacing what is there (see the module docstring).

    ``check(path)`` runs right before the renames and raises to refuse (its result is ignored):
    nothing is replaced then.
    """
    fsync_tree(staging)
    check(path)
    aside = None
    if os.path.lexists(path):
        aside = prefix(path, REPLACED) + secrets.token_hex(4)
        os.rename(path, aside)
    try:
        os.rename(staging, path)
    except BaseException:
        if aside is not None:
            os.rename(aside, path)
        raise
    fsync_path(os.path.dirname(path))
    if aside is not None:
        discard(aside, path)


@contextlib.contextmanager
def replaced_directory(path: str, check: Callable[[str], object]) -> Iterator[str]:
    """The whole protocol: yields a fresh staging name next to `path` (not created) to write into.

    Holds the lock throughout; first recovers and sweeps `path`'s leftovers and calls ``check(path)``;
    when the body returns, commits the staging directory over `path` (``check`` runs again right
    before the renames). However the body or the commit ends, no staging directory is left.

    Example:
      >>> with ia3_jax.replaced_directory("out/report", check=lambda path: None) as staging:
      ...     os.makedirs(staging)
      ...     write_report(staging)      # "out/report" is replaced by `staging` only when the block returns
    """
    with locked(path):
        sweep(path)
        check(path)
        staging = new_staging(path)
        try:
            yield staging
            commit(staging, path, check)
        finally:
            sweep(path)
