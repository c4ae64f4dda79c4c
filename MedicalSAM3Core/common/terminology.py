"""SNOMED CT terminology of a segment for 3D Slicer (torch-free; used by the .seg.nrrd writer and
the Slicer module), and the terminology context files that make it resolvable in Slicer.

The prompt dictionary (``Resources/prompts.json``) is the one source. From it this module generates
two context files that ship in ``Resources/`` and that the Slicer module loads into the
Terminologies module (``MedicalSAM3Lib/terminology.py``), as SlicerTotalSegmentator does with its
own context:

* ``SegmentationCategoryTypeModifier-MedicalSAM3.term.json``: a terminology context named
  :data:`CONTEXT_NAME` holding every concept's category, type and type modifier (laterality), with
  the dictionary's display color and name as ``recommendedDisplayRGBValue`` / ``3dSlicerLabel``;
* ``AnatomicRegionAndModifier-MedicalSAM3.term.json``: a region context named
  :data:`REGION_CONTEXT_NAME` holding the anatomic regions the concepts use (several, such as
  Retina, are not in Slicer's "Anatomic codes - DICOM master list").

Regenerate them after editing the dictionary (a test checks the committed files are current)::

    python -m MedicalSAM3Core.common.terminology          # write Resources/*-MedicalSAM3.term.json
    python -m MedicalSAM3Core.common.terminology --check  # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Optional

from .resources import resources_dir

#: ``SegmentationCategoryTypeContextName`` of the shipped terminology context.
CONTEXT_NAME = "Segmentation category and type - Medical SAM3"
#: ``AnatomicContextName`` of the shipped region context.
REGION_CONTEXT_NAME = "Anatomic codes - Medical SAM3"
CONTEXT_FILE = "SegmentationCategoryTypeModifier-MedicalSAM3.term.json"
REGION_CONTEXT_FILE = "AnatomicRegionAndModifier-MedicalSAM3.term.json"
#: The ``@schema`` URLs 3D Slicer accepts (vtkSlicerTerminologiesModuleLogic.cxx,
#: TERMINOLOGY_CONTEXT_SCHEMA_1 / REGION_CONTEXT_SCHEMA_1, 5.10 and 5.12).
CONTEXT_SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/segment-context-schema.json#"
REGION_CONTEXT_SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/anatomic-context-schema.json#"


def _code(item: Optional[dict]) -> str:
    return f"{item.get('scheme', 'SCT')}^{item['code']}^{item['meaning']}" if item else "^^"


def terminology_string(terminology: dict) -> str:
    """Slicer's serialized terminology entry for a prompt-dictionary terminology dict
    (:meth:`MedicalSAM3Core.common.prompts.Concept.terminology`).

    Seven ``~``-separated fields, each code as ``scheme^value^meaning`` (``^^`` when absent)::

        terminology context~category~type~type modifier~region context~region~region modifier

    This is the format of ``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry`` /
    ``DeserializeTerminologyEntry`` in Slicer 5.10 and 5.12 alike (no version prefix; the
    Terminologies logic is identical in both). The type modifier is ``terminology["type"]["modifier"]``
    (a laterality), the region modifier ``terminology["region"]["modifier"]``.
    """
    kind = terminology["type"]
    region = terminology.get("region")
    return "~".join([
        CONTEXT_NAME,
        _code(terminology["category"]),
        _code(kind),
        _code(kind.get("modifier")),
        REGION_CONTEXT_NAME if region else "",
        _code(region),
        _code(region.get("modifier") if region else None),
    ])


def _coded(term, color=None, label: Optional[str] = None) -> dict:
    """A context file's code item for a :class:`~MedicalSAM3Core.common.prompts.Terminology`
    (its own modifier, if any, is not part of it)."""
    item: dict = {"CodingSchemeDesignator": term.scheme, "CodeValue": term.code, "CodeMeaning": term.meaning}
    if term.scheme == "SCT":
        item["SNOMEDCTConceptID"] = term.code
    if color is not None:
        item["recommendedDisplayRGBValue"] = [int(c) for c in color]
    if label is not None:
        item["3dSlicerLabel"] = label
    return item


def slicer_label(concept) -> str:
    """The ``3dSlicerLabel`` of a concept in the shipped context (lower case, as in Slicer's lists):
    ``FindTypeInTerminologyBy3dSlicerLabel(CONTEXT_NAME, slicer_label(concept), entry)`` finds it
    unless its type is shared by concepts that differ only in their region (e.g. Neoplasm)."""
    return concept.name.lower()


def _key(term) -> tuple[str, str]:
    return term.scheme, term.code


def _load(dictionary):
    if dictionary is None:
        from .prompts import default_dictionary

        dictionary = default_dictionary()
    return dictionary


def context(dictionary=None) -> dict:
    """The terminology context (dcmqi segment-context schema) of the dictionary's concepts.

    One category per category used, one type per distinct type code; a concept whose type has a
    modifier becomes that modifier of the type, carrying the concept's color and label. A type used
    by one unmodified concept carries that concept's color and label; one shared by several (which
    then differ only in their anatomic region) carries neither.
    """
    categories: dict[tuple, dict] = {}
    for concept in _load(dictionary).concepts:
        category = categories.setdefault(_key(concept.category),
                                         {"term": concept.category, "types": {}, "regions": False})
        category["regions"] |= concept.region is not None
        kind = category["types"].setdefault(_key(concept.type), {"term": concept.type, "plain": [], "modifiers": {}})
        if kind["term"].meaning != concept.type.meaning:
            raise ValueError(f"prompt dictionary: type {concept.type.code} is {kind['term'].meaning!r} and "
                             f"{concept.type.meaning!r} ({concept.name!r})")
        modifier = concept.type.modifier
        if modifier is None:
            kind["plain"].append(concept)
        elif _key(modifier) in kind["modifiers"]:
            other = kind["modifiers"][_key(modifier)][1]
            raise ValueError(f"prompt dictionary: {concept.name!r} and {other.name!r} have the same type and modifier")
        else:
            kind["modifiers"][_key(modifier)] = (modifier, concept)

    out_categories = []
    for category in categories.values():
        item = _coded(category["term"])
        item["showAnatomy"] = category["regions"]  # Slicer shows the region selector for this category
        types = []
        for kind in category["types"].values():
            single = kind["plain"][0] if len(kind["plain"]) == 1 else None
            type_item = _coded(kind["term"], single.color if single else None, slicer_label(single) if single else None)
            if kind["modifiers"]:
                type_item["Modifier"] = [_coded(modifier, concept.color, slicer_label(concept))
                                         for modifier, concept in kind["modifiers"].values()]
            types.append(type_item)
        item["Type"] = types
        out_categories.append(item)
    return {"SegmentationCategoryTypeContextName": CONTEXT_NAME, "@schema": CONTEXT_SCHEMA,
            "SegmentationCodes": {"Category": out_categories}}


def region_context(dictionary=None) -> dict:
    """The region context (dcmqi anatomic-context schema) of the regions the concepts use."""
    regions: dict[tuple, dict] = {}
    for concept in _load(dictionary).concepts:
        region = concept.region
        if region is None:
            continue
        entry = regions.setdefault(_key(region), {"term": region, "modifiers": {}})
        if region.modifier is not None:
            entry["modifiers"].setdefault(_key(region.modifier), region.modifier)
    items = []
    for entry in regions.values():
        item = _coded(entry["term"])
        if entry["modifiers"]:
            item["Modifier"] = [_coded(modifier) for modifier in entry["modifiers"].values()]
        items.append(item)
    return {"AnatomicContextName": REGION_CONTEXT_NAME, "@schema": REGION_CONTEXT_SCHEMA,
            "AnatomicCodes": {"AnatomicRegion": items}}


def _text(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def context_files(dictionary=None) -> dict[str, str]:
    """File name -> generated text of the two context files (what ``Resources/`` must hold)."""
    dictionary = _load(dictionary)
    return {CONTEXT_FILE: _text(context(dictionary)), REGION_CONTEXT_FILE: _text(region_context(dictionary))}


def stale_files(directory: Optional[Path] = None, dictionary=None) -> list[str]:
    """Names of the context files in ``directory`` (default ``Resources/``) that differ from the
    generator's output (or are missing)."""
    directory = Path(directory) if directory else resources_dir()
    return [name for name, text in context_files(dictionary).items()
            if not (directory / name).is_file() or (directory / name).read_text(encoding="utf-8") != text]


def write_context_files(directory: Optional[Path] = None, dictionary=None) -> list[Path]:
    directory = Path(directory) if directory else resources_dir()
    written = []
    for name, text in context_files(dictionary).items():
        path = directory / name
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)
    return written


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m MedicalSAM3Core.common.terminology",
        description="Generate 3D Slicer terminology context files from the prompt dictionary.")
    parser.add_argument("--dictionary", type=Path, help="prompt dictionary (default: Resources/prompts.json)")
    parser.add_argument("--output-dir", type=Path, help="where the .term.json files go (default: Resources/)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files are stale")
    args = parser.parse_args(list(argv) if argv is not None else None)
    dictionary = None
    if args.dictionary:
        from .prompts import PromptDictionary

        dictionary = PromptDictionary.load(args.dictionary)
    if args.check:
        stale = stale_files(args.output_dir, dictionary)
        for name in stale:
            print(f"stale: {name} (regenerate with python -m MedicalSAM3Core.common.terminology)", file=sys.stderr)
        return 1 if stale else 0
    for path in write_context_files(args.output_dir, dictionary):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
