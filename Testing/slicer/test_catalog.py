"""The checks that Slicer's ExtensionsIndex runs on an extension's entry, run offline on ours.

The index validates each submitted entry with ``scripts/check_description_files.py`` (read at
Slicer/ExtensionsIndex ``main`` = ``07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c``, 2026-08-07; the script
is the same blob ``a2d521b`` on the index's ``5.12`` branch, ``a8ca7774``; ``5.10`` at ``13fc22ff`` runs
an older one without ``check_repository_size``). Its script is not copied here: each test below does
what one of its functions does, named in the test, against the entries in
``MedicalSAM3Slicer/ExtensionsIndex/<index branch>/MedicalSAM3.json`` and this repository's files
instead of a clone. Where the index fetches a URL, the test maps the URL to the file of this
repository that it names and checks that file (the index wants ``image/png``, ``image/jpeg`` or
``image/gif``).

Not run here, because they need the network: ``check_clone_repository`` (clones ``scm_url`` and checks
out ``scm_revision``: the release branches are cut by hand, see the entries' README) and
``check_git_repository_topics`` (the GitHub topic ``3d-slicer-extension``). Also mirrored: the index's
lint (``.pre-commit-config.yaml``: prettier with one array item per line, LF, final newline, no tabs)
and Slicer's metadata spec (``Extensions/CMake/SlicerExtensionDescriptionSpec.cmake``: icon PNG
128x128, one-line description).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import urllib.parse as urlparse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENTRIES_DIR = REPO / "MedicalSAM3Slicer" / "ExtensionsIndex"
EXTENSION_NAME = "MedicalSAM3"
SCHEMA = REPO / "Testing" / "data" / "slicer_catalog" / "slicer-extension-catalog-entry-schema-v1.0.1.json"
SCHEMA_BLOB = "86c76d98aa0c78d73b8f2ef8fa1973f7546cc472"  # Slicer/Slicer Schemas/...-v1.0.1.json at main 583e9b37

INDEX_COMMIT = "07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c"  # Slicer/ExtensionsIndex main, the script read
SUPPORTED_INDEX_BRANCHES = {"main", "5.10", "5.12"}
# Entries that exist in the index, at main 07f1d1b, 5.12 a8ca7774 and 5.10 13fc22ff (`check_dependencies`
# fails an entry whose build_dependencies name no entry of its branch). A new dependency: check the
# index's branches, then add it here.
INDEX_EXTENSIONS = {"PyTorch"}
# The category we use, in the script's ACCEPTED_EXTENSION_CATEGORIES at 07f1d1b (`check_category`).
ACCEPTED_CATEGORIES_USED = {"Segmentation"}

IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF"}
RAW_URL = re.compile(r"https://raw\.githubusercontent\.com/(?P<owner>[^/]+)/(?P<repo>[^/]+)/(?P<ref>[^/]+)/"
                     r"(?P<path>.+)")


def _entries() -> list[Path]:
    return sorted(ENTRIES_DIR.glob(f"*/{EXTENSION_NAME}.json"))


ENTRIES = _entries()
ENTRY_IDS = [p.parent.name for p in ENTRIES]


def _entry(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _cmake() -> str:
    return (REPO / "CMakeLists.txt").read_text(encoding="utf-8", errors="ignore")


def _cmake_set(name: str) -> str:
    match = re.search(rf'^set\s*\(\s*{name}\s+"([^"]*)"\s*\)', _cmake(), re.MULTILINE)
    assert match, f"no set({name} \"...\") in the top-level CMakeLists.txt"
    return match.group(1)


def _repo_of(scm_url: str) -> tuple[str, str]:
    """(owner, name) from scm_url, the way the script splits it (`check_git_repository_name`)."""
    path = urlparse.urlsplit(scm_url.strip().strip("/")).path
    return path.split("/")[1], os.path.splitext(path.split("/")[-1])[0]


def _local_file_of_url(url: str, scm_url: str) -> Path:
    """The file of this repository that a raw.githubusercontent URL of it serves (on `main`)."""
    match = RAW_URL.fullmatch(url)
    assert match, f"{url}: not a raw.githubusercontent.com URL (the raw file, not a web page)"
    assert (match["owner"], match["repo"]) == _repo_of(scm_url), f"{url}: not this repository ({scm_url})"
    assert match["ref"] == "main", f"{url}: the catalog's images are served from main, not {match['ref']}"
    path = REPO / urlparse.unquote(match["path"])
    assert path.is_file(), f"{url}: {path.relative_to(REPO)} does not exist in this repository"
    return path


def _image_kind(path: Path) -> str | None:
    head = path.read_bytes()[:8]
    return next((kind for sig, kind in IMAGE_SIGNATURES.items() if head.startswith(sig)), None)


def _decoded_size(path: Path) -> tuple[int, int]:
    image_module = pytest.importorskip("PIL.Image")
    with image_module.open(path) as image:
        image.load()  # decodes every pixel: a truncated or corrupt file fails here
        return image.size


# --- which entries -----------------------------------------------------------------------------------


def test_one_entry_per_supported_index_branch():
    """Ours, not the index's: one folder per index branch we support, each with MedicalSAM3.json."""
    folders = {p.name for p in ENTRIES_DIR.iterdir() if p.is_dir()}
    assert folders == SUPPORTED_INDEX_BRANCHES
    assert {p.parent.name for p in ENTRIES} == SUPPORTED_INDEX_BRANCHES
    for folder in folders:
        assert sorted(p.name for p in (ENTRIES_DIR / folder).iterdir()) == [f"{EXTENSION_NAME}.json"]
    assert (ENTRIES_DIR / "README.md").is_file(), "the release step is documented next to the entries"


def test_stable_entries_name_a_fixed_revision_and_differ_from_main_only_there():
    """Ours: the preview (index `main`) builds our `main`; a stable index branch X.Y builds our release
    branch X.Y or one commit, never `main`; nothing else differs between the entries."""
    main = _entry(ENTRIES_DIR / "main" / f"{EXTENSION_NAME}.json")
    assert main["scm_revision"] == "main"
    for path in ENTRIES:
        branch, entry = path.parent.name, _entry(path)
        if branch != "main":
            assert re.fullmatch(r"\d+\.\d+", branch), f"{branch}: not an index release branch name"
            revision = entry["scm_revision"]
            assert revision == branch or re.fullmatch(r"[0-9a-f]{40}", revision), (
                f"{branch}/{EXTENSION_NAME}.json: scm_revision {revision!r} must be the release branch "
                f"{branch!r} or a full commit hash")
        assert {k: v for k, v in entry.items() if k != "scm_revision"} == \
            {k: v for k, v in main.items() if k != "scm_revision"}, f"{branch}: differs from main's entry"


# --- check_description_files.py, one test per check ------------------------------------------------


@pytest.mark.parametrize("path", ENTRIES, ids=ENTRY_IDS)
def test_check_json_file_format(path):
    """`check_json_file_format`: valid JSON with LF-only line endings; and the index's lint
    (.pre-commit-config.yaml: prettier with one array item per line, end-of-file-fixer,
    trailing-whitespace, forbid-tabs), i.e. exactly what `json.dumps(indent=2)` writes."""
    raw = path.read_bytes()
    entry = json.loads(raw.decode("utf-8"))
    assert b"\r" not in raw, "CR or CRLF line endings"
    assert raw.decode("utf-8") == json.dumps(entry, indent=2, ensure_ascii=False) + "\n", \
        "not formatted as the index's prettier hook formats it"


def test_the_committed_schema_is_slicers_unmodified():
    data = SCHEMA.read_bytes()
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == SCHEMA_BLOB


@pytest.mark.parametrize("path", ENTRIES, ids=ENTRY_IDS)
def test_check_json_schema_names_the_schema_and_keeps_its_keys(path):
    """`check_json_schema`, the part that needs no jsonschema: `$schema` is set and names the schema we
    hold (the script downloads that URL and validates against it); the schema's required keys are
    present, no other keys (additionalProperties: false), each of the declared JSON type."""
    entry, schema = _entry(path), json.loads(SCHEMA.read_text())
    assert entry.get("$schema"), "no $schema"
    assert entry["$schema"].split("#")[0] == schema["$id"].split("#")[0]
    assert set(schema["required"]) <= set(entry), f"missing: {set(schema['required']) - set(entry)}"
    assert set(entry) <= set(schema["properties"]), f"unknown keys: {set(entry) - set(schema['properties'])}"
    types = {"string": str, "array": list, "boolean": bool, "integer": int, "object": dict}
    for key, value in entry.items():
        spec = schema["properties"][key]
        assert isinstance(value, types[spec["type"]]), key
        assert not (spec["type"] == "integer" and isinstance(value, bool)), key
        if "enum" in spec:
            assert value in spec["enum"], key
        if "minimum" in spec:
            assert spec["minimum"] <= value <= spec["maximum"], key
        if spec["type"] == "array":
            assert all(isinstance(item, str) for item in value), key


@pytest.mark.parametrize("path", ENTRIES, ids=ENTRY_IDS)
def test_check_json_schema(path):
    """`check_json_schema`: `jsonschema.validate(entry, schema)`, with the schema from Testing/data."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(_entry(path), schema)


def test_check_extension_name():
    """`check_extension_name`: the extension name (the entry's file name) does not start with 'Slicer'."""
    assert not EXTENSION_NAME.lower().startswith("slicer")
    assert all(p.stem == EXTENSION_NAME for p in ENTRIES)


@pytest.mark.parametrize("path", ENTRIES, ids=ENTRY_IDS)
def test_check_category(path):
    """`check_category`: a category of the index's list; and the CMake's EXTENSION_CATEGORY is the same
    (the index's pull request template: the entry consistent with the top-level CMakeLists.txt)."""
    category = _entry(path)["category"]
    assert category in ACCEPTED_CATEGORIES_USED
    assert _cmake_set("EXTENSION_CATEGORY") == category


@pytest.mark.parametrize("path", ENTRIES, ids=ENTRY_IDS)
def test_check_git_repository_name(path):
    """`check_git_repository_name`: the repository's name (last part of scm_url, without .git) starts
    with Slicer (or Slicer-, Slicer_, SlicerExtension-, SlicerExtension_)."""
    _, name = _repo_of(_entry(path)["scm_url"])
    assert name and name.startswith(("Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_")), name


@pytest.mark.parametrize("path", ENTRIES, ids=ENTRY_IDS)
def test_check_scm_url_syntax(path):
    """`check_scm_url_syntax`: scheme://host/path with scheme git or https."""
    url = _entry(path)["scm_url"]
    assert "://" in url and urlparse.urlsplit(url).scheme in ("git", "https"), url


@pytest.mark.parametrize("path", ENTRIES, ids=ENTRY_IDS)
def test_check_dependencies(path):
    """`check_dependencies`: every build dependency is an extension of the index; and they are the
    CMake's EXTENSION_DEPENDS (the pull request template: entry and CMakeLists.txt consistent)."""
    dependencies = _entry(path).get("build_dependencies", [])
    assert all(dependencies) and set(dependencies) <= INDEX_EXTENSIONS, dependencies
    depends = _cmake_set("EXTENSION_DEPENDS").split()
    assert sorted(dependencies) == sorted(d for d in depends if d != "NA")


def test_check_cmakelists_content_project_name():
    """`check_cmakelists_content`: the first project() of the top-level CMakeLists.txt is the extension
    name, i.e. the entry's file name."""
    names = re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", _cmake(), re.IGNORECASE)
    assert names and names[0].strip("\"'") == EXTENSION_NAME


def test_check_cmakelists_content_icon_url():
    """`check_cmakelists_content` + `validate_image_url` for EXTENSION_ICONURL: an http(s) URL of an
    image (PNG, JPEG or GIF); here: the file it names is in this repository and decodes; Slicer's spec
    (SlicerExtensionDescriptionSpec.cmake): a PNG of 128x128 pixels."""
    urls = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', _cmake(), re.IGNORECASE)
    assert urls, "no EXTENSION_ICONURL"
    url = urls[0].strip()
    assert url.startswith("http")
    path = _local_file_of_url(url, _entry(ENTRIES_DIR / "main" / f"{EXTENSION_NAME}.json")["scm_url"])
    assert path.suffix.lower() == ".png" and _image_kind(path) == "PNG", path
    assert _decoded_size(path) == (128, 128)


def test_check_cmakelists_content_screenshot_urls():
    """`check_cmakelists_content` + `validate_image_url` for EXTENSION_SCREENSHOTURLS (space separated,
    the script's pattern wants `"` right before `)`): each an http(s) URL of a PNG, JPEG or GIF (an SVG
    is refused); here: each names a file of this repository with an image extension whose content is
    that kind of image and decodes. Ours: each under 200 kB."""
    lists = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', _cmake(), re.IGNORECASE)
    assert lists, "no EXTENSION_SCREENSHOTURLS"
    urls = lists[0].split()
    assert urls
    scm_url = _entry(ENTRIES_DIR / "main" / f"{EXTENSION_NAME}.json")["scm_url"]
    for url in urls:
        assert url.startswith("http"), url
        assert url.lower().endswith((".png", ".jpg", ".jpeg", ".gif")), f"{url}: not a PNG, JPEG or GIF"
        path = _local_file_of_url(url, scm_url)
        kind = _image_kind(path)
        assert kind == {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".gif": "GIF"}[path.suffix.lower()], path
        width, height = _decoded_size(path)
        assert width >= 200 and height >= 200, f"{path}: {width}x{height}, too small to show anything"
        assert path.stat().st_size < 200_000, f"{path}: keep screenshots small"


def test_cmake_extension_metadata():
    """The rest of the CMake's metadata (Slicer's SlicerExtensionDescriptionSpec.cmake and the index's
    pull request template; the script reads only the icon and screenshots): the homepage is a page of
    this repository, its #anchor a heading of README.md; a one-line description; contributors set."""
    owner, name = _repo_of(_entry(ENTRIES_DIR / "main" / f"{EXTENSION_NAME}.json")["scm_url"])
    homepage = urlparse.urlsplit(_cmake_set("EXTENSION_HOMEPAGE"))
    assert (homepage.scheme, homepage.netloc) == ("https", "github.com")
    assert homepage.path.strip("/").split("/")[:2] == [owner, name]
    if homepage.fragment:
        headings = re.findall(r"^#+\s+(.+?)\s*$", (REPO / "README.md").read_text(encoding="utf-8"), re.MULTILINE)
        anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
        assert homepage.fragment in anchors, f"#{homepage.fragment} is no heading of README.md"
    description = _cmake_set("EXTENSION_DESCRIPTION")
    assert description.strip() and "\n" not in description
    assert _cmake_set("EXTENSION_CONTRIBUTORS").strip()


def test_check_license_file():
    """`check_license_file`: a license file at the repository root (its first accepted name: LICENSE),
    here the Apache License 2.0 that pyproject.toml declares; the shipped model and sample scan keep
    their own terms next to them."""
    names = ["LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt"]
    found = [n for n in names if (REPO / n).is_file()]
    assert found, "no license file at the repository root"
    text = (REPO / found[0]).read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()
    assert (REPO / "Resources" / "sample" / "LICENSE-TotalSegmentator").is_file()
    assert (REPO / "Resources" / "demo_model" / "README.md").is_file()  # the model card, with its licences


def test_check_repository_size():
    """`check_repository_size`: the clone (files and .git) under 100 MB. Here: the tracked files plus the
    objects reachable from HEAD as stored (a fresh clone packs them smaller)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    tracked = sum((REPO / f).stat().st_size for f in files.decode().split("\0") if f and (REPO / f).is_file())
    objects = subprocess.run(["git", "rev-list", "--objects", "--no-object-names", "HEAD"], cwd=REPO,
                             capture_output=True, check=True).stdout
    sizes = subprocess.run(["git", "cat-file", "--batch-check=%(objectsize:disk)"], cwd=REPO, input=objects,
                           capture_output=True, check=True).stdout.split()
    history = sum(int(s) for s in sizes if s.isdigit())
    assert (tracked + history) / 2**20 < 100, f"{tracked / 2**20:.1f} MB files + {history / 2**20:.1f} MB history"
