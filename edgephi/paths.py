"""Where edgephi keeps what it makes for the user outside bundles: $EDGEPHI_HOME, else ~/.cache/edgephi."""
from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    return Path(os.environ.get("EDGEPHI_HOME") or Path.home() / ".cache" / "edgephi")
