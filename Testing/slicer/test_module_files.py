"""The Slicer extension's files without Slicer: the CMake configures (against a stub Slicer that checks
every listed file exists), the panel's .ui matches the module code, the parameter node matches the
engine's options, the dependency lists match the engine's, the catalog entry is well formed."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from MedicalSAM3Core.common.options import CT_WINDOWS, MODES
from MedicalSAM3Lib import dependencies

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MedicalSAM3Slicer"
MODULE = MODULE_DIR / "MedicalSAM3.py"
UI = MODULE_DIR / "Resources" / "UI" / "MedicalSAM3.ui"

STUB_SLICER = r"""
# A stand-in for Slicer's CMake package: the macros the extension calls, each checking its files exist.
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer/qt-scripted-modules)
set(BUILD_TESTING ON)
function(_medsam3_check_files)
  foreach(file ${ARGN})
    if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${file}")
      message(FATAL_ERROR "listed file does not exist: ${CMAKE_CURRENT_SOURCE_DIR}/${file}")
    endif()
    file(APPEND "${CMAKE_BINARY_DIR}/listed.txt" "${CMAKE_CURRENT_SOURCE_DIR}/${file}\n")
  endforeach()
endfunction()
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(NOT MY_NAME OR MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "slicerMacroBuildScriptedModule: NAME missing or unknown arguments ${MY_UNPARSED_ARGUMENTS}")
  endif()
  _medsam3_check_files(${MY_SCRIPTS} ${MY_RESOURCES})
endfunction()
function(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR;GLOBAL_TARGET" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR"
                        "SCRIPTS;RESOURCES" ${ARGN})
  if(NOT MY_TARGET_NAME OR NOT MY_DESTINATION_DIR OR NOT MY_INSTALL_DIR OR MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "ctkMacroCompilePythonScript: bad arguments ${MY_UNPARSED_ARGUMENTS}")
  endif()
  _medsam3_check_files(${MY_SCRIPTS} ${MY_RESOURCES})
endfunction()
function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "TESTNAME_PREFIX;SCRIPT" "SLICER_ARGS" ${ARGN})
  _medsam3_check_files(${MY_SCRIPT})
endfunction()
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_extension_cmake_configures_and_lists_only_existing_files(tmp_path):
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(STUB_SLICER)
    (stub / "empty.cmake").write_text("")
    build = tmp_path / "build"
    done = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={stub}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    listed = {Path(line) for line in (build / "listed.txt").read_text().splitlines()}
    shipped_engine = {p.relative_to(REPO).as_posix() for p in listed if "MedicalSAM3Core" in p.parts}
    engine = {p.relative_to(REPO).as_posix() for p in (REPO / "MedicalSAM3Core").rglob("*.py")
              if "__pycache__" not in p.parts}
    assert shipped_engine == engine, "MEDSAM3_ENGINE_SCRIPTS in CMakeLists.txt must list every engine file"
    module_code = {p for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    assert module_code <= listed, f"module files missing from the CMake lists: {module_code - listed}"
    assert REPO / "requirements" / "constraints.txt" in listed, "the tested versions must travel with the extension"
    demo = REPO / "Resources" / "demo_model"
    if demo.is_dir():
        assert {p for p in demo.iterdir() if p.is_file()} <= listed, "every demo model file must be shipped"


def _ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI).getroot().iter("widget")}


def _parameter_fields() -> dict[str, ast.expr]:
    tree = ast.parse(MODULE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedicalSAM3ParameterNode")
    return {n.target.id: n.annotation for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_every_widget_the_module_uses_is_in_the_ui():
    used = set(re.findall(r"\bui\.([A-Za-z_]\w*)", MODULE.read_text()))
    missing = used - set(_ui_widgets())
    assert not missing, f"MedicalSAM3.py uses widgets that MedicalSAM3.ui lacks: {sorted(missing)}"


def test_ui_parameters_are_parameter_node_fields_with_the_engines_choices():
    fields = _parameter_fields()
    bound = {}
    for name, widget in _ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    assert set(bound) == set(fields), (set(bound) ^ set(fields))
    choices = {name: ast.literal_eval(node.slice.elts[1].args[0]) for name, node in fields.items()
               if isinstance(node, ast.Subscript) and "Choice" in ast.unparse(node)}
    assert choices["mode"] == list(MODES)
    assert choices["window"] == ["auto", *CT_WINDOWS]
    assert bound["mode"] == bound["window"] == "QComboBox"


def test_module_file_follows_slicers_template():
    tree = ast.parse(MODULE.read_text())
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes["MedicalSAM3"] == ["ScriptedLoadableModule"]
    assert classes["MedicalSAM3Widget"][0] == "ScriptedLoadableModuleWidget"
    assert classes["MedicalSAM3Logic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["MedicalSAM3Test"] == ["ScriptedLoadableModuleTest"]
    top_imports = {a.name.split(".")[0] for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                   for a in n.names} | {n.module.split(".")[0] for n in tree.body
                                         if isinstance(n, ast.ImportFrom) and n.module}
    assert not top_imports & {"torch", "transformers", "SimpleITK", "MedicalSAM3Core", "MedicalSAM3Lib"}, \
        "the module must import nothing heavy when Slicer starts"


def test_local_requirements_match_the_engines():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    engine = {re.split(r"\s*#", r)[0].strip() for r in project}
    bundled_with_slicer = {"numpy", "requests", "SimpleITK", "pyyaml", "torch"}  # pyyaml: training only
    expected = {r for r in engine if re.match(r"[\w.-]+", r).group(0) not in bundled_with_slicer}
    assert set(dependencies.LOCAL_REQUIREMENTS) == expected
    assert dependencies.TORCH in engine
    # ... and the module installs them at the versions the suite runs with: the same constraints file
    assert dependencies.constraints_path() == REPO / "requirements" / "constraints.txt"
    pins = dependencies.tested_versions(dependencies.constraints_path())
    for requirement in dependencies.LOCAL_REQUIREMENTS:
        written = re.match(r"[\w.-]+", requirement).group(0)
        name = dependencies.canonical(written)
        assert name in pins, f"{requirement} has no tested version in requirements/constraints.txt: run `make lock`"
        assert dependencies.satisfied(requirement, pins[name]), (requirement, pins[name])
        if name not in dependencies.SLICER_BUNDLED:
            assert dependencies.pinned(requirement, pins) == f"{written}=={pins[name]}"
    assert dependencies.pinned("scipy>=1.10", pins) == "scipy>=1.10"  # Slicer's own scipy is kept
    assert "torch" not in pins and "torchvision" not in pins  # left to the PyTorch extension's build


def test_constraints_hold_what_is_installed_and_cover_pyproject():
    """The suite runs with exactly the versions of requirements/constraints.txt (for this Python and
    platform), and the file covers every requirement of pyproject.toml (a new dependency needs
    `make lock`). `make test-latest` and `make install CONSTRAINTS=` install other versions on
    purpose and set MEDSAM3_UNLOCKED."""
    import os
    from importlib import metadata

    tomllib = pytest.importorskip("tomllib")
    pins = dependencies.tested_versions(REPO / "requirements" / "constraints.txt")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {dependencies.canonical(re.match(r"[\w.-]+", r).group(0)) for r in requirements} - {"torch", "torchvision"}
    assert names <= set(pins), f"not in requirements/constraints.txt (run `make lock`): {sorted(names - set(pins))}"
    if os.environ.get("MEDSAM3_UNLOCKED"):
        pytest.skip("installed without the constraints on purpose (MEDSAM3_UNLOCKED)")
    installed = {dependencies.canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differ = {n: (installed[n], v) for n, v in pins.items() if n in installed and installed[n] != v}
    assert not differ, f"installed versions differ from requirements/constraints.txt (installed, tested): {differ}"
    used = {dependencies.canonical(re.match(r"[\w.-]+", r).group(0))
            for r in project["dependencies"] + project["optional-dependencies"]["dev"]}  # what `make install` asks for
    assert used <= set(installed), f"not installed: {sorted(used - set(installed))}"


@pytest.mark.parametrize("requirement, installed, ok", [
    ("transformers>=5.0,<6", "5.23.0", True), ("transformers>=5.0,<6", "4.57.1", False),
    ("transformers>=5.0,<6", "6.0.0", False), ("torch>=2.4", "2.14.1+cu130", True), ("torch>=2.4", "2.3.1", False),
    ("scipy>=1.10", None, False), ("uvicorn>=0.29", "0.29", True), ("fastapi>=0.110", "0.99.1", False),
])
def test_version_checks(requirement, installed, ok):
    assert dependencies.satisfied(requirement, installed) is ok


def test_nothing_is_installed_without_consent_and_torch_goes_through_the_pytorch_extension(tmp_path):
    unpinned = tmp_path / "none.txt"
    unpinned.write_text("# no pins\n")
    versions = {"torch": None, "scipy": "1.17.1", "transformers": "4.40.0"}
    version_of = lambda r: versions.get(re.match(r"[\w.-]+", r).group(0), "99.0")  # noqa: E731
    installed = []
    with pytest.raises(RuntimeError, match="torch>=2.4, transformers>=5.0,<6"):
        dependencies.ensure("local", lambda todo: False, installed.append, lambda spec: True, version_of, unpinned)
    assert installed == []
    asked, torch_specs = [], []
    done = dependencies.ensure("local", lambda todo: asked.append(todo) or True, installed.append,
                               lambda spec: torch_specs.append(spec) or True, version_of, unpinned)
    assert asked == [["torch>=2.4", "transformers>=5.0,<6"]]
    assert torch_specs == [">=2.4"] and installed == [["transformers>=5.0,<6"]] and done == asked[0]
    with pytest.raises(RuntimeError, match="PyTorch' extension"):
        dependencies.ensure("local", lambda todo: True, installed.append, lambda spec: False, version_of, unpinned)
    # the remote backend needs nothing; declining the optional zstandard is fine
    assert dependencies.ensure("remote", lambda todo: False, installed.append, None,
                               lambda r: None, unpinned) == []


def test_the_module_installs_the_tested_versions_and_leaves_slicers_own_packages_alone(tmp_path):
    constraints = tmp_path / "my constraints.txt"  # a space, as in many Windows profile paths
    constraints.write_text("\n".join([
        "# comment", "transformers==5.25.0", "    # via medical-sam3 (pyproject.toml)", "tokenizers==0.23.3",
        "numpy==2.4.6", "scipy==1.17.1", "requests==2.34.2", "typing-extensions==4.16.0",
        "colorama==0.4.6 ; sys_platform == 'no-such-platform'", "zstandard==0.25.0", ""]))
    pins = dependencies.tested_versions(constraints)
    assert "colorama" not in pins and pins["transformers"] == "5.25.0"  # markers are evaluated
    # transformers 5.20 would do by pyproject's range, but 5.25.0 is what was tested; scipy is Slicer's
    versions = {"torch": "2.14.1+cu130", "scipy": "1.13.1", "transformers": "5.20.0", "zstandard": "0.25.0"}
    version_of = lambda r: versions.get(re.match(r"[\w.-]+", r).group(0), "99.0")  # noqa: E731
    calls, seen = [], []

    def pip_install(args):
        calls.append(args)
        seen.append(Path(args[args.index("-c") + 1]).read_text().split())

    done = dependencies.ensure("local", lambda todo: True, pip_install, lambda spec: False, version_of, constraints)
    assert done == ["transformers==5.25.0"]
    assert len(calls) == 1 and calls[0][:-1] == ["transformers==5.25.0", "-c"]  # one resolution, pinned
    assert seen == [["tokenizers==0.23.3", "transformers==5.25.0", "zstandard==0.25.0"]]  # no Slicer package
    assert not Path(calls[0][-1]).exists()  # the temporary constraints file is removed
    versions["transformers"] = "5.25.0"
    assert dependencies.ensure("local", lambda todo: False, pip_install, None, version_of, constraints) == []


def test_extension_catalog_entry():
    entry = json.loads((MODULE_DIR / "MedicalSAM3.json").read_text())
    # keys of Slicer's slicer-extension-catalog-entry-schema v1.0.1 (additionalProperties: false)
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in cmake and 'set(EXTENSION_DEPENDS "PyTorch")' in cmake
