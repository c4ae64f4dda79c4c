"""Write ``requirements/constraints.txt``: the versions ``make test`` installs and CI tests.

Run through ``make lock`` (which installs uv into the project's venv first). It resolves the
newest versions that ``pyproject.toml`` allows (its dependencies and its ``dev``, ``train`` and
``convert`` extras) with ``uv pip compile``: one version per package for every platform and every
CPython from 3.11 (``--universal --fork-strategy fewest``), resolved around the torch and
torchvision of the environment it runs in (the build the tests ran with). torch, torchvision and the
packages only they need (CUDA libraries, triton, sympy, ...) are then left out of the file: their
builds differ per platform and GPU, and a user's own torch (pytorch.org's CUDA builds, Slicer's
PyTorch extension) must not be fought over. Everything else is pinned ``==``.

Refresh: ``make test-latest`` (the newest versions pass?), ``make lock``, ``make test`` (the new
lock installed from scratch passes?), then commit the file.
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

from packaging.utils import canonicalize_name as canonical

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "requirements" / "constraints.txt"
EXTRAS = ("dev", "train", "convert")
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


def render(entries, pins: list[str], dropped: list[str], command: str, today: str) -> str:
    header = [
        "# The versions `make install` / `make test` / CI install (pip install -c requirements/constraints.txt),",
        "# and the 3D Slicer module's installer too. Made by `make lock` (requirements/lock.py) on " + today + ":",
        "#   " + command,
        "# One version per package for CPython >= " + LOWEST_PYTHON + " on every platform, resolved around "
        + ", ".join(pins) + ",",
        *textwrap.wrap("the build the suite ran with. Left out (each platform and GPU has its own build): "
                       + ", ".join(dropped) + ".", 100, initial_indent="# ", subsequent_indent="#   ", break_on_hyphens=False),
        "# pyproject.toml keeps ranges for installs into your own stack. Do not edit by hand.",
    ]
    body = []
    for _name, line, via in entries:
        body.append(line)
        if via:
            body.append("    # via " + ", ".join(sorted(via)))
    return "\n".join(header + body) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text, pins, command = compile_lock()
    entries, dropped = drop_torch_stack(parse_compiled(text))
    content = render(entries, pins, dropped, command, datetime.date.today().isoformat())
    partial = args.output.with_name(args.output.name + ".partial")
    partial.write_text(content)
    os.replace(partial, args.output)
    print(f"{args.output}: {len(entries)} packages pinned; left to the torch build: {', '.join(dropped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
