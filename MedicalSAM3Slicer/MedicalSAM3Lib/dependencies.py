"""Python packages each backend needs inside 3D Slicer, and installing them after the user agrees.

* remote backend: nothing beyond Slicer's own Python (numpy, requests); ``zstandard`` is optional
  (faster uploads; without it the wire format falls back to gzip).
* local backend: the engine's dependencies. PyTorch is installed through the PyTorch extension
  (``PyTorchUtils``), which picks the build that matches the computer's GPU driver; the rest with pip.

Nothing is installed at import time: :func:`ensure` is called when the user presses Apply (or
"Install dependencies") and asks ``confirm`` first. The requirement strings match the engine's
``pyproject.toml`` (a test keeps them in step).
"""

from __future__ import annotations

from importlib import metadata
from typing import Callable, Optional, Sequence

#: The engine's requirements that 3D Slicer's Python does not already satisfy (numpy, requests and
#: SimpleITK ship with Slicer; torch is handled by :data:`TORCH`).
LOCAL_REQUIREMENTS = (
    "scipy>=1.10",
    "transformers>=5.0,<6",
    "huggingface_hub>=0.34",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "zstandard>=0.22",
    "fastapi>=0.110",
    "uvicorn>=0.29",
)
REMOTE_OPTIONAL = ("zstandard>=0.22",)
TORCH = "torch>=2.4"

def satisfied(requirement: str, installed: Optional[str]) -> bool:
    """Whether ``installed`` (a version string, None = not installed) meets ``requirement``
    (a PEP 508 requirement such as ``transformers>=5.0,<6``; ``packaging`` ships with Slicer)."""
    from packaging.requirements import Requirement

    return installed is not None and Requirement(requirement).specifier.contains(installed, prereleases=True)


def installed_version(requirement: str) -> Optional[str]:
    from packaging.requirements import Requirement

    try:
        return metadata.version(Requirement(requirement).name)
    except metadata.PackageNotFoundError:
        return None


def missing(requirements: Sequence[str], version_of: Callable[[str], Optional[str]] = installed_version) -> list[str]:
    """The requirements not met by what is installed, in order."""
    return [r for r in requirements if not satisfied(r, version_of(r))]


def ensure(backend: str, confirm: Callable[[list[str]], bool], pip_install: Callable[[str], None],
           install_torch: Optional[Callable[[str], bool]] = None,
           version_of: Callable[[str], Optional[str]] = installed_version) -> list[str]:
    """Install what ``backend`` ('local' or 'remote') lacks, after ``confirm(list)`` returns True.

    ``pip_install(requirement)`` is ``slicer.util.pip_install`` inside Slicer; ``install_torch(spec)``
    installs PyTorch through the PyTorch extension and returns False when that is impossible.
    Returns what was installed; raises :class:`RuntimeError` naming what is missing when the user
    declines (nothing is installed then).
    """
    if backend == "remote":
        wanted, required = list(REMOTE_OPTIONAL), []
    elif backend == "local":
        wanted = [TORCH, *LOCAL_REQUIREMENTS]
        required = wanted
    else:
        raise ValueError(f"unknown backend {backend!r}")
    todo = missing(wanted, version_of)
    if not todo:
        return []
    if not confirm(todo):
        needed = [r for r in todo if r in required]
        if needed:
            raise RuntimeError("the local engine needs these Python packages: " + ", ".join(needed)
                               + ". Install them (Apply asks again) or use a remote server.")
        return []
    installed = []
    for requirement in todo:
        if requirement == TORCH:
            if install_torch is None or not install_torch(requirement[len("torch"):]):
                raise RuntimeError("PyTorch could not be installed: install the 'PyTorch' extension from the "
                                   "Extensions Manager, restart Slicer and try again")
        else:
            pip_install(requirement)
        installed.append(requirement)
    return installed
