"""requirements/lock.py: what it keeps of uv's resolution, and the committed lock it wrote."""

import importlib.util
import sys
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


# -- the resolutions for 3D Slicer's Python (lock.py) and the records of what Slicer ships (slicer_bundled.py)
_bspec = importlib.util.spec_from_file_location("slicer_bundled", REPO / "requirements" / "slicer_bundled.py")
slicer_bundled = sys.modules.setdefault(_bspec.name, importlib.util.module_from_spec(_bspec))  # for its dataclass
_bspec.loader.exec_module(slicer_bundled)

SLICER_UV_OUTPUT = """\
anyio==4.14.2
    # via fastapi
numpy==2.4.6
    # via
    #   -c slicer-bundled-5.12.txt
    #   transformers
transformers==5.25.0
    # via -r LOCAL_REQUIREMENTS.in
typing-extensions==4.15.0
    # via
    #   -c slicer-bundled-5.12.txt
    #   anyio
"""
SLICER_VERSIONS = {"numpy": "2.4.6", "typing-extensions": "4.15.0", "scipy": "1.17.1", "vtk": "9.6.2"}


def test_the_slicer_resolution_keeps_slicers_versions_and_says_what_differs_from_the_lock():
    import pytest

    entries = lock.parse_compiled(SLICER_UV_OUTPUT)
    lock.check_slicer(entries, SLICER_VERSIONS, frozenset({"vtk"}))  # fine: nothing is changed or built
    main = ["anyio==4.16.0", "numpy==2.4.6", "transformers==5.25.0", "typing-extensions==4.16.0", "fastapi==0.165.0"]
    # the lock's versions seed uv's output file (preferences), less Slicer's own packages
    assert lock.preferences(main, set(SLICER_VERSIONS)) == ["anyio==4.16.0", "transformers==5.25.0", "fastapi==0.165.0"]
    assert lock.differences(entries, main, set(SLICER_VERSIONS)) == ["anyio 4.16.0 -> 4.14.2"]  # not Slicer's own
    text = lock.render_slicer(entries, "5.12", "3.12.10", "9034c71a8f" + "0" * 30, "uv pip compile ...",
                              ["anyio 4.16.0 -> 4.14.2"], "2026-12-06")
    assert "3D Slicer 5.12's Python 3.12.10" in text and "anyio 4.16.0 -> 4.14.2" in text
    assert "\nnumpy==2.4.6\n    # via -c slicer-bundled-5.12.txt, transformers\n" in text
    # a package that needs VTK (Slicer builds it: pip would put PyPI's over it) fails the lock ...
    needs_vtk = lock.parse_compiled(SLICER_UV_OUTPUT + "vtk==9.6.2\n    # via pyvista\n"
                                    "pyvista==0.47.0\n    # via -r x.in\n")
    with pytest.raises(SystemExit, match="pyvista need.*vtk, which Slicer builds itself"):
        lock.check_slicer(needs_vtk, SLICER_VERSIONS, frozenset({"vtk"}))
    # ... as does one of Slicer's packages at another version
    with pytest.raises(SystemExit, match="typing-extensions==4.16.0 .Slicer ships typing-extensions==4.15.0"):
        lock.check_slicer(lock.parse_compiled(SLICER_UV_OUTPUT.replace("4.15.0", "4.16.0")), SLICER_VERSIONS,
                          frozenset())
    assert lock.slicer_python("# python: 3.12.10\n") == "3.12"
    assert lock.slicer_requirements() == [r for r in lock.dependencies.LOCAL_REQUIREMENTS if not r.startswith("torch")]


SUPERBUILD = """\
set(proj python-dicom-requirements)
if(NOT Slicer_USE_SYSTEM_${proj})
  set(requirements_file ${CMAKE_BINARY_DIR}/${proj}-requirements.txt)
  file(WRITE ${requirements_file} [===[
  # [pillow]
  # Hashes correspond to the following packages:
  #  - pillow-12.2.0-cp312-cp312-win_amd64.whl
  pillow==12.2.0 --hash=sha256:0123 \\
                 --hash=sha256:4567
  # [/pillow]
  GitPython==3.1.50 --hash=sha256:89ab
  pyjpegls==1.5.1 ; sys_platform != "win32" --hash=sha256:cdef
  ]===])
endif()
"""


def test_slicers_pip_pins_and_built_packages_are_read_from_its_source():
    pins = slicer_bundled.pip_pins(SUPERBUILD)
    assert [str(r) for r in pins] == ["pillow==12.2.0", "GitPython==3.1.50", 'pyjpegls==1.5.1; sys_platform != "win32"']
    cmakelists = ('set(Slicer_REQUIRED_PYTHON_VERSION "3.12.10")\nset(_default_vtk_major_version "9")\n'
                  'set(_default_vtk_minor_version "6")\n')
    external_vtk = """\
  if("${Slicer_VTK_VERSION_MAJOR}.${Slicer_VTK_VERSION_MINOR}" STREQUAL "9.5")
    set(_git_tag "08210f") # slicer-v9.5.2
    set(vtk_dist_info_version "9.5.2")
  elseif("${Slicer_VTK_VERSION_MAJOR}.${Slicer_VTK_VERSION_MINOR}" STREQUAL "9.6")
    set(_git_tag "6181bb") # slicer-v9.6.2
    set(vtk_dist_info_version "9.6.2")
  else()
"""
    assert slicer_bundled.python_version(cmakelists) == "3.12.10"
    assert slicer_bundled.vtk_version(cmakelists, external_vtk) == "9.6.2"
    external_simpleitk = ('  ExternalProject_SetIfNotDefined(\n    Slicer_${proj}_GIT_TAG\n'
                          '    "a2adada3"  # slicer-v2.5.2-2025-06-13-2018b6b\n')
    assert slicer_bundled.simpleitk_tag(external_simpleitk) == "slicer-v2.5.2-2025-06-13-2018b6b"


def test_a_slicer_record_reads_back_as_written(tmp_path):
    record = slicer_bundled.Record("5.10", "66f3d12281" + "0" * 30, "2025-11-12", "3.12.10",
                                   pins={"numpy": ("numpy==2.0.2", "External_python-numpy.cmake"),
                                         "pyjpegls": ('pyjpegls==1.5.1 ; sys_platform != "win32"', "x.cmake")},
                                   built={"vtk": ("9.5.2", "built by External_VTK.cmake"),
                                          "simpleitk": (None, "built by External_SimpleITK.cmake")})
    path = tmp_path / "slicer-bundled-5.10.txt"
    path.write_text(slicer_bundled.render(record))
    versions, built = lock.dependencies.read_bundled(path)
    assert versions == {"numpy": "2.0.2", "pyjpegls": "1.5.1", "vtk": "9.5.2", "simpleitk": None}
    assert built == {"vtk", "simpleitk"}
    assert slicer_bundled.recorded_commit(path) == record.commit
    assert "# python: 3.12.10\n" in path.read_text()


def test_the_committed_slicer_resolutions_exist_for_every_supported_slicer():
    for version in lock.dependencies.SLICER_VERSIONS:
        for kind in ("constraints-slicer", "slicer-bundled"):
            assert (REPO / "requirements" / f"{kind}-{version}.txt").is_file(), f"{kind}-{version}.txt: run make lock"
