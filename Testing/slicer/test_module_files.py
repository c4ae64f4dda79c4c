"""The Slicer extension's files without Slicer: the CMake configures (against a stub Slicer that checks
every listed file exists), the panel's .ui matches the module code, the parameter node matches the
engine's options, the dependency lists match the engine's, the catalog entry is well formed."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
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
    assert choices["mode"] == ["auto", *MODES]
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


def test_extension_catalog_entry():
    entry = json.loads((MODULE_DIR / "ExtensionsIndex" / "main" / "MedicalSAM3.json").read_text())  # all: test_catalog
    # keys of Slicer's slicer-extension-catalog-entry-schema v1.0.1 (additionalProperties: false)
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in cmake and 'set(EXTENSION_DEPENDS "PyTorch")' in cmake
