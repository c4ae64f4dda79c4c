"""A real MRML scene from the PyPI ``slicer-core`` package, set up as 3D Slicer does at start-up:
application logic + the Segmentations module logic registered on it (segment import needs it)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedicalSAM3Slicer"))


@pytest.fixture
def scene():
    mrml = slicer.vtkMRMLScene()
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(mrml)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(mrml)
    segmentations.SetMRMLApplicationLogic(application)
    application.SetModuleLogic("Segmentations", segmentations)
    previous = (getattr(slicer, "mrmlScene", None), getattr(slicer, "modules", None))
    slicer.mrmlScene = mrml  # slicer.util works on slicer.mrmlScene, as inside Slicer
    slicer.modules = types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=lambda: segmentations))
    yield types.SimpleNamespace(mrml=mrml, application=application, segmentations=segmentations)
    slicer.mrmlScene, slicer.modules = previous
