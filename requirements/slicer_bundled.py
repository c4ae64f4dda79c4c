"""Write ``requirements/slicer-bundled-X.Y.txt``: what 3D Slicer X.Y installs into its own Python.

Read from Slicer's source (a clone of https://github.com/Slicer/Slicer, bare or not; its release
branches ``5.10``, ``5.12``, ... or ``origin/5.10``, ...):

* every ``name==version`` pin of the pip requirements blocks in ``SuperBuild/External_python-*.cmake``
  (numpy, scipy, requests, the DICOM, PythonQt and extension-manager requirements with all their
  dependencies: Slicer installs them with ``pip install --require-hashes``, so the list is complete);
* what the SuperBuild builds itself rather than installing from PyPI, marked ``# built``: VTK (it
  writes a ``vtk-X.Y.Z.dist-info`` so that pip sees it; the version is that of the default VTK) and,
  before Slicer 5.12, SimpleITK (built from Slicer's fork and installed with ``pip install .``: the
  version its build reports, e.g. ``2.2.0rc2.dev368``, is not in the source, so only the name is kept);
* the Python version (``Slicer_REQUIRED_PYTHON_VERSION``), on a ``# python:`` line.

The Slicer branch commit is recorded in the header. The module's installer never lets pip change these
packages (``MedicalSAM3Slicer/MedicalSAM3Lib/dependencies.py``), and ``requirements/lock.py`` resolves
``requirements/constraints-slicer-X.Y.txt`` around them. Run through ``make lock SLICER_GIT=<clone>``
(or ``python requirements/slicer_bundled.py --slicer-git <clone>``) when a supported Slicer changes;
``dependencies.SLICER_VERSIONS`` lists the supported ones.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canonical

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "requirements"
sys.path.insert(0, str(REPO / "MedicalSAM3Slicer"))  # the module's installer: one list of what Slicer needs
from MedicalSAM3Lib import dependencies  # noqa: E402

_BLOCK = re.compile(r"\[===\[(.*?)\]===\]", re.S)
_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*\s*(?:\[[^\]]*\])?\s*==[^\\]*?)\s*(?:--hash\S*|\\|$)")


@dataclass
class Record:
    """What one Slicer version ships in its Python."""
    version: str                       # "5.12"
    commit: str                        # of the branch that was read
    date: str                          # the commit's date, YYYY-MM-DD
    python: str                        # "3.12.10"
    pins: dict = field(default_factory=dict)   # canonical name -> (requirement line, source file)
    built: dict = field(default_factory=dict)  # canonical name -> (version or None, note: "built by ...")


def pip_pins(text: str) -> list[Requirement]:
    """The ``name==version`` requirements of the pip requirements blocks (``[===[ ... ]===]``) of a
    ``External_python-*.cmake`` file, with their environment markers."""
    found = []
    for block in _BLOCK.findall(text):
        for line in block.splitlines():
            match = _PIN.match(line)
            if match and not line.lstrip().startswith("#"):
                requirement = Requirement(match.group(1).strip())
                if not any(s.operator == "==" for s in requirement.specifier):
                    raise ValueError(f"not an exact pin: {line.strip()!r}")
                found.append(requirement)
    return found


def python_version(cmakelists: str) -> str:
    match = re.search(r'set\(Slicer_REQUIRED_PYTHON_VERSION\s+"([0-9.]+)"\)', cmakelists)
    if match is None:
        raise ValueError("Slicer_REQUIRED_PYTHON_VERSION not found in CMakeLists.txt")
    return match.group(1)


def vtk_version(cmakelists: str, external_vtk: str) -> str:
    """The version of the ``vtk-X.Y.Z.dist-info`` that the SuperBuild writes for its default VTK."""
    major = re.search(r'set\(_default_vtk_major_version\s+"(\d+)"\)', cmakelists)
    minor = re.search(r'set\(_default_vtk_minor_version\s+"(\d+)"\)', cmakelists)
    if major is None or minor is None:
        raise ValueError("the default VTK version is not in CMakeLists.txt")
    default = re.escape(f"{major.group(1)}.{minor.group(1)}")
    branch = re.search(r'STREQUAL\s+"' + default + r'"\)(.*?)(?:elseif|else\(|endif)', external_vtk, re.S)
    version = branch and re.search(r'set\(vtk_dist_info_version\s+"([^"]+)"\)', branch.group(1))
    if not version:
        raise ValueError(f"no vtk_dist_info_version for VTK {major.group(1)}.{minor.group(1)} in External_VTK.cmake")
    return version.group(1)


def simpleitk_tag(external_simpleitk: str) -> str:
    """The ``slicer-vX.Y.Z-...`` tag named beside the GIT_TAG of Slicer's SimpleITK fork."""
    match = re.search(r'Slicer_\$\{proj\}_GIT_TAG\s*\n\s*"[0-9a-f]+"\s*#\s*(\S+)', external_simpleitk)
    if match is None:
        raise ValueError("the SimpleITK GIT_TAG is not in External_SimpleITK.cmake")
    return match.group(1)


class Git:
    """Read files of a Slicer clone (bare or not) at a ref."""

    def __init__(self, path):
        self.path = str(path)

    def _run(self, *args) -> str:
        return subprocess.run(["git", "-C", self.path, *args], check=True, capture_output=True, text=True).stdout

    def resolve(self, version: str) -> str:
        for ref in (version, f"origin/{version}", f"refs/remotes/origin/{version}"):
            done = subprocess.run(["git", "-C", self.path, "rev-parse", "--verify", "--quiet", ref + "^{commit}"],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return done.stdout.strip()
        raise SystemExit(f"{self.path} has no branch {version} (nor origin/{version})")

    def date(self, commit: str) -> str:
        return self._run("show", "-s", "--format=%cs", commit).strip()

    def files(self, commit: str, folder: str) -> list[str]:
        return self._run("ls-tree", "--name-only", commit, folder + "/").split()

    def show(self, commit: str, path: str) -> str:
        return self._run("show", f"{commit}:{path}")


def collect(git: Git, version: str, commit: str | None = None) -> Record:
    """What Slicer ``version`` (its branch head, or ``commit``) installs into its Python."""
    commit = commit or git.resolve(version)
    cmakelists = git.show(commit, "CMakeLists.txt")
    record = Record(version, commit, git.date(commit), python_version(cmakelists))
    superbuild = git.files(commit, "SuperBuild")
    for path in sorted(p for p in superbuild if re.fullmatch(r"SuperBuild/External_python-.*\.cmake", p)):
        for requirement in pip_pins(git.show(commit, path)):
            name = canonical(requirement.name)
            line = f"{name}{requirement.specifier}" + (f" ; {requirement.marker}" if requirement.marker else "")
            if name in record.pins and record.pins[name][0] != line:
                raise ValueError(f"Slicer {version} pins {name} twice: {record.pins[name][0]} and {line} ({path})")
            record.pins.setdefault(name, (line, Path(path).name))
    if "SuperBuild/External_VTK.cmake" in superbuild:
        record.built["vtk"] = (vtk_version(cmakelists, git.show(commit, "SuperBuild/External_VTK.cmake")),
                               "built by External_VTK.cmake, which writes a vtk dist-info for pip")
    if "simpleitk" not in record.pins and "SuperBuild/External_SimpleITK.cmake" in superbuild:
        tag = simpleitk_tag(git.show(commit, "SuperBuild/External_SimpleITK.cmake"))
        record.built["simpleitk"] = (None, f"built by External_SimpleITK.cmake from Slicer's fork ({tag}); "
                                           "the version its build reports is not in the source")
    clash = set(record.pins) & set(record.built)
    if clash:
        raise ValueError(f"both pip-installed and built in Slicer {version}: {sorted(clash)}")
    return record


def render(record: Record) -> str:
    lines = [
        f"# What 3D Slicer {record.version} installs into its own Python: written by requirements/slicer_bundled.py",
        f"# from Slicer's source, branch {record.version} at {record.commit} ({record.date}):",
        "# the pins of the pip requirements blocks in SuperBuild/External_python-*.cmake, and what the",
        "# SuperBuild builds itself (marked built). The Medical SAM3 module never lets pip change these;",
        f"# make lock resolves requirements/constraints-slicer-{record.version}.txt around them. Do not edit by hand.",
        f"# python: {record.python}",
    ]
    for name in sorted(record.pins):
        line, source = record.pins[name]
        lines.append(f"{line}  # {source}")
    for name in sorted(record.built):
        version, note = record.built[name]
        lines.append(f"{name}=={version}  # {note}" if version else f"{name}  # {note}")
    return "\n".join(lines) + "\n"


def output_path(version: str, folder: Path = FOLDER) -> Path:
    return Path(folder) / f"slicer-bundled-{version}.txt"


def recorded_commit(path: Path) -> str:
    """The Slicer commit a ``slicer-bundled-X.Y.txt`` was written from."""
    match = re.search(r"^# from Slicer's source, branch \S+ at ([0-9a-f]{40}) ", Path(path).read_text(), re.M)
    if match is None:
        raise ValueError(f"{path}: no Slicer commit in the header")
    return match.group(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slicer-git", type=Path, default=os.environ.get("SLICER_GIT"),
                        help="a clone of Slicer's repository (default: $SLICER_GIT)")
    parser.add_argument("--versions", nargs="+", default=list(dependencies.SLICER_VERSIONS))
    parser.add_argument("--output-dir", type=Path, default=FOLDER)
    args = parser.parse_args(argv)
    if args.slicer_git is None:
        parser.error("--slicer-git (or SLICER_GIT) is required")
    git = Git(args.slicer_git)
    for version in args.versions:
        record = collect(git, version)
        path = output_path(version, args.output_dir)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(render(record))
        os.replace(partial, path)
        print(f"{path}: Slicer {version} at {record.commit[:10]}, Python {record.python}: "
              f"{len(record.pins)} pip-installed, built: {', '.join(sorted(record.built))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
