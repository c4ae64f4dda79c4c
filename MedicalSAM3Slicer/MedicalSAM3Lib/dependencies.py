"""Python packages each backend needs inside 3D Slicer, and installing them after the user agrees.

* remote backend, or the local backend with an engine Python of its own (the *Engine Python*
  setting): nothing beyond Slicer's own Python (numpy, requests); ``zstandard`` is optional (faster
  transfers; without it the wire format falls back to gzip), and once declined it is not offered
  again on Apply (the caller remembers :attr:`Installed.declined`; "Install dependencies" asks again).
* local backend in Slicer's own Python: the engine's dependencies. PyTorch is installed through the
  PyTorch extension (``PyTorchUtils``), which picks the build that matches the computer's GPU driver;
  the rest with pip.

Nothing is installed at import time, and nothing here imports Qt or Slicer: :func:`ensure` is called
when the user presses Apply (or "Install dependencies"), asks ``confirm`` first and is given Slicer's
pip functions. What pip installs is held to a resolution made for the running Slicer:
``requirements/constraints-slicer-X.Y.txt`` (``make lock``: the packages below resolved for Slicer's
Python with Slicer's own packages fixed at the versions it ships, the versions the test suite ran with
preferred where they fit). The packages Slicer ships are read from ``requirements/slicer-bundled-X.Y.txt``
(written from Slicer's source by ``requirements/slicer_bundled.py``); each one installed is handed to
pip as a constraint at the version installed right now, as is the PyTorch extension's torch build, so
pip never changes them: Slicer's own modules were built and tested against its copies (SimpleITK, VTK
and numpy are binary builds). The extension ships these files next to the engine
(:func:`requirements_folder`).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from packaging.utils import canonicalize_name as canonical  # ships with Slicer

from .compatibility import SUPPORTED, version_text

log = logging.getLogger(__name__)

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
#: The PyTorch extension's build: held at its installed versions like Slicer's own packages.
TORCH_BUILD = ("torch", "torchvision", "torchaudio")
#: The Slicer releases ``make lock`` resolves for (``requirements/constraints-slicer-X.Y.txt`` and
#: ``requirements/slicer-bundled-X.Y.txt`` each): the supported ones; another Slicer gets the newest one's files.
SLICER_VERSIONS = tuple(version_text(version) for version in SUPPORTED)
REQUESTER = "Medical SAM3"

CONSTRAINTS = Path("requirements") / "constraints.txt"


def requirements_folder() -> Optional[Path]:
    """``requirements/`` next to the engine package: in the source tree the repository root, in the
    installed extension the scripted-modules folder that holds ``MedicalSAM3Core`` (CMakeLists.txt
    ships the files there). None when it is missing."""
    spec = find_spec("MedicalSAM3Core")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).resolve().parents[1] / CONSTRAINTS.parent
    return path if path.is_dir() else None


def _version_key(version: str) -> tuple:
    return tuple(int(p) for p in version.split("."))


def supported_slicer(version: Optional[str]) -> str:
    """The Slicer version whose files apply to Slicer ``version`` ("5.12"): itself when it is one of
    :data:`SLICER_VERSIONS`, else the newest of them."""
    return version if version in SLICER_VERSIONS else max(SLICER_VERSIONS, key=_version_key)


def _file(name: str) -> Optional[Path]:
    folder = requirements_folder()
    path = folder / name if folder is not None else None
    return path if path is not None and path.is_file() else None


def constraints_path(slicer_version: Optional[str] = None) -> Optional[Path]:
    """The resolution made for Slicer ``slicer_version`` (``requirements/constraints-slicer-X.Y.txt``;
    see :func:`supported_slicer`), or with None the project lock ``requirements/constraints.txt`` (the
    versions the test suite runs with). None when the file is missing."""
    if slicer_version is None:
        return _file(CONSTRAINTS.name)
    return _file(f"constraints-slicer-{supported_slicer(slicer_version)}.txt")


def bundled_path(slicer_version: str) -> Optional[Path]:
    """``requirements/slicer-bundled-X.Y.txt`` for Slicer ``slicer_version`` (:func:`supported_slicer`)."""
    return _file(f"slicer-bundled-{supported_slicer(slicer_version)}.txt")


def read_bundled(path) -> tuple[dict, frozenset]:
    """A ``slicer-bundled-X.Y.txt``: ``({canonical name: version or None}, names Slicer builds itself)``;
    the version is None where the source does not say it (SimpleITK built before Slicer 5.12)."""
    from packaging.requirements import Requirement

    versions, built = {}, set()
    for raw in Path(path).read_text().splitlines():
        line, _, comment = raw.partition("#")
        if not line.strip():
            continue
        requirement = Requirement(line.strip())
        name = canonical(requirement.name)
        exact = [s.version for s in requirement.specifier if s.operator == "=="]
        versions[name] = exact[0] if exact else None
        if comment.strip().startswith("built"):
            built.add(name)
    return versions, frozenset(built)


def bundled_names(versions: Iterable[str] = SLICER_VERSIONS) -> frozenset:
    """The canonical names of what any supported Slicer ships in its Python (empty when the files are
    missing)."""
    names = set()
    for version in versions:
        path = _file(f"slicer-bundled-{version}.txt")
        if path is not None:
            names |= set(read_bundled(path)[0])
    return frozenset(names)


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


def _name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return canonical(Requirement(requirement).name)


def pinned(requirement: str, pins: dict, bundled: Iterable[str] = frozenset()) -> str:
    """``requirement`` as the resolved ``name==version`` when ``pins`` has a version inside its range
    and the package is not one of Slicer's own (``bundled``), else ``requirement`` unchanged."""
    from packaging.requirements import Requirement

    parsed = Requirement(requirement)
    name = canonical(parsed.name)
    version = pins.get(name)
    if version is None or name in bundled or not parsed.specifier.contains(version, prereleases=True):
        return requirement
    return f"{parsed.name}=={version}"


def constraint(name: str, version: str) -> str:
    """``name==version``, or ``name===version`` for a version string that is not PEP 440."""
    from packaging.version import InvalidVersion, Version

    try:
        Version(version)
    except InvalidVersion:
        return f"{name}==={version}"
    return f"{name}=={version}"


def write_constraints(pins: dict, held: dict, folder) -> Path:
    """The constraints file pip gets, in ``folder``: ``pins`` (the resolution for this Slicer), with
    the packages in ``held`` (Slicer's own and the torch build: ``{name: installed version}``) at
    those versions instead."""
    path = Path(folder) / "medicalsam3-constraints.txt"
    merged = {**{n: v for n, v in pins.items() if n not in held}, **held}
    path.write_text("\n".join(constraint(n, v) for n, v in sorted(merged.items())) + "\n")
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


@dataclass(frozen=True)
class Installed:
    """What :func:`ensure` did: the requirements it installed, and the canonical names of the
    optional packages the user declined this time."""
    installed: tuple = ()
    declined: tuple = ()

    def remembered(self, previous: Iterable[str] = ()) -> list[str]:
        """The declined packages to remember from now on: ``previous`` ones not installed now, and
        the newly declined ones."""
        installed = {_name(r) for r in self.installed}
        return sorted({canonical(n) for n in previous} - installed | set(self.declined))


def ensure(backend: str, confirm: Callable[[list[str]], bool], pip_install: Callable[[list[str]], None],
           install_torch: Optional[Callable[[str], bool]] = None,
           version_of: Callable[[str], Optional[str]] = installed_version,
           constraints: Optional[Path] = None, *, slicer_version: Optional[str] = None, packaging=None,
           bundled: Optional[Iterable[str]] = None, declined: Iterable[str] = frozenset(),
           ask_declined: bool = False, engine_python_is_slicer: bool = True) -> Installed:
    """Install what ``backend`` ('local' or 'remote') lacks in Slicer's Python, after ``confirm(list)``
    returns True.

    * ``slicer_version`` ("5.12", the running Slicer's major.minor) picks
      ``requirements/constraints-slicer-X.Y.txt`` (the newest one, with a log line, for a Slicer not in
      :data:`SLICER_VERSIONS`); ``constraints`` overrides it. A package the engine needs is wanted at the
      version resolved there (``transformers==5.25.0``, not any ``>=5.0,<6``).
    * ``bundled``: the names of Slicer's own packages (default: :func:`bundled_names`). They are never
      installed or upgraded: each one installed is a constraint at its installed version (as is the torch
      build); one that is too old for the engine raises :class:`RuntimeError` instead.
    * pip runs once: with ``packaging`` (``slicer.packaging``, Slicer >= 5.12) as
      ``packaging.pip_install(requirements, constraints=FILE, requester="Medical SAM3")``, else as
      ``pip_install([*requirements, "-c", FILE])`` (``slicer.util.pip_install`` of Slicer 5.10; a list, so
      a path with spaces stays one argument). ``install_torch(spec)`` installs PyTorch through the PyTorch
      extension and returns False when that is impossible.
    * ``engine_python_is_slicer=False`` (the local engine runs in another Python): only what Slicer's side
      of the connection uses is offered, as for the remote backend; torch and transformers stay out.
    * ``declined``: canonical names of optional packages the user declined before; they are not offered
      again unless ``ask_declined``.

    Returns :class:`Installed`; raises :class:`RuntimeError` naming what is missing when the user declines
    a required package (nothing is installed then).
    """
    if backend not in ("local", "remote"):
        raise ValueError(f"unknown backend {backend!r}")
    engine_here = backend == "local" and engine_python_is_slicer
    required = [TORCH, *LOCAL_REQUIREMENTS] if engine_here else []
    optional = [] if engine_here else list(REMOTE_OPTIONAL)
    chosen = Path(constraints) if constraints is not None else constraints_path(supported_slicer(slicer_version))
    pins = tested_versions(chosen) if chosen is not None else {}
    bundled = bundled_names() if bundled is None else frozenset(canonical(n) for n in bundled)
    declined = {canonical(n) for n in declined}
    wanted = [(pinned(r, pins, bundled), r in optional) for r in required + optional]
    todo = [(r, opt) for r, opt in wanted if not satisfied(r, version_of(r))
            and (ask_declined or not opt or _name(r) not in declined)]
    if not todo:
        return Installed()
    own = [r for r, _ in todo if _name(r) in bundled]
    if own:
        raise RuntimeError("3D Slicer's own " + ", ".join(f"{_name(r)} {version_of(r) or '(missing)'}" for r in own)
                           + " does not meet " + ", ".join(own) + ": Medical SAM3 does not replace Slicer's "
                           "packages. Use a newer Slicer, or set Engine Python to an environment with the "
                           "engine installed.")
    if chosen is None or not bundled:
        raise RuntimeError("the extension's requirements/ files (constraints-slicer-*.txt, slicer-bundled-*.txt) "
                           "are missing: reinstall the Medical SAM3 extension")
    if constraints is None and slicer_version not in SLICER_VERSIONS:
        log.warning("Slicer %s is not one of the versions Medical SAM3's installer was resolved for (%s): "
                    "using the resolution for Slicer %s (%s)", slicer_version or "(version unknown)",
                    ", ".join(SLICER_VERSIONS), supported_slicer(slicer_version), chosen.name)
    asked = [r for r, _ in todo]
    if not confirm(asked):
        needed = [r for r, opt in todo if not opt]
        if needed:
            raise RuntimeError("the local engine needs these Python packages: " + ", ".join(needed)
                               + ". Install them (Apply asks again) or use a remote server.")
        return Installed(declined=tuple(_name(r) for r in asked))
    installed = [r for r in asked if _name(r) == "torch"]
    if installed and (install_torch is None or not install_torch(installed[0][len("torch"):])):
        raise RuntimeError("PyTorch could not be installed: install the 'PyTorch' extension from the "
                           "Extensions Manager, restart Slicer and try again")
    rest = [r for r in asked if _name(r) != "torch"]
    if rest:
        held = {}
        for name in sorted(bundled | set(TORCH_BUILD)):
            version = version_of(name)
            if version is not None:
                held[name] = version
        with tempfile.TemporaryDirectory() as folder:
            path = str(write_constraints(pins, held, folder))
            if packaging is not None:
                packaging.pip_install(rest, constraints=path, requester=REQUESTER)
            else:
                pip_install([*rest, "-c", path])
        installed += rest
    return Installed(installed=tuple(installed))
