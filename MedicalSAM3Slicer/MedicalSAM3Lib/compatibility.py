"""Which 3D Slicer versions the module supports, and the sentence an older one gets.

Supported: the Slicer releases whose source every Slicer, MRML and CTK call of the module was
checked against (``Testing/data/slicer_api_<version>.json``, made by
``Testing/tools/dump_slicer_api.py``; ``Testing/slicer/test_slicer_api.py`` fails when the module
calls something one of them lacks). Older releases cannot work: ``vtkSegment.SetTerminology``
arrived in 5.10 (Slicer#8296), and Slicer 5.8 ships Python 3.9, where transformers 5 does not
install. Newer releases are allowed (with a line in the log): Slicer keeps its API within a major
version, and the first check a user runs is the module's own self-test.
"""

from __future__ import annotations

import logging
from typing import Optional

#: ``(major, minor)`` of the Slicer releases checked against, oldest first.
SUPPORTED = ((5, 10), (5, 12))


def version_text(version) -> str:
    return ".".join(str(part) for part in version)


def version_problem(major: int, minor: int) -> Optional[str]:
    """None when Slicer ``major.minor`` can run the module, else the one sentence to show the user."""
    oldest, newest = SUPPORTED[0], SUPPORTED[-1]
    if (major, minor) < oldest:
        return (f"Medical SAM3 needs 3D Slicer {version_text(oldest)} or newer, and this is Slicer "
                f"{major}.{minor}: install a current Slicer from download.slicer.org to use it.")
    if (major, minor) > newest:
        logging.getLogger(__name__).info("Medical SAM3 was checked against Slicer %s to %s; this is %d.%d",
                                         version_text(oldest), version_text(newest), major, minor)
    return None
