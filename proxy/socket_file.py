"""A unix listener's file on disk: its mode and owner, and whether it is still ours.

The file outlives the socket (the kernel never removes it), so whoever bound
it removes it, but only while it is the very file that bind created (the
same device and inode): a successor that has since bound its own socket on
the path, or someone who put a file there, keeps theirs.
"""

from __future__ import annotations

import os
import stat
from contextlib import suppress
from dataclasses import dataclass

from proxy.config import SocketOwner


@dataclass(eq=False)
class SocketFile:
    """The file a bind created; `owned` False in a worker, whose socket the
    supervisor bound (and removes)."""

    path: str
    device: int
    inode: int
    owned: bool = True

    @classmethod
    def at(cls, path: str, *, owned: bool = True) -> SocketFile:
        """The file now at `path` (just bound); OSError if there is none."""
        found = os.lstat(path)
        return cls(path, found.st_dev, found.st_ino, owned)

    def is_ours(self) -> bool:
        try:
            found = os.lstat(self.path)
        except OSError:
            return False
        return stat.S_ISSOCK(found.st_mode) and (found.st_dev, found.st_ino) == (
            self.device,
            self.inode,
        )

    def apply(self, mode: int, owner: SocketOwner | None) -> None:
        """chmod and chown the file as the config says; OSError if refused.

        By path: a socket's descriptor does not reach its file (fchmod on it
        changes the socket's own inode, not the one on disk).
        """
        if not self.is_ours():
            return
        os.chmod(self.path, mode)
        if owner is not None:
            os.chown(self.path, owner.uid, owner.gid)

    def remove(self) -> bool:
        """Unlink the file if we own it and it is still the one we bound;
        whether it was removed. Idempotent."""
        if not self.owned or not self.is_ours():
            return False
        self.owned = False
        with suppress(FileNotFoundError):
            os.unlink(self.path)
            return True
        return False
