"""What the Slicer side imports (prompt dictionary, volume/result types, options, wire format,
client) must not pull in torch, transformers or SimpleITK."""

import subprocess
import sys


def test_common_package_imports_without_torch_or_simpleitk():
    code = (
        "import sys\n"
        "import MedicalSAM3Core, MedicalSAM3Core.common.prompts, MedicalSAM3Core.common.result,\\\n"
        "    MedicalSAM3Core.common.volume, MedicalSAM3Core.common.progress, MedicalSAM3Core.common.errors,\\\n"
        "    MedicalSAM3Core.common.options, MedicalSAM3Core.common.wire, MedicalSAM3Core.common.client,\\\n"
        "    MedicalSAM3Core.common.interaction, MedicalSAM3Core.common.remote_session\n"
        "bad = [m for m in ('torch', 'transformers', 'SimpleITK') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"torch-free modules imported: {out.stdout.strip()}"


def test_slicer_scene_logic_imports_without_torch():
    """The Slicer module's scene logic must work in a Slicer without PyTorch (remote backend)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(repo / 'MedicalSAM3Slicer')!r})\n"
        "import MedicalSAM3Lib.scene, MedicalSAM3Lib.backends, MedicalSAM3Lib.dependencies\n"
        "print(','.join(m for m in ('torch', 'transformers', 'SimpleITK') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "", f"torch-free modules imported: {out.stdout.strip()}"
