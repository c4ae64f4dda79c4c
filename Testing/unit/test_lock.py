"""requirements/lock.py: what it keeps of uv's resolution, and the committed lock it wrote."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("lock", REPO / "requirements" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)

UV_OUTPUT = """\
filelock==4.3.2
    # via
    #   huggingface-hub
    #   torch
huggingface-hub==2.4.0
    # via medical-sam3 (pyproject.toml)
mpmath==1.3.0
    # via sympy
numpy==2.4.6
    # via
    #   medical-sam3 (pyproject.toml)
    #   torchvision
nvidia-cublas==13.1.1.3 ; sys_platform == 'linux'
    # via torch
sympy==1.14.0
    # via torch
torch==2.14.1
    # via
    #   -c /tmp/torch.txt
    #   medical-sam3 (pyproject.toml)
    #   torchvision
torchvision==0.29.1
    # via -c /tmp/torch.txt
Typing_Extensions==4.16.0 ; python_full_version < '3.15'
    # via
    #   huggingface-hub
    #   torch
"""


def test_the_torch_stack_is_left_out_and_everything_shared_is_kept():
    entries = lock.parse_compiled(UV_OUTPUT)
    assert [name for name, _, _ in entries] == ["filelock", "huggingface-hub", "mpmath", "numpy", "nvidia-cublas",
                                                "sympy", "torch", "torchvision", "typing-extensions"]
    assert entries[-1][1] == "Typing_Extensions==4.16.0 ; python_full_version < '3.15'"  # markers kept as written
    kept, dropped = lock.drop_torch_stack(entries)
    assert dropped == ["mpmath", "nvidia-cublas", "sympy", "torch", "torchvision"]  # mpmath: only via sympy
    assert [name for name, _, _ in kept] == ["filelock", "huggingface-hub", "numpy", "typing-extensions"]
    text = lock.render(kept, ["torch==2.14.1", "torchvision==0.29.1"], dropped, "uv pip compile ...", "2026-12-06")
    assert "\nnumpy==2.4.6\n    # via medical-sam3 (pyproject.toml), torchvision\n" in text
    assert all(line.startswith("#") for line in text.splitlines()[:6])


def test_the_committed_lock_pins_everything_but_the_torch_build():
    text = (REPO / "requirements" / "constraints.txt").read_text()
    requirements = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert requirements and all("==" in line for line in requirements)
    names = {lock.canonical(line.split("==")[0]) for line in requirements}
    assert not names & {"torch", "torchvision", "triton", "sympy"} and not any(n.startswith("nvidia-") for n in names)
    assert {"transformers", "huggingface-hub", "tokenizers", "numpy", "scipy", "simpleitk"} <= names
