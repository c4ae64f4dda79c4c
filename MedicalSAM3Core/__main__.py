"""``python -m MedicalSAM3Core ...`` == ``medsam3 ...`` (how 3D Slicer starts the local server)."""

import sys

from .cli import main

sys.exit(main())
