"""SNOMED CT terminology of a segment in 3D Slicer's string form (torch-free; used by the
.seg.nrrd writer and the Slicer module)."""

from __future__ import annotations


def terminology_string(terminology: dict) -> str:
    """Slicer's terminology entry string (``category~type~modifier~region~region modifier``, each
    ``scheme^code^meaning``) for a prompt-dictionary terminology dict."""
    category, kind = terminology["category"], terminology["type"]
    term = (f"Segmentation category and type - 3D Slicer General Anatomy list~"
            f"{category['scheme']}^{category['code']}^{category['meaning']}~"
            f"{kind['scheme']}^{kind['code']}^{kind['meaning']}~^^~")
    region = terminology.get("region")
    region_code = f"{region['scheme']}^{region['code']}^{region['meaning']}" if region else "^^"
    term += f"Anatomic codes - DICOM master list~{region_code}~^^"
    return term
