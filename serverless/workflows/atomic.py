"""Files written whole or not at all, on a disk other instances share (NAS)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_file(path: Path, document: Any, exclusive: bool = False) -> bool:
    """Write `document` as JSON to `path` whole or not at all (a synced temporary file renamed
    over it); True when there was none. `exclusive`: FileExistsError when there is one (two
    instances writing the same new name: one wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(document, ensure_ascii=False, indent=2).encode()
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        created = not path.exists()
        if exclusive:
            os.link(temp, path)  # create-exclusive, even on NFS
            os.unlink(temp)
        else:
            os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)
    return created


def sync_folder(folder: Path) -> None:
    """Make the rename itself durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
