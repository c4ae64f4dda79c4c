"""Where the project's shared resources (prompt dictionary, sample data, demo model) live."""

from __future__ import annotations

import os
from pathlib import Path


def resources_dir() -> Path:
    """The repository's ``Resources/`` folder, or ``$MEDSAM3_RESOURCES`` when set.

    The engine is installed from the source tree (``pip install -e .``) and the Slicer extension
    ships the same folder next to its module, so one lookup serves both.
    """
    override = os.environ.get("MEDSAM3_RESOURCES")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "Resources"
