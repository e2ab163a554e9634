"""A volume written and updated the way the kubelet does it for a Secret,
ConfigMap or projected volume (its "atomic writer"), on real files.

Every version of the payload is a fresh `..<timestamp>` directory; `..data`
is a symlink to the current one, replaced by renaming a `..data_tmp`
symlink over it (one atomic rename(2)), after which the previous version is
removed. What the container sees are symlinks, one per top-level name of
the payload, into `..data`: `tls.crt -> ..data/tls.crt`, or for a nested
path `tls/tls.crt` one link `tls -> ..data/tls`. The visible paths never
change: only where `..data` points does, so a reader either sees the old
version whole or the new one whole.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath


def write_volume(mount: Path, payload: Mapping[str, bytes]) -> None:
    """Make `payload` (paths relative to the mount) the volume's content."""
    mount.mkdir(exist_ok=True)
    data = mount / "..data"
    previous = mount / data.readlink() if data.is_symlink() else None
    version = Path(
        tempfile.mkdtemp(dir=mount, prefix=time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()))
    )
    version.chmod(0o755)
    for relative, content in payload.items():
        path = version / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    staged = mount / "..data_tmp"
    staged.symlink_to(version.name)
    staged.rename(data)
    for top in sorted({PurePosixPath(relative).parts[0] for relative in payload}):
        if not (mount / top).is_symlink():
            (mount / top).symlink_to(f"..data/{top}")
    if previous is not None:
        shutil.rmtree(previous)
