"""Temporary directories the local stack's servers can use."""

from __future__ import annotations

import tempfile
from pathlib import Path


def world_searchable_temp_dir(prefix: str) -> Path:
    """A fresh temp dir PostgreSQL can reach when it runs as `nobody` under root.

    pytest's own tmp dirs sit under a 0700 directory, which `nobody` cannot enter.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path
