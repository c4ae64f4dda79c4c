"""Write ``requirements/constraints.txt``: the versions ``make test`` installs and CI tests.

Run through ``make lock`` (which installs uv into the project's venv first). It resolves the
newest versions that ``pyproject.toml`` allows (its dependencies and its ``dev``, ``train``,
``convert`` and ``dicom`` extras) with ``uv pip compile``: one version per package for every platform and every
CPython from 3.11 (``--universal --fork-strategy fewest``), resolved around the torch and
torchvision of the environment it runs in (the build the tests ran with). torch, torchvision and the
packages only they need (CUDA libraries, triton, sympy, ...) are then left out of the file: their
builds differ per platform and GPU, and a user's own torch (pytorch.org's CUDA builds, Slicer's
PyTorch extension) must not be fought over. Everything else is pinned ``==``.

Then, for each 3D Slicer in ``dependencies.SLICER_VERSIONS``, ``requirements/constraints-slicer-X.Y.txt``:
what the Slicer module installs into that Slicer's Python (``dependencies.LOCAL_REQUIREMENTS``; PyTorch
comes from the PyTorch extension), resolved the same way for Slicer's Python version with every package
Slicer pip-installs fixed at Slicer's version (``-c requirements/slicer-bundled-X.Y.txt``, written from
Slicer's source by ``requirements/slicer_bundled.py``), so that installing it never needs to change one
of them. The versions of ``constraints.txt`` (the ones the suite ran with) are preferred: they seed uv's
output file, which uv treats as preferences, kept where they fit Slicer's packages and relaxed only
where they do not (those differences are listed in the file's header). The lock fails when a package
would need something Slicer builds itself (VTK; SimpleITK before 5.12) or a Slicer package at another
version.

Refresh: ``make test-latest`` (the newest versions pass?), ``make lock``, ``make test`` (the new
lock installed from scratch passes?), then commit the files. ``python requirements/lock.py --slicer-only``
re-resolves only the Slicer files around the committed lock.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canonical

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "requirements"
OUTPUT = FOLDER / "constraints.txt"
sys.path.insert(0, str(REPO / "MedicalSAM3Slicer"))  # the module's installer: one list of what Slicer needs
from MedicalSAM3Lib import dependencies  # noqa: E402
EXTRAS = ("dev", "train", "convert", "dicom")
LOWEST_PYTHON = "3.11"  # transformers' newest releases need it; 3D Slicer 5.10 and 5.12 ship 3.12
#: Left to the user's own build, with everything that only they pull in.
TORCH_STACK = ("torch", "torchvision")


def parse_compiled(text: str) -> list[tuple[str, str, set[str]]]:
    """``uv pip compile`` output (split annotations) as ``(name, requirement line, via)`` entries,
    where ``via`` holds the canonical names of what requires the package (``-c``/``-r`` sources and
    the project itself are kept as written)."""
    entries: list[tuple[str, str, set[str]]] = []
    in_via = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("#"):
            name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
            if name is None:
                raise ValueError(f"unexpected line in uv's output: {raw!r}")
            entries.append((canonical(name.group(0)), line, set()))
            in_via = False
            continue
        comment = line.lstrip("#").strip()
        if not entries:
            continue
        if comment == "via":
            in_via = True
        elif comment.startswith("via "):
            entries[-1][2].add(_via_name(comment[4:]))
            in_via = False
        elif in_via and raw.startswith("    #   "):
            entries[-1][2].add(_via_name(comment))
    return entries


def _via_name(text: str) -> str:
    text = text.strip()
    return text if text.startswith(("-", "medical-sam3")) else canonical(text.split()[0])


def drop_torch_stack(entries, stack=TORCH_STACK):
    """``entries`` without the torch stack: the packages in ``stack`` and, repeatedly, those that
    nothing outside the dropped set requires."""
    dropped = {canonical(n) for n in stack}
    changed = True
    while changed:
        changed = False
        for name, _line, via in entries:
            if name not in dropped and via and via <= dropped:
                dropped.add(name)
                changed = True
    return [e for e in entries if e[0] not in dropped], sorted(dropped)


def torch_pins() -> list[str]:
    """``torch==X`` / ``torchvision==Y`` of this environment, local build tags (``+cu130``) removed."""
    pins = []
    for name in TORCH_STACK:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in {sys.prefix}: run `make install` first") from None
    return pins


def compile_lock() -> tuple[str, list[str], str]:
    pins = torch_pins()
    with tempfile.TemporaryDirectory() as tmp:
        torch_file = Path(tmp) / "torch.txt"
        torch_file.write_text("\n".join(pins) + "\n")
        command = [sys.executable, "-m", "uv", "pip", "compile", "pyproject.toml",
                   *[a for extra in EXTRAS for a in ("--extra", extra)],
                   "--universal", "--python-version", LOWEST_PYTHON, "--fork-strategy", "fewest",
                   "--annotation-style", "split", "--no-header", "-c", str(torch_file)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"uv pip compile failed:\n{done.stderr}")
    shown = " ".join(["uv", *command[3:-2], "-c", "<" + " ".join(pins) + ">"])
    return done.stdout, pins, shown


def _body(entries) -> list[str]:
    """The pins of ``entries``, each followed by what requires it."""
    lines = []
    for _name, line, via in entries:
        lines.append(line)
        if via:
            lines.append("    # via " + ", ".join(sorted(via)))
    return lines


def render(entries, pins: list[str], dropped: list[str], command: str, today: str) -> str:
    header = [
        "# The versions `make install` / `make test` / CI install (pip install -c requirements/constraints.txt),",
        "# the base of the 3D Slicer module's constraints-slicer-*.txt. Made by `make lock` (requirements/lock.py) on " + today + ":",
        "#   " + command,
        "# One version per package for CPython >= " + LOWEST_PYTHON + " on every platform, resolved around "
        + ", ".join(pins) + ",",
        *textwrap.wrap("the build the suite ran with. Left out (each platform and GPU has its own build): "
                       + ", ".join(dropped) + ".", 100, initial_indent="# ", subsequent_indent="#   ", break_on_hyphens=False),
        "# pyproject.toml keeps ranges for installs into your own stack. Do not edit by hand.",
    ]
    return "\n".join(header + _body(entries)) + "\n"


# -- the resolutions for 3D Slicer's Python ------------------------------------------------------------
def requirement_lines(text: str) -> list[str]:
    """The requirement lines of a constraints file (comments and annotations left out)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _pin(line: str) -> tuple[str, str]:
    requirement = Requirement(line.split("#", 1)[0].strip())
    exact = [s.version for s in requirement.specifier if s.operator == "=="]
    return canonical(requirement.name), exact[0] if exact else ""


def slicer_python(bundled_text: str) -> str:
    """``3.12`` from the ``# python: 3.12.10`` line of a ``slicer-bundled-X.Y.txt``."""
    match = re.search(r"^# python: (\d+)\.(\d+)", bundled_text, re.M)
    if match is None:
        raise SystemExit("no '# python: X.Y.Z' line in the Slicer record: rerun requirements/slicer_bundled.py")
    return f"{match.group(1)}.{match.group(2)}"


def slicer_requirements() -> list[str]:
    """What the module installs with pip into Slicer's Python (the torch stack left out)."""
    stack = {canonical(n) for n in TORCH_STACK}
    return [r for r in dependencies.LOCAL_REQUIREMENTS if canonical(Requirement(r).name) not in stack]


def preferences(main_lines: list[str], bundled: set) -> list[str]:
    """The lock's pins less Slicer's packages: the versions uv should keep where they fit."""
    return [line for line in main_lines if _pin(line)[0] not in bundled]


def check_slicer(entries, versions: dict, built: frozenset) -> None:
    """Fail when the resolution needs something Slicer builds itself, or one of Slicer's packages at a
    version other than Slicer's."""
    problems = []
    for name, line, via in entries:
        if name in built:
            problems.append(f"{', '.join(sorted(via))} need(s) {name}, which Slicer builds itself; pip could "
                            f"replace Slicer's copy with PyPI's")
        elif name in versions and versions[name] and _pin(line)[1] != versions[name]:
            problems.append(f"{line} (Slicer ships {name}=={versions[name]})")
    if problems:
        raise SystemExit("the Slicer resolution cannot be used:\n  " + "\n  ".join(problems))


def differences(entries, main_lines: list[str], bundled: set) -> list[str]:
    """``name X -> Y`` for each package, not one of Slicer's, resolved to another version than the lock's."""
    locked = dict(_pin(line) for line in main_lines)
    changed = []
    for name, line, _via in entries:
        version = _pin(line)[1]
        if name not in bundled and name in locked and locked[name] != version:
            changed.append(f"{name} {locked[name]} -> {version}")
    return changed


def compile_slicer(version: str, bundled_text: str, main_lines: list[str], bundled: set) -> tuple[str, str]:
    """uv's resolution of :func:`slicer_requirements` for Slicer ``version`` (in a scratch folder, so
    that uv's annotations name the inputs, not temporary paths)."""
    record = f"slicer-bundled-{version}.txt"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "LOCAL_REQUIREMENTS.in").write_text("\n".join(slicer_requirements()) + "\n")
        (Path(tmp) / record).write_text(bundled_text)
        output = Path(tmp) / f"constraints-slicer-{version}.txt"
        output.write_text("\n".join(preferences(main_lines, bundled)) + "\n")
        command = [sys.executable, "-m", "uv", "pip", "compile", "LOCAL_REQUIREMENTS.in", "-c", record,
                   "--universal", "--python-version", slicer_python(bundled_text), "--fork-strategy", "fewest",
                   "--annotation-style", "split", "--no-header", "--quiet", "-o", output.name]
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"uv pip compile for Slicer {version} failed:\n{done.stderr}")
        text = output.read_text()
    shown = " ".join(["uv", *command[3:5], "<dependencies.LOCAL_REQUIREMENTS>", "-c", f"requirements/{record}",
                      *command[8:-3], "-o", "<seeded with constraints.txt less Slicer's packages>"])
    return text, shown


def render_slicer(entries, version: str, python: str, commit: str, command: str, changed: list[str],
                  today: str) -> str:
    wrap = dict(width=100, initial_indent="# ", subsequent_indent="#   ", break_on_hyphens=False)
    header = [
        f"# What the Medical SAM3 module installs with pip into 3D Slicer {version}'s Python {python}: made by",
        f"# `make lock` (requirements/lock.py) on {today}, the module's requirements (PyTorch aside: the",
        f"# PyTorch extension installs it) with Slicer's own packages fixed at the versions Slicer {version}",
        f"# ships (requirements/slicer-bundled-{version}.txt, Slicer {commit[:10]}), preferring the versions",
        "# of requirements/constraints.txt (the ones the suite ran with):",
        "#   " + command,
        *textwrap.wrap("Differs from requirements/constraints.txt where Slicer's packages need it: "
                       + (", ".join(changed) if changed else "nothing") + ".", **wrap),
        "# The module hands pip these pins with Slicer's packages at their installed versions (MedicalSAM3Lib/",
        "# dependencies.py). Do not edit by hand.",
    ]
    return "\n".join(header + _body(entries)) + "\n"


def lock_slicer(version: str, main_lines: list[str], folder: Path, today: str) -> tuple[Path, list, list[str]]:
    record_path = folder / f"slicer-bundled-{version}.txt"
    if not record_path.is_file():
        raise SystemExit(f"{record_path} is missing: make lock SLICER_GIT=<a clone of Slicer's repository>")
    bundled_text = record_path.read_text()
    versions, built = dependencies.read_bundled(record_path)
    commit = re.search(r" at ([0-9a-f]{40}) ", bundled_text)
    text, command = compile_slicer(version, bundled_text, main_lines, set(versions))
    entries = parse_compiled(text)
    check_slicer(entries, versions, built)
    changed = differences(entries, main_lines, set(versions))
    content = render_slicer(entries, version, re.search(r"^# python: (\S+)", bundled_text, re.M).group(1),
                            commit.group(1) if commit else "?" * 10, command, changed, today)
    path = folder / f"constraints-slicer-{version}.txt"
    _write(path, content)
    return path, entries, changed


def _write(path: Path, content: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(content)
    os.replace(partial, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--slicer-dir", type=Path, default=FOLDER,
                        help="where slicer-bundled-X.Y.txt are read and constraints-slicer-X.Y.txt written")
    parser.add_argument("--slicer-only", action="store_true",
                        help="leave --output as it is; re-resolve only the Slicer files around it")
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    if not args.slicer_only:
        text, pins, command = compile_lock()
        entries, dropped = drop_torch_stack(parse_compiled(text))
        _write(args.output, render(entries, pins, dropped, command, today))
        print(f"{args.output}: {len(entries)} packages pinned; left to the torch build: {', '.join(dropped)}")
    main_lines = requirement_lines(args.output.read_text())
    for version in dependencies.SLICER_VERSIONS:
        path, entries, changed = lock_slicer(version, main_lines, args.slicer_dir, today)
        print(f"{path}: {len(entries)} packages; other than {args.output.name}: {', '.join(changed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
