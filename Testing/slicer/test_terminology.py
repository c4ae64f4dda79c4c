"""The terminology contexts generated from the prompt dictionary, checked the way 3D Slicer reads
them: against dcmqi's schemas (Testing/data/dcmqi_schemas), loaded by the real
vtkSlicerTerminologiesModuleLogic (slicer-core), and every concept's terminology string resolved
by the logic's own deserializer and lookups."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

import slicer

from MedicalSAM3Core.common.prompts import default_dictionary
from MedicalSAM3Core.common.terminology import (CONTEXT_FILE, CONTEXT_NAME, CONTEXT_SCHEMA, REGION_CONTEXT_FILE,
                                                REGION_CONTEXT_NAME, REGION_CONTEXT_SCHEMA, context_files, main,
                                                slicer_label, stale_files, terminology_string)
from MedicalSAM3Lib.terminology import context_paths, load_context

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "Testing" / "data" / "dcmqi_schemas"
LEFT, RIGHT = ("SCT", "7771000", "Left"), ("SCT", "24028007", "Right")


def _validator(schema_file: str):
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    from referencing.jsonschema import DRAFT4

    resources = []
    for path in SCHEMAS.glob("*.json"):
        contents = json.loads(path.read_text(encoding="utf-8"))
        resources.append((contents["id"].rstrip("#"), DRAFT4.create_resource(contents)))
    schema = json.loads((SCHEMAS / schema_file).read_text(encoding="utf-8"))
    return jsonschema.Draft4Validator(schema, registry=referencing.Registry().with_resources(resources))


def _shipped(name: str) -> dict:
    return json.loads((REPO / "Resources" / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("file_name, schema_file, schema_url", [
    (CONTEXT_FILE, "segment-context-schema.json", CONTEXT_SCHEMA),
    (REGION_CONTEXT_FILE, "anatomic-context-schema.json", REGION_CONTEXT_SCHEMA),
])
def test_shipped_contexts_validate_against_dcmqis_schemas(file_name, schema_file, schema_url):
    validator = _validator(schema_file)
    data = _shipped(file_name)
    assert data["@schema"] == validator.schema["id"] == schema_url
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]
    assert not errors, errors


def test_schema_validation_catches_what_slicer_would_misread():
    validator = _validator("segment-context-schema.json")
    data = _shipped(CONTEXT_FILE)
    bad = copy.deepcopy(data)
    bad["SegmentationCodes"]["Category"][0]["Type"][0]["recommendedDisplayRGBValue"] = [1, 2, 3, 4]
    assert not validator.is_valid(bad)
    bad = copy.deepcopy(data)
    bad["SegmentationCodes"]["Category"][0]["Type"][0]["modifier"] = []  # Slicer reads "Modifier"
    assert not validator.is_valid(bad)


def test_committed_context_files_are_what_the_generator_writes(tmp_path):
    assert stale_files() == [], "run: python -m MedicalSAM3Core.common.terminology"
    assert main(["--check"]) == 0
    assert main(["--output-dir", str(tmp_path)]) == 0
    for name, text in context_files().items():
        assert (REPO / "Resources" / name).read_text(encoding="utf-8") == text
        assert (tmp_path / name).read_bytes() == (REPO / "Resources" / name).read_bytes()


def test_the_slicer_side_loader_imports_without_torch_or_qt():
    code = ("import sys\n"
            f"sys.path.insert(0, {str(REPO / 'MedicalSAM3Slicer')!r})\n"
            "import MedicalSAM3Lib.terminology\n"
            "heavy = ('torch', 'transformers', 'SimpleITK', 'qt', 'vtk', 'slicer')\n"
            "print(','.join(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""


@pytest.fixture
def logic():
    return slicer.vtkSlicerTerminologiesModuleLogic()


def test_shipped_contexts_load_once_with_the_real_logic(logic):
    assert not logic.IsTerminologyContextLoaded(CONTEXT_NAME)  # slicer-core ships no contexts of its own
    assert load_context(logic) == CONTEXT_NAME
    assert logic.IsTerminologyContextLoaded(CONTEXT_NAME)
    assert logic.FindRegionContextNames("SCT", "10200004", "", "", [REGION_CONTEXT_NAME]) == (REGION_CONTEXT_NAME,)
    modified = logic.GetMTime()
    assert load_context(logic) == CONTEXT_NAME
    assert logic.GetMTime() == modified, "an already loaded context must not be loaded again"
    assert all(path.is_file() for path in context_paths())


def test_load_context_reports_a_missing_file(logic, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSAM3_RESOURCES", str(tmp_path))
    with pytest.raises(RuntimeError, match="missing"):
        load_context(logic)


def _code(coded) -> tuple:
    return coded.GetCodingSchemeDesignator(), coded.GetCodeValue(), coded.GetCodeMeaning()


def _term(term) -> tuple:
    return (term.scheme, term.code, term.meaning) if term is not None else None


def _find_in_context(logic, entry):
    """Category, type and type modifier objects of ``entry`` in its context, by the logic's own walk."""
    context = entry.GetTerminologyContextName()
    category = slicer.vtkSlicerTerminologyCategory()
    for index in range(logic.GetNumberOfCategoriesInTerminology(context)):
        assert logic.GetNthCategoryInTerminology(context, index, category)
        if _code(category)[:2] == _code(entry.GetCategoryObject())[:2]:
            break
    else:
        pytest.fail(f"category {_code(entry.GetCategoryObject())} not in {context!r}")
    kind = slicer.vtkSlicerTerminologyType()
    for index in range(logic.GetNumberOfTypesInTerminologyCategory(context, category)):
        assert logic.GetNthTypeInTerminologyCategory(context, category, index, kind)
        if _code(kind)[:2] == _code(entry.GetTypeObject())[:2]:
            break
    else:
        pytest.fail(f"type {_code(entry.GetTypeObject())} not in {context!r}")
    if not entry.GetTypeModifierObject().GetCodeValue():
        return category, kind, None
    modifier = slicer.vtkSlicerTerminologyType()
    for index in range(logic.GetNumberOfTypeModifiersInTerminologyType(context, category, kind)):
        assert logic.GetNthTypeModifierInTerminologyType(context, category, kind, index, modifier)
        if _code(modifier)[:2] == _code(entry.GetTypeModifierObject())[:2]:
            return category, kind, modifier
    pytest.fail(f"modifier {_code(entry.GetTypeModifierObject())} of {_code(kind)} not in {context!r}")


def _find_region(logic, entry):
    context = entry.GetRegionContextName()
    region = slicer.vtkSlicerTerminologyType()
    for index in range(logic.GetNumberOfRegionsInRegionContext(context)):
        assert logic.GetNthRegionInRegionContext(context, index, region)
        if _code(region)[:2] == _code(entry.GetRegionObject())[:2]:
            return region
    pytest.fail(f"region {_code(entry.GetRegionObject())} not in {context!r}")


@pytest.mark.parametrize("name", default_dictionary().names)
def test_every_concepts_terminology_string_resolves_in_the_shipped_contexts(logic, name):
    load_context(logic)
    concept = default_dictionary().lookup(name)
    string = terminology_string(concept.terminology())
    entry = slicer.vtkSlicerTerminologyEntry()
    assert logic.DeserializeTerminologyEntry(string, entry), string
    assert logic.SerializeTerminologyEntry(entry) == string  # exactly Slicer's format, nothing lost
    assert entry.GetTerminologyContextName() == CONTEXT_NAME

    category, kind, modifier = _find_in_context(logic, entry)
    assert _code(category) == _term(concept.category)
    assert _code(kind) == _term(concept.type)
    assert (_code(modifier) if modifier else None) == _term(concept.type.modifier)
    typed = (concept.type.scheme, concept.type.code)
    modifier_code = (concept.type.modifier.scheme, concept.type.modifier.code) if concept.type.modifier else ("", "")
    assert logic.FindTerminologyNames(concept.category.scheme, concept.category.code, *typed, *modifier_code,
                                      [CONTEXT_NAME]) == (CONTEXT_NAME,)

    carrier = modifier or kind  # the color and label of a lateralized concept sit on its modifier
    if carrier.GetSlicerLabel():
        assert carrier.GetSlicerLabel() == slicer_label(concept)
        assert tuple(carrier.GetRecommendedDisplayRGBValue()) == concept.color
        found = slicer.vtkSlicerTerminologyEntry()
        assert logic.FindTypeInTerminologyBy3dSlicerLabel(CONTEXT_NAME, slicer_label(concept), found)
        assert [_code(found.GetTypeObject()), _code(found.GetTypeModifierObject())] == \
            [_code(entry.GetTypeObject()), _code(entry.GetTypeModifierObject())]

    if concept.region is None:
        assert not entry.GetRegionContextName() and not entry.GetRegionObject().GetCodeValue()
    else:
        assert entry.GetRegionContextName() == REGION_CONTEXT_NAME
        assert _code(_find_region(logic, entry)) == _term(concept.region)


@pytest.mark.parametrize("name, kind, modifier", [
    ("Left kidney", ("SCT", "64033007", "Kidney"), LEFT), ("Right kidney", ("SCT", "64033007", "Kidney"), RIGHT),
    ("Left adrenal gland", ("SCT", "23451007", "Adrenal gland"), LEFT),
    ("Right adrenal gland", ("SCT", "23451007", "Adrenal gland"), RIGHT),
])
def test_laterality_is_a_modifier_of_the_unlateralized_structure(logic, name, kind, modifier):
    load_context(logic)
    entry = slicer.vtkSlicerTerminologyEntry()
    assert logic.FindTypeInTerminologyBy3dSlicerLabel(CONTEXT_NAME, name.lower(), entry)
    assert _code(entry.GetTypeObject()) == kind and _code(entry.GetTypeModifierObject()) == modifier
    concept = default_dictionary().lookup(name)
    assert f"~{'^'.join(kind)}~{'^'.join(modifier)}~" in terminology_string(concept.terminology())


def test_terminology_string_survives_a_segment_round_trip(logic):
    load_context(logic)
    concept = default_dictionary().lookup("left kidney")
    segment = slicer.vtkSegment()
    segment.SetTerminology(terminology_string(concept.terminology()))
    entry = slicer.vtkSlicerTerminologyEntry()
    assert logic.DeserializeTerminologyEntry(segment.GetTerminology(), entry)
    assert _code(entry.GetTypeModifierObject()) == LEFT


def test_seg_nrrd_terminology_reads_back_in_slicer_and_resolves(logic, tmp_path):
    """The engine's .seg.nrrd writer -> Slicer's segmentation storage node -> the shipped contexts."""
    import numpy as np

    from MedicalSAM3Core.common.result import LabelInfo, SegmentationResult
    from MedicalSAM3Core.common.volume import Geometry
    from MedicalSAM3Core.imaging.io import write_image
    from MedicalSAM3Core.imaging.outputs import seg_nrrd_image

    concepts = [default_dictionary().lookup(text) for text in ("left kidney", "liver tumor", "retinal vessel")]
    label_map = np.zeros((4, 5, 6), np.uint8)
    labels = []
    for value, concept in enumerate(concepts, start=1):
        label_map[value, 1:3, 1:3] = value
        labels.append(LabelInfo(value=value, name=concept.name, prompt=concept.name, model_text=concept.name,
                                color=concept.color, known_concept=True, terminology=concept.terminology()))
    path = tmp_path / "result.seg.nrrd"
    write_image(seg_nrrd_image(SegmentationResult(label_map=label_map, geometry=Geometry(), labels=labels)), path)

    scene = slicer.vtkMRMLScene()
    node = scene.AddNode(slicer.vtkMRMLSegmentationNode())
    storage = scene.AddNode(slicer.vtkMRMLSegmentationStorageNode())
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    load_context(logic)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(concepts)
    for index, concept in enumerate(concepts):
        segment = segmentation.GetNthSegment(index)
        assert segment.GetTerminology() == terminology_string(concept.terminology())
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(segment.GetTerminology(), entry)
        _find_in_context(logic, entry)
        if concept.region is not None:
            _find_region(logic, entry)
