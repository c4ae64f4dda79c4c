"""The module's dependency installer (MedicalSAM3Lib/dependencies.py) without Slicer: what it asks for,
what it hands pip (Slicer's own packages only ever at their installed versions), Slicer 5.12's
``slicer.packaging`` and 5.10's ``slicer.util.pip_install``, remembered declines, an engine Python of
its own; and the committed requirements/ files it reads (consistent with Slicer's source where a clone
of it is at hand, with the project lock, and shipped by CMakeLists.txt)."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
from pathlib import Path

import pytest

from MedicalSAM3Lib import dependencies

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements"
SLICER_GIT = os.environ.get("SLICER_GIT") or "/work/.mirror/Slicer+Slicer/repo"  # a clone of Slicer/Slicer


def _load(name):
    spec = importlib.util.spec_from_file_location(f"medsam3_{name}", REQUIREMENTS / f"{name}.py")
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


def _name(requirement: str) -> str:
    return dependencies.canonical(re.match(r"[\w.-]+", requirement).group(0))


def _versions(**installed):
    """A ``version_of`` for ``ensure``: canonical name -> version; anything else is installed at 99.0."""
    table = {dependencies.canonical(k.replace("_", "-")): v for k, v in installed.items()}
    return lambda requirement: table.get(_name(requirement), "99.0")


BUNDLED = {"numpy", "scipy", "requests", "typing-extensions", "idna", "packaging", "simpleitk", "vtk"}


@pytest.fixture
def resolved(tmp_path):
    """A constraints-slicer file as `make lock` writes it, in a folder with a space in its name."""
    path = tmp_path / "my folder" / "constraints-slicer-5.12.txt"
    path.parent.mkdir()
    path.write_text("\n".join([
        "# comment", "transformers==5.25.0", "    # via -r LOCAL_REQUIREMENTS.in", "tokenizers==0.23.3",
        "numpy==2.4.6", "scipy==1.17.1", "typing-extensions==4.15.0", "anyio==4.14.2", "zstandard==0.25.0",
        "colorama==0.4.6 ; sys_platform == 'no-such-platform'", ""]))
    return path


class FakePackaging:
    """``slicer.packaging`` of Slicer 5.12: records each pip_install with its constraints file's lines."""

    def __init__(self):
        self.calls = []

    def pip_install(self, requirements, constraints=None, requester=None):
        self.calls.append((list(requirements), Path(constraints).read_text().split(), requester, constraints))


# -- the requirement lists and the committed files ---------------------------------------------------
def test_local_requirements_match_the_engines():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    engine = {re.split(r"\s*#", r)[0].strip() for r in project}
    bundled_with_slicer = {"numpy", "requests", "SimpleITK", "pyyaml", "torch"}  # pyyaml: training only
    expected = {r for r in engine if re.match(r"[\w.-]+", r).group(0) not in bundled_with_slicer}
    assert set(dependencies.LOCAL_REQUIREMENTS) == expected
    assert dependencies.TORCH in engine
    assert dependencies.constraints_path() == REQUIREMENTS / "constraints.txt"  # the suite's own versions
    # ... and the module installs them at the versions resolved for each Slicer
    bundled = dependencies.bundled_names()
    for version in dependencies.SLICER_VERSIONS:
        path = dependencies.constraints_path(version)
        assert path == REQUIREMENTS / f"constraints-slicer-{version}.txt"
        pins = dependencies.tested_versions(path)
        for requirement in dependencies.LOCAL_REQUIREMENTS:
            written, name = re.match(r"[\w.-]+", requirement).group(0), _name(requirement)
            assert name in pins, f"{requirement} has no version in {path.name}: run `make lock`"
            assert dependencies.satisfied(requirement, pins[name]), (requirement, pins[name])
            if name not in bundled:
                assert dependencies.pinned(requirement, pins, bundled) == f"{written}=={pins[name]}"
        assert dependencies.pinned("scipy>=1.10", pins, bundled) == "scipy>=1.10"  # Slicer's own scipy is kept
        assert "torch" not in pins and "torchvision" not in pins  # left to the PyTorch extension's build


def test_bundled_names_come_from_the_committed_records():
    names = set()
    for version in dependencies.SLICER_VERSIONS:
        path = dependencies.bundled_path(version)
        assert path == REQUIREMENTS / f"slicer-bundled-{version}.txt"
        versions, built = dependencies.read_bundled(path)
        assert {"numpy", "scipy", "requests", "simpleitk", "vtk", "typing-extensions", "idna", "pip"} <= set(versions)
        assert "vtk" in built and built <= set(versions)
        names |= set(versions)
    assert dependencies.bundled_names() == names
    assert dependencies.read_bundled(REQUIREMENTS / "slicer-bundled-5.10.txt")[0]["simpleitk"] is None  # built
    assert dependencies.read_bundled(REQUIREMENTS / "slicer-bundled-5.12.txt")[0]["simpleitk"] == "2.5.5"


def test_slicer_constraints_agree_with_the_records_and_the_lock():
    """What `make lock` wrote: Slicer's packages at Slicer's versions, nothing Slicer builds itself,
    and the lock's version of every other package but the ones the header lists as changed."""
    lock = _load("lock")
    main = dict(lock._pin(line) for line in lock.requirement_lines((REQUIREMENTS / "constraints.txt").read_text()))
    for version in dependencies.SLICER_VERSIONS:
        text = (REQUIREMENTS / f"constraints-slicer-{version}.txt").read_text()
        versions, built = dependencies.read_bundled(REQUIREMENTS / f"slicer-bundled-{version}.txt")
        entries = lock.parse_compiled("\n".join(line for line in text.splitlines() if not line.startswith("# ")))
        lock.check_slicer(entries, versions, built)  # raises SystemExit otherwise
        header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
        python = re.search(r"^# python: (\S+)", (REQUIREMENTS / f"slicer-bundled-{version}.txt").read_text(), re.M)
        assert f"{version}'s Python {python.group(1)}:" in header
        for name, line, _via in entries:
            pinned = lock._pin(line)[1]
            if name in versions:
                assert pinned == versions[name], (version, line)
            elif name in main and main[name] != pinned:
                assert f"{name} {main[name]} -> {pinned}" in header, f"{version}: {line} differs from the lock unsaid"
        assert {_name(r) for r in dependencies.LOCAL_REQUIREMENTS} <= {name for name, _, _ in entries}


def test_the_slicer_records_match_slicers_source():
    """Each slicer-bundled-X.Y.txt is what requirements/slicer_bundled.py writes from the Slicer commit it
    names (a clone of github.com/Slicer/Slicer at $SLICER_GIT)."""
    if not Path(SLICER_GIT).exists():
        pytest.skip(f"no clone of Slicer's repository at {SLICER_GIT} (set SLICER_GIT): the records are "
                    "checked against Slicer's source only where it is at hand")
    bundled = _load("slicer_bundled")
    git = bundled.Git(SLICER_GIT)
    for version in dependencies.SLICER_VERSIONS:
        path = bundled.output_path(version, REQUIREMENTS)
        record = bundled.collect(git, version, bundled.recorded_commit(path))
        assert bundled.render(record) == path.read_text(), f"{path.name}: rerun requirements/slicer_bundled.py"
        assert record.python.startswith("3.12.")  # 3.12.10 in 5.10 and 5.12


def test_cmake_ships_the_requirements_files():
    resources = re.search(r"set\(MEDSAM3_ENGINE_RESOURCES(.*?)\)", (REPO / "CMakeLists.txt").read_text(), re.S).group(1)
    listed = set(resources.split())
    wanted = {"requirements/constraints.txt"} | {f"requirements/{kind}-{version}.txt"
                                                  for version in dependencies.SLICER_VERSIONS
                                                  for kind in ("constraints-slicer", "slicer-bundled")}
    assert wanted <= listed, f"add to MEDSAM3_ENGINE_RESOURCES in CMakeLists.txt: {sorted(wanted - listed)}"


# -- ensure() ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("requirement, installed, ok", [
    ("transformers>=5.0,<6", "5.23.0", True), ("transformers>=5.0,<6", "4.57.1", False),
    ("transformers>=5.0,<6", "6.0.0", False), ("torch>=2.4", "2.14.1+cu130", True), ("torch>=2.4", "2.3.1", False),
    ("scipy>=1.10", None, False), ("uvicorn>=0.29", "0.29", True), ("fastapi>=0.110", "0.99.1", False),
])
def test_version_checks(requirement, installed, ok):
    assert dependencies.satisfied(requirement, installed) is ok


def test_nothing_is_installed_without_consent_and_torch_goes_through_the_pytorch_extension(resolved):
    version_of = _versions(torch=None, scipy="1.17.1", transformers="4.40.0", tokenizers="0.23.3")
    resolved.write_text("# no pins\n")
    installed = []
    with pytest.raises(RuntimeError, match="torch>=2.4, transformers>=5.0,<6"):
        dependencies.ensure("local", lambda todo: False, installed.append, lambda spec: True, version_of, resolved,
                            bundled=BUNDLED)
    assert installed == []
    asked, torch_specs = [], []
    done = dependencies.ensure("local", lambda todo: asked.append(todo) or True, installed.append,
                               lambda spec: torch_specs.append(spec) or True, version_of, resolved, bundled=BUNDLED)
    assert asked == [["torch>=2.4", "transformers>=5.0,<6"]]
    assert torch_specs == [">=2.4"] and [args[0] for args in installed] == ["transformers>=5.0,<6"]
    assert done == dependencies.Installed(installed=("torch>=2.4", "transformers>=5.0,<6"))
    with pytest.raises(RuntimeError, match="PyTorch' extension"):
        dependencies.ensure("local", lambda todo: True, installed.append, lambda spec: False, version_of, resolved,
                            bundled=BUNDLED)
    # the remote backend needs nothing; declining the optional zstandard is fine
    assert dependencies.ensure("remote", lambda todo: False, installed.append, None, lambda r: None, resolved,
                               bundled=BUNDLED) == dependencies.Installed(declined=("zstandard",))


def test_slicer_5_10_pip_install_gets_the_resolution_with_slicers_packages_at_their_installed_versions(resolved):
    # transformers 5.20 would do by pyproject's range, but 5.25.0 is what was resolved; numpy was
    # upgraded in this Slicer by someone else (2.4.7): it stays as it is, so does the CUDA torch
    version_of = _versions(torch="2.14.1+cu130", transformers="5.20.0", zstandard="0.25.0", numpy="2.4.7",
                           scipy="1.17.1", typing_extensions="4.15.0", idna="3.16", packaging="26.2", simpleitk="2.5.5",
                           vtk="9.6.2", requests=None, torchvision=None, torchaudio=None)
    calls, seen = [], []

    def pip_install(args):
        calls.append(args)
        seen.append(Path(args[args.index("-c") + 1]).read_text().split())

    done = dependencies.ensure("local", lambda todo: True, pip_install, lambda spec: False, version_of, resolved,
                               bundled=BUNDLED)
    assert done.installed == ("transformers==5.25.0",) and done.declined == ()
    assert len(calls) == 1 and calls[0][:-1] == ["transformers==5.25.0", "-c"]  # one resolution, pinned
    assert seen == [["anyio==4.14.2", "idna==3.16", "numpy==2.4.7", "packaging==26.2", "scipy==1.17.1",
                     "simpleitk==2.5.5", "tokenizers==0.23.3", "torch==2.14.1+cu130", "transformers==5.25.0",
                     "typing-extensions==4.15.0", "vtk==9.6.2", "zstandard==0.25.0"]]
    assert not Path(calls[0][-1]).exists()  # the temporary constraints file is removed
    up_to_date = _versions(transformers="5.25.0", zstandard="0.25.0")
    assert dependencies.ensure("local", lambda todo: False, pip_install, None, up_to_date, resolved,
                               bundled=BUNDLED) == dependencies.Installed()


def test_slicer_5_12_installs_through_slicer_packaging_with_constraints(resolved):
    packaging = FakePackaging()
    version_of = _versions(torch="2.14.1", transformers=None, zstandard=None, numpy="2.4.6", scipy="1.17.1")
    done = dependencies.ensure("local", lambda todo: True, lambda args: pytest.fail("slicer.util.pip_install used"),
                               None, version_of, resolved, packaging=packaging, bundled=BUNDLED)
    assert done.installed == ("transformers==5.25.0", "zstandard==0.25.0")
    [(requirements, constraints, requester, path)] = packaging.calls
    assert requirements == ["transformers==5.25.0", "zstandard==0.25.0"] and requester == "Medical SAM3"
    assert "numpy==2.4.6" in constraints and "torch==2.14.1" in constraints and "transformers==5.25.0" in constraints
    assert isinstance(path, str) and not Path(path).exists()


@pytest.mark.parametrize("installed_numpy", ["2.4.6", "2.3.5", "1.26.4", "2.5.0rc1"])
def test_slicers_packages_are_only_ever_passed_at_their_installed_versions(resolved, installed_numpy):
    packaging = FakePackaging()
    installed = {name: "1.0" for name in BUNDLED}  # Slicer's packages at some version; the engine's missing
    installed.update(torch="2.14.1", numpy=installed_numpy, scipy="1.13.1", idna="3.10")
    version_of = lambda r: installed.get(_name(r))  # noqa: E731
    dependencies.ensure("local", lambda todo: True, None, None, version_of, resolved, packaging=packaging,
                        bundled=BUNDLED)
    [(requirements, constraints, _, _)] = packaging.calls
    assert not {_name(r) for r in requirements} & BUNDLED  # never a requirement ...
    for line in constraints:  # ... and a constraint only at what is installed now
        name, version = re.match(r"([\w.-]+)==(.+)", line).groups()
        if name in BUNDLED:
            assert version == version_of(name), line
    assert f"numpy=={installed_numpy}" in constraints and "scipy==1.13.1" in constraints  # not the file's
    assert {"requests==1.0", "vtk==1.0", "simpleitk==1.0"} <= set(constraints)


def test_a_slicer_package_too_old_for_the_engine_is_not_upgraded(resolved):
    installed = []
    with pytest.raises(RuntimeError, match="Slicer's own scipy 1.9.3 does not meet scipy>=1.10"):
        dependencies.ensure("local", lambda todo: True, installed.append, lambda spec: True,
                            _versions(scipy="1.9.3", transformers=None), resolved, bundled=BUNDLED)
    assert installed == []


def test_a_declined_optional_package_is_not_offered_again_until_asked_for(resolved):
    asked, installed = [], []

    def confirm(answer):
        return lambda todo: asked.append(todo) or answer

    version_of = _versions(zstandard=None)
    first = dependencies.ensure("remote", confirm(False), installed.append, None, version_of, resolved, bundled=BUNDLED)
    assert first == dependencies.Installed(declined=("zstandard",)) and asked == [["zstandard==0.25.0"]]
    remembered = first.remembered([])
    assert remembered == ["zstandard"]
    # the next Apply does not ask again
    again = dependencies.ensure("remote", confirm(True), installed.append, None, version_of, resolved,
                                bundled=BUNDLED, declined=remembered)
    assert again == dependencies.Installed() and len(asked) == 1 and installed == []
    # "Install dependencies" does; installing it forgets the decline
    done = dependencies.ensure("remote", confirm(True), installed.append, None, version_of, resolved,
                               bundled=BUNDLED, declined=remembered, ask_declined=True)
    assert done.installed == ("zstandard==0.25.0",) and len(asked) == 2 and len(installed) == 1
    assert done.remembered(remembered) == [] and done.remembered(["Other_Package"]) == ["other-package"]
    # a required package is asked for whatever was declined: the local engine needs zstandard
    with pytest.raises(RuntimeError, match="zstandard"):
        dependencies.ensure("local", confirm(False), installed.append, None, version_of, resolved,
                            bundled=BUNDLED, declined=remembered)


def test_an_engine_python_of_its_own_gets_nothing_installed_into_slicer(resolved):
    asked, installed, torch = [], [], []
    nothing = lambda r: None  # noqa: E731  (torch, transformers, ... all missing from Slicer's Python)
    done = dependencies.ensure("local", lambda todo: asked.append(todo) or False, installed.append,
                               lambda spec: torch.append(spec) or True, nothing, resolved, bundled=BUNDLED,
                               engine_python_is_slicer=False)
    assert done == dependencies.Installed(declined=("zstandard",))  # only what the client side can use
    assert asked == [["zstandard==0.25.0"]] and installed == [] and torch == []
    assert dependencies.ensure("local", lambda todo: pytest.fail("asked"), installed.append, None, nothing, resolved,
                               bundled=BUNDLED, declined=done.declined,
                               engine_python_is_slicer=False) == dependencies.Installed()
    assert dependencies.ensure("local", lambda todo: pytest.fail("asked"), installed.append, None,
                               _versions(zstandard="0.25.0"), resolved, bundled=BUNDLED,
                               engine_python_is_slicer=False) == dependencies.Installed()


def test_another_slicer_uses_the_newest_resolution_and_says_so(caplog):
    newest = max(dependencies.SLICER_VERSIONS, key=lambda v: tuple(map(int, v.split("."))))
    assert dependencies.supported_slicer("5.10") == "5.10" and dependencies.supported_slicer("5.14") == newest
    assert dependencies.supported_slicer(None) == newest
    assert dependencies.constraints_path("5.14") == REQUIREMENTS / f"constraints-slicer-{newest}.txt"
    packaging = FakePackaging()
    with caplog.at_level(logging.WARNING, logger=dependencies.__name__):
        dependencies.ensure("remote", lambda todo: True, None, None, _versions(zstandard=None),
                            slicer_version="5.14", packaging=packaging)
    assert "Slicer 5.14 is not one of the versions" in caplog.text and f"constraints-slicer-{newest}.txt" in caplog.text
    pins = dependencies.tested_versions(REQUIREMENTS / f"constraints-slicer-{newest}.txt")
    assert packaging.calls[0][0] == [f"zstandard=={pins['zstandard']}"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=dependencies.__name__):
        dependencies.ensure("remote", lambda todo: True, None, None, _versions(zstandard=None),
                            slicer_version="5.10", packaging=packaging)
    assert not caplog.text


def test_missing_files_stop_the_install_instead_of_installing_unconstrained(tmp_path, monkeypatch):
    monkeypatch.setattr(dependencies, "requirements_folder", lambda: None)
    assert dependencies.constraints_path("5.12") is None and dependencies.bundled_names() == frozenset()
    with pytest.raises(RuntimeError, match="reinstall"):
        dependencies.ensure("remote", lambda todo: True, lambda args: pytest.fail("installed"), None,
                            _versions(zstandard=None), slicer_version="5.12")
    assert dependencies.ensure("remote", lambda todo: pytest.fail("asked"), None, None, _versions(),
                               slicer_version="5.12") == dependencies.Installed()  # nothing to do: no files needed


def test_non_pep440_installed_versions_are_still_held():
    assert dependencies.constraint("simpleitk", "2.2.0rc2.dev368") == "simpleitk==2.2.0rc2.dev368"
    assert dependencies.constraint("oddity", "1.0-slicer_build") == "oddity===1.0-slicer_build"
