"""Load the Medical SAM3 terminology contexts into 3D Slicer's Terminologies module.

The segments the module creates (and the .seg.nrrd files the engine writes) name the context
``"Segmentation category and type - Medical SAM3"`` and, for concepts with an anatomic region, the
region context ``"Anatomic codes - Medical SAM3"``
(:func:`MedicalSAM3Core.common.terminology.terminology_string`). Both are generated from the prompt
dictionary and shipped in ``Resources/`` next to the engine; loading them makes Slicer's
terminology selector show the segments' category, type, laterality and region, and offer the
dictionary's concepts. No Qt and no torch here: the logic is passed in.
"""

from __future__ import annotations

from pathlib import Path

from MedicalSAM3Core.common.resources import resources_dir
from MedicalSAM3Core.common.terminology import (CONTEXT_FILE, CONTEXT_NAME, REGION_CONTEXT_FILE,
                                                REGION_CONTEXT_NAME)


def context_paths() -> tuple[Path, Path]:
    """The shipped terminology context and region context files."""
    directory = resources_dir()
    return directory / CONTEXT_FILE, directory / REGION_CONTEXT_FILE


def _loaded_region_context_names(logic) -> list[str]:
    import vtk  # Slicer's VTK (also in slicer-core); imported here so this module stays import-light

    names = vtk.vtkStringArray()
    logic.GetLoadedRegionContextNames(names)
    return [names.GetValue(i) for i in range(names.GetNumberOfValues())]


def load_context(logic) -> str:
    """Load the shipped contexts into ``logic`` unless already loaded; return the terminology
    context name (``SegmentationCategoryTypeContextName``).

    ``logic`` is a ``vtkSlicerTerminologiesModuleLogic``: ``slicer.modules.terminologies.logic()``
    inside Slicer. Only methods declared identically in
    ``Modules/Loadable/Terminologies/Logic/vtkSlicerTerminologiesModuleLogic.h`` of both Slicer 5.10
    and 5.12 are used (the header is the same in both): ``IsTerminologyContextLoaded`` (line 108),
    ``GetLoadedRegionContextNames(vtkStringArray*)`` (line 114), ``LoadTerminologyFromFile``
    (line 91, returns the context name, "" on failure) and ``LoadRegionContextFromFile`` (line 95,
    returns the region context name, "" on failure).

    Raises ``RuntimeError`` if a file is missing or Slicer refuses it.
    """
    context_file, region_file = context_paths()
    if not logic.IsTerminologyContextLoaded(CONTEXT_NAME):
        _require(context_file)
        loaded = logic.LoadTerminologyFromFile(str(context_file))
        if loaded != CONTEXT_NAME:
            raise RuntimeError(f"3D Slicer could not load the terminology context {context_file} (got {loaded!r})")
    if REGION_CONTEXT_NAME not in _loaded_region_context_names(logic):
        _require(region_file)
        loaded = logic.LoadRegionContextFromFile(str(region_file))
        if loaded != REGION_CONTEXT_NAME:
            raise RuntimeError(f"3D Slicer could not load the region context {region_file} (got {loaded!r})")
    return CONTEXT_NAME


def _require(path: Path) -> None:
    if not path.is_file():
        raise RuntimeError(f"terminology context file missing: {path} (regenerate with "
                           "python -m MedicalSAM3Core.common.terminology)")
