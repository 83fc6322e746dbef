"""The run folder's lock (``.clat.lock``): one process at a time trains in, resumes or writes results into a run folder.

:meth:`FolderLock.lock` takes an exclusive ``flock`` held for the whole command, so the operating system releases it
when the process ends, however it ends (kill -9 included: the next command finds the file unlocked and takes it over);
a second process is refused with :class:`RunLocked`, a message naming the holder. (On a platform without
``fcntl.flock`` there is no lock.) :meth:`FolderLock.check_writable` says, before anything is written, where a command
could not write into the folder. :class:`FolderLock` is mixed into :class:`clat.runs.folder.RunDir`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from clat.base.errors import ConfigError
from clat.runs.manifest import LOCK

__all__ = ["RunLocked", "FolderLock"]


class RunLocked(ConfigError):
    """Another process holds the run folder."""


class FolderLock:
    """The lock's part of a run folder (mixed into :class:`clat.runs.folder.RunDir`, whose ``path`` and ``holds_run``
    it uses)."""

    path: Path

    def check_writable(self, command: str) -> None:
        """A one-line error, before anything is written, where ``command`` could not write into this folder."""
        parent = next((p for p in (self.path, *self.path.parents) if p.exists()), Path("."))
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"cannot write into {self.path}: {parent} is not writable; {_elsewhere(command)}")

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the run folder exclusively for the block (see the module docstring). A folder this
        call had to create is removed again if nothing but the lock was written into it."""
        self.check_writable(command)  # before the lock, which is the first thing written
        created = not self.path.exists()
        lock_path = self.path / LOCK
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot write into {self.path} ({e.strerror or e}); {_elsewhere(command)}") from None
        try:
            import fcntl
        except ImportError:  # no flock on this platform: no lock (documented)
            fcntl = None
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                    raise RunLocked(f"run folder {self.path} is in use by {holder}; "
                                    "wait for it to finish (or stop it) and try again") from None
        except BaseException:
            os.close(fd)  # not ours: leave the holder's file as it is
            raise
        try:
            os.ftruncate(fd, 0)
            holder = f"`clat {command}` (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})"
            os.pwrite(fd, holder.encode(), 0)
            yield
        finally:
            # A run folder keeps its (unlocked) lock file: unlinking it could let two processes lock two files
            # under one name. A folder that holds no run afterwards (a start that failed its checks) is left as
            # it was found: without the lock file, and removed again if this call created it.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # an idle run folder's lock file is empty (it names the holder while held)
                if not self.holds_run():
                    lock_path.unlink()
                    if created and not any(self.path.iterdir()):
                        self.path.rmdir()
            os.close(fd)  # releases the flock


def _elsewhere(command: str) -> str:
    """The fix for an unwritable folder, in the words of ``command``'s options."""
    if command == "train --resume":
        return "copy the run folder to a writable place and resume it there"
    return f"choose another {'--run-dir' if command == 'train' else '--out'}"
