"""Python packages each backend needs inside 3D Slicer, and installing them after the user agrees.

* remote backend: nothing beyond Slicer's own Python (numpy, requests); ``zstandard`` is optional
  (faster uploads; without it the wire format falls back to gzip).
* local backend: the engine's dependencies. PyTorch is installed through the PyTorch extension
  (``PyTorchUtils``), which picks the build that matches the computer's GPU driver; the rest with pip.

Nothing is installed at import time: :func:`ensure` is called when the user presses Apply (or
"Install dependencies") and asks ``confirm`` first. The requirement strings match the engine's
``pyproject.toml`` (a test keeps them in step), and what pip installs is held to the versions the
project's test suite passed with: ``requirements/constraints.txt``, which the extension ships next
to the engine (:func:`constraints_path`). The pins of packages Slicer itself ships
(:data:`SLICER_BUNDLED`) are not passed to pip, so the lock never swaps Slicer's copies for the
tested ones (Slicer's own modules were built and tested against its copies); pip still upgrades
one where a new package needs a newer version (with the 2026-12-06 lock: typing_extensions, idna).
"""

from __future__ import annotations

import tempfile
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Optional, Sequence

from packaging.utils import canonicalize_name as canonical  # ships with Slicer

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

#: What 3D Slicer installs into its own Python, as the ``SuperBuild/External_python-*.cmake`` files
#: of Slicer's 5.10 and 5.12 branches list it (numpy, scipy, requests, the DICOM and extension-manager
#: requirements and their dependencies), plus SimpleITK (built with Slicer): pinned versions of these
#: are not passed to pip, so the lock never swaps Slicer's own copies for the tested ones.
SLICER_BUNDLED = frozenset({
    "certifi", "cffi", "chardet", "charset-normalizer", "couchdb", "cryptography", "dcmqi", "deprecated",
    "dicomweb-client", "gitdb", "gitpython", "highdicom", "idna", "numpy", "packaging", "pillow", "pip",
    "pycparser", "pydicom", "pygithub", "pyjpegls", "pyjwt", "pynacl", "pyparsing", "python-dateutil",
    "requests", "retrying", "scipy", "setuptools", "simpleitk", "six", "smmap", "typing-extensions",
    "urllib3", "wheel", "wrapt",
})

CONSTRAINTS = Path("requirements") / "constraints.txt"


def constraints_path() -> Optional[Path]:
    """``requirements/constraints.txt`` next to the engine package: in the source tree the
    repository root, in the installed extension the scripted-modules folder that holds
    ``MedicalSAM3Core`` (CMakeLists.txt ships it there). None when it is missing."""
    spec = find_spec("MedicalSAM3Core")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).resolve().parents[1] / CONSTRAINTS
    return path if path.is_file() else None


def tested_versions(path: Path) -> dict:
    """``{canonical name: version}`` of the ``name==version`` pins in a constraints file that apply
    to this Python and platform (environment markers evaluated)."""
    from packaging.requirements import Requirement

    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        exact = [s.version for s in requirement.specifier if s.operator == "=="]
        if exact:
            pins[canonical(requirement.name)] = exact[0]
    return pins


def pinned(requirement: str, pins: dict) -> str:
    """``requirement`` as the tested ``name==version`` when ``pins`` has a version inside its range
    (and Slicer does not ship the package), else ``requirement`` unchanged."""
    from packaging.requirements import Requirement

    parsed = Requirement(requirement)
    name = canonical(parsed.name)
    version = pins.get(name)
    if version is None or name in SLICER_BUNDLED or not parsed.specifier.contains(version, prereleases=True):
        return requirement
    return f"{parsed.name}=={version}"


def write_slicer_constraints(pins: dict, folder) -> Path:
    """A constraints file in ``folder`` with ``pins`` less the packages Slicer ships."""
    path = Path(folder) / "medicalsam3-constraints.txt"
    lines = [f"{name}=={version}" for name, version in sorted(pins.items()) if name not in SLICER_BUNDLED]
    path.write_text("\n".join(lines) + "\n")
    return path


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


def ensure(backend: str, confirm: Callable[[list[str]], bool], pip_install: Callable[[list[str]], None],
           install_torch: Optional[Callable[[str], bool]] = None,
           version_of: Callable[[str], Optional[str]] = installed_version,
           constraints: Optional[Path] = None) -> list[str]:
    """Install what ``backend`` ('local' or 'remote') lacks, after ``confirm(list)`` returns True.

    With a ``constraints`` file (default: :func:`constraints_path`), a package the engine needs is
    wanted at its tested version (``transformers==5.25.0``, not any ``>=5.0,<6``) and pip resolves
    everything it pulls in under the same pins, less Slicer's own packages. ``pip_install(args)`` is
    ``slicer.util.pip_install`` inside Slicer, given a list of pip arguments (the requirements, then
    ``-c FILE``; a list, so a path with spaces stays one argument: Slicer 5.10 and 5.12 both take
    one); ``install_torch(spec)`` installs PyTorch through the PyTorch extension and returns False
    when that is impossible. Returns what was installed; raises :class:`RuntimeError` naming what is
    missing when the user declines (nothing is installed then).
    """
    if backend == "remote":
        wanted, required = list(REMOTE_OPTIONAL), []
    elif backend == "local":
        wanted = [TORCH, *LOCAL_REQUIREMENTS]
        required = wanted
    else:
        raise ValueError(f"unknown backend {backend!r}")
    constraints = constraints_path() if constraints is None else constraints
    pins = tested_versions(constraints) if constraints is not None else {}
    wanted = [pinned(r, pins) for r in wanted]
    required = [pinned(r, pins) for r in required]
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
    if TORCH in todo:
        if install_torch is None or not install_torch(TORCH[len("torch"):]):
            raise RuntimeError("PyTorch could not be installed: install the 'PyTorch' extension from the "
                               "Extensions Manager, restart Slicer and try again")
        installed.append(TORCH)
    rest = [r for r in todo if r != TORCH]
    if rest:
        with tempfile.TemporaryDirectory() as folder:
            pip_install(rest + (["-c", str(write_slicer_constraints(pins, folder))] if pins else []))
        installed += rest
    return installed
