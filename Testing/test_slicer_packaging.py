"""The extension as the Slicer Extensions Index and a packaged install see it.

1. The Index's own checks of R1Seg3D.json and the top-level CMakeLists.txt, re-implemented from
   Slicer/ExtensionsIndex `scripts/check_description_files.py` (main, 2026: the version with
   check_extension_name, check_json_file_format and check_git_repository_topics) and the catalog-entry schema
   that R1Seg3D.json names (Slicer/Slicer `Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json`). What the
   checker does over the network is done here on the working tree (see `check_image_url`); it also clones
   scm_url and asks GitHub for the repository's `3d-slicer-extension` topic, which no offline test can do.
2. The packaged layout: the files the CMake install rules put into the extension's qt-scripted-modules folder,
   worked out from the CMake files (the commands they use, evaluated as CMake does; cross-checked against CMake
   itself where it is installed), copied into a temporary folder, and the engine run from there alone.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXTENSION_NAME = "R1Seg3D"
DESCRIPTION_FILE = REPO / f"{EXTENSION_NAME}.json"
CMAKE_FILE = REPO / "CMakeLists.txt"


# ---- 1. the Extensions Index checker ---------------------------------------------------------------------


class IndexCheckError(AssertionError):
    pass


# check_description_files.py, ACCEPTED_EXTENSION_CATEGORIES.
ACCEPTED_EXTENSION_CATEGORIES = {
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda", "Converters",
    "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation", "Filtering",
    "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "Image Synthesis", "IGT", "Informatics",
    "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning", "Otolaryngology",
    "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy", "Registration", "Remote",
    "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis", "Shape Regression", "Shape Visualization",
    "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging", "Supervisely", "Surface Models", "SurfaceLearner",
    "Tomographic Reconstruction", "Tracking", "Tractography", "Training", "Ultrasound", "Utilities",
    "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools", "Web System Tools", "Wizards",
}

# slicer-extension-catalog-entry-schema-v1.0.1.json: required keys, additionalProperties false, and each property's
# type (and enum) as the schema states them.
SCHEMA_URL = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
              "slicer-extension-catalog-entry-schema-v1.0.1.json#")
SCHEMA_REQUIRED = ("$schema", "category", "scm_url")
SCHEMA_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                     "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
SCHEMA_ENUMS = {"scm_type": ("git", "local"), "tier": (1, 3, 5)}

# check_cmakelists_content's regular expressions, as the checker writes them.
PROJECT_PATTERN = r'project\s*\(\s*([^\s\)\n\r]+)'
ICON_URL_PATTERN = r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)'
SCREENSHOT_URLS_PATTERN = r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)'
# check_license_file's names, in its order.
LICENSE_FILE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
# validate_image_url accepts these content types; GitHub's raw server sends them for these file endings.
IMAGE_SIGNATURES = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".gif": b"GIF8"}


def check_json_schema(name, metadata, **_):
    if not metadata.get("$schema"):
        raise IndexCheckError("No $schema field found in extension description")
    if metadata["$schema"] != SCHEMA_URL:
        raise IndexCheckError(f"$schema is {metadata['$schema']!r}; this test knows the rules of {SCHEMA_URL}")
    for key in SCHEMA_REQUIRED:
        if key not in metadata:
            raise IndexCheckError(f"JSON schema validation failed: '{key}' is a required property")
    for key, value in metadata.items():
        if key not in SCHEMA_PROPERTIES:
            raise IndexCheckError(f"JSON schema validation failed: additional property {key!r}")
        expected = SCHEMA_PROPERTIES[key]
        # JSON Schema's "integer" excludes true/false, which Python counts as int.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise IndexCheckError(f"JSON schema validation failed: {value!r} is not of type {expected.__name__} "
                                  f"at {key}")
        if key in SCHEMA_ENUMS and value not in SCHEMA_ENUMS[key]:
            raise IndexCheckError(f"JSON schema validation failed: {value!r} is not one of {SCHEMA_ENUMS[key]} "
                                  f"at {key}")
    if not all(isinstance(item, str) for item in metadata.get("build_dependencies", [])):
        raise IndexCheckError("JSON schema validation failed: build_dependencies items must be strings")


def check_json_file_format(name, metadata, *, description_text, **_):
    json.loads(description_text)
    if "\r" in description_text:
        raise IndexCheckError("File contains non-LF line endings (CR or CRLF). Please convert to LF-only line endings.")


def check_extension_name(name, metadata, **_):
    if name.lower().startswith("slicer"):
        raise IndexCheckError("extension name should not start with 'Slicer'. "
                              f"Please, consider changing it to '{name[6:]}'.")


def check_category(name, metadata, **_):
    if metadata.get("category") not in ACCEPTED_EXTENSION_CATEGORIES:
        raise IndexCheckError(f"Category {metadata.get('category')!r} is unknown")


def check_git_repository_name(name, metadata, **_):
    repository = os.path.splitext(urllib.parse.urlsplit(metadata["scm_url"]).path.split("/")[-1])[0]
    if "slicer" not in repository.lower():
        raise IndexCheckError(f"extension repository name is '{repository}'. "
                              f"Please, consider changing it to 'Slicer{repository}'")


def check_scm_url_syntax(name, metadata, **_):
    if "://" not in metadata["scm_url"]:
        raise IndexCheckError("scm_url do not match scheme://host/path")
    scheme = urllib.parse.urlsplit(metadata["scm_url"]).scheme
    if scheme not in ("git", "https"):
        raise IndexCheckError(f"scm_url scheme is '{scheme}' but it should by any of ['git', 'https']")


def check_cmakelists_content(name, metadata, *, cmake_text, repository_root, **_):
    matches = re.findall(PROJECT_PATTERN, cmake_text, re.IGNORECASE | re.MULTILINE)
    in_cmake = matches[0].strip().strip('"').strip("'") if matches else None
    if in_cmake != name:
        raise IndexCheckError(f"Extension name in CMakeLists.txt project name '{in_cmake}' does not match extension "
                              f"description file name '{name}'")
    icons = re.findall(ICON_URL_PATTERN, cmake_text, re.IGNORECASE | re.MULTILINE)
    if not icons:
        raise IndexCheckError("No EXTENSION_ICONURL found in CMakeLists.txt.")
    screenshot_lists = re.findall(SCREENSHOT_URLS_PATTERN, cmake_text, re.IGNORECASE | re.MULTILINE)
    screenshots = screenshot_lists[0].split() if screenshot_lists else []
    if not screenshots:
        raise IndexCheckError("No EXTENSION_SCREENSHOTURLS found in CMakeLists.txt.")
    for kind, url in [("EXTENSION_ICONURL", icons[0].strip()), *(("EXTENSION_SCREENSHOTURLS", u) for u in screenshots)]:
        if not url.startswith("http"):
            raise IndexCheckError(f"{kind} '{url}' should be a valid URL starting with 'http'")
        check_image_url(url, kind, metadata, repository_root)


def check_image_url(url, kind, metadata, repository_root):
    """validate_image_url downloads the URL and wants an image content type. Offline, the URL must be a raw file of
    the repository and revision that the entry builds, and that file must exist here and be an image."""
    scm = urllib.parse.urlsplit(metadata["scm_url"])
    owner_repository = scm.path.strip("/").removesuffix(".git")
    raw_prefix = f"https://raw.githubusercontent.com/{owner_repository}/{metadata.get('scm_revision', 'main')}/"
    if scm.netloc != "github.com" or not url.startswith(raw_prefix):
        raise IndexCheckError(f"{kind} '{url}' is not a raw file of {metadata['scm_url']} at its scm_revision "
                              f"({raw_prefix}...), so this test cannot check it")
    path = repository_root / urllib.parse.unquote(url[len(raw_prefix):])
    signature = IMAGE_SIGNATURES.get(path.suffix.lower())
    if not path.is_file():
        raise IndexCheckError(f"Failed to download {kind.lower()} from {kind} '{url}': {path} does not exist")
    if signature is None or not path.read_bytes().startswith(signature):
        raise IndexCheckError(f"{kind} '{url}' does not point to a valid image")


def check_license_file(name, metadata, *, repository_root, **_):
    if not any((repository_root / file_name).is_file() for file_name in LICENSE_FILE_NAMES):
        raise IndexCheckError("No license file found in repository root.")


# In the order check_description_files.main runs them (after the clone, which is the working tree here).
INDEX_CHECKS = (check_json_schema, check_json_file_format, check_extension_name, check_category,
                check_git_repository_name, check_scm_url_syntax, check_cmakelists_content, check_license_file)


def index_check_failures(name, description_text, cmake_text, repository_root=REPO) -> list[str]:
    metadata = json.loads(description_text)
    failures = []
    for check in INDEX_CHECKS:
        try:
            check(name, metadata, description_text=description_text, cmake_text=cmake_text,
                  repository_root=repository_root)
        except (IndexCheckError, KeyError) as error:
            failures.append(f"{check.__name__}: {error}")
    return failures


def failed_checks(name, description_text, cmake_text, repository_root=REPO) -> list[str]:
    return [failure.split(":")[0] for failure in index_check_failures(name, description_text, cmake_text,
                                                                       repository_root)]


def cmake_set(cmake_text: str, variable: str) -> str:
    """The quoted value of `set(VARIABLE "...")`, CMake's escapes resolved."""
    value = re.search(rf'set\({variable}\s+"((?:\\.|[^"\\])*)"\)', cmake_text)[1]
    return re.sub(r"\\(.)", r"\1", value)


def test_the_index_entry_and_cmake_metadata_pass_the_extensions_index_checks():
    failures = index_check_failures(EXTENSION_NAME, DESCRIPTION_FILE.read_text(encoding="utf-8"),
                                    CMAKE_FILE.read_text(encoding="utf-8"))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("change, failing_check", [
    (lambda entry, cmake: (entry.replace('"Segmentation"', '"AI"'), cmake), "check_category"),
    (lambda entry, cmake: (entry.replace("/SlicerR1Seg3D.git", "/R1Seg3D.git"),
                           cmake.replace("/SlicerR1Seg3D/", "/R1Seg3D/")), "check_git_repository_name"),
    (lambda entry, cmake: (entry.replace('"https://github.com', '"ssh://github.com'), cmake), "check_scm_url_syntax"),
    (lambda entry, cmake: (entry.replace('"tier": 1', '"tier": 2'), cmake), "check_json_schema"),
    (lambda entry, cmake: (entry.replace('"tier": 1', '"tier": 1, "homepage": "x"'), cmake), "check_json_schema"),
    (lambda entry, cmake: (entry.replace("\n", "\r\n"), cmake), "check_json_file_format"),
    (lambda entry, cmake: (entry, cmake.replace("project(R1Seg3D)", "project(R1Seg3DExtension)")),
     "check_cmakelists_content"),
    # A ${variable} is not expanded by the checker: the URL does not start with http.
    (lambda entry, cmake: (entry, re.sub(r'set\(EXTENSION_ICONURL "https://[^"]*/main/',
                                         'set(EXTENSION_ICONURL "${RAW}/', cmake)), "check_cmakelists_content"),
    # The icon as a file that the repository does not hold.
    (lambda entry, cmake: (entry, cmake.replace("/main/R1Seg3D.png", "/main/Screenshot01.png")),
     "check_cmakelists_content"),
    # Raw files of another branch than the one the entry builds.
    (lambda entry, cmake: (entry.replace('"scm_revision": "main"', '"scm_revision": "release"'), cmake),
     "check_cmakelists_content"),
])
def test_the_checks_reject_what_the_extensions_index_rejects(change, failing_check):
    entry, cmake = change(DESCRIPTION_FILE.read_text(encoding="utf-8"), CMAKE_FILE.read_text(encoding="utf-8"))
    assert failed_checks(EXTENSION_NAME, entry, cmake) == [failing_check]


def test_the_checks_reject_a_slicer_prefixed_name_and_a_missing_licence(tmp_path):
    entry, cmake = DESCRIPTION_FILE.read_text(encoding="utf-8"), CMAKE_FILE.read_text(encoding="utf-8")
    renamed = cmake.replace("project(R1Seg3D)", "project(SlicerR1Seg3D)")
    assert failed_checks("SlicerR1Seg3D", entry, renamed) == ["check_extension_name"]
    for image in ("R1Seg3D.png", "Screenshots/R1Seg3D-answer.png"):
        (tmp_path / image).parent.mkdir(exist_ok=True)
        shutil.copyfile(REPO / image, tmp_path / image)
    assert failed_checks(EXTENSION_NAME, entry, cmake, tmp_path) == ["check_license_file"]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (IHDR is the first chunk: bytes 16-23)."""
    data = path.read_bytes()[:24]
    assert data[:8] == IMAGE_SIGNATURES[".png"] and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_metadata_follows_the_slicer_templates_and_agrees_with_the_index_entry():
    """Conventions the checker does not test: Slicer's templates' (Utilities/Templates/Extensions/Default/
    CMakeLists.txt: contributors as "John Doe (AnyWare Corp.)"; the scripted-module template's 128x128 icon), the
    Index's pull-request checklist (.github/PULL_REQUEST_TEMPLATE.md: a description of 1-2
    sentences, at least one screenshot) and the older s4ext checker's https homepage; and that the two files agree."""
    cmake = CMAKE_FILE.read_text(encoding="utf-8")
    entry = json.loads(DESCRIPTION_FILE.read_text(encoding="utf-8"))
    for contributor in cmake_set(cmake, "EXTENSION_CONTRIBUTORS").split(","):
        assert re.fullmatch(r"[^()]+\S \([^()]+\)", contributor.strip()), contributor
    description = cmake_set(cmake, "EXTENSION_DESCRIPTION")
    assert 1 <= len(re.findall(r"[.!?](?=\s|$)", description)) <= 2, description
    assert "MICCAI 2025" in description
    repository = cmake_set(cmake, "R1SEG3D_REPOSITORY")
    homepage = cmake_set(cmake, "EXTENSION_HOMEPAGE").replace("${R1SEG3D_REPOSITORY}", repository)
    assert homepage.startswith("https://")
    assert (REPO / homepage.split("/blob/main/")[1]).is_file(), homepage
    assert png_size(REPO / "R1Seg3D.png") == (128, 128)
    assert cmake_set(cmake, "EXTENSION_CATEGORY") == entry["category"]
    # The Index builds with build_dependencies; Slicer's extension manager installs EXTENSION_DEPENDS.
    assert cmake_set(cmake, "EXTENSION_DEPENDS").split() == entry["build_dependencies"]
    assert entry["scm_url"].removesuffix(".git") == repository


def test_the_screenshot_is_a_small_png_that_the_screenshot_script_writes(tmp_path):
    import py_compile

    screenshot, script = REPO / "Screenshots" / "R1Seg3D-answer.png", REPO / "Screenshots" / "make_screenshot.py"
    width, height = png_size(screenshot)
    assert width >= 800 and height >= 300, (width, height)
    assert screenshot.stat().st_size < 500 * 1024
    py_compile.compile(str(script), cfile=str(tmp_path / "make_screenshot.pyc"), doraise=True)  # not beside it
    assert f'"{screenshot.name}"' in script.read_text(encoding="utf-8")


# ---- 2. the packaged layout ------------------------------------------------------------------------------

# Where Slicer's build puts scripted modules; both sides of the install are named after the install folder.
SCRIPTED_MODULES = "qt-scripted-modules"
CMAKE_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|#[^\n]*|[()]|[^\s()"#]+')
# Commands that only configure the build, test or package metadata and install nothing by themselves.
NOT_INSTALLING = {"cmake_minimum_required", "project", "find_package", "include", "if", "else", "elseif", "endif",
                  "slicer_add_python_unittest", "message"}


def cmake_commands(text: str):
    """(name, [(raw argument, quoted)]) for each command of a CMake file, comments dropped."""
    tokens = [t for t in CMAKE_TOKEN.findall(text) if not t.startswith("#")]
    position = 0
    while position < len(tokens):
        name = tokens[position]
        assert tokens[position + 1] == "(", f"unexpected CMake text near {name!r}"
        depth, position, arguments = 1, position + 2, []
        while True:
            token = tokens[position]
            position += 1
            depth += {"(": 1, ")": -1}.get(token, 0)
            if depth == 0:
                break
            if token not in "()":
                arguments.append((token, token.startswith('"')))
        yield name, arguments


def cmake_value(raw: str, quoted: bool, variables: dict) -> list[str]:
    """An argument as CMake reads it: escapes resolved, ${VAR} expanded (innermost first), and an unquoted one
    split into its list items."""
    text = re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m[1], m[1]), raw[1:-1] if quoted else raw)
    while (reference := re.search(r"\$\{([^${}]+)\}", text)) is not None:
        text = text[:reference.start()] + variables.get(reference[1], "") + text[reference.end():]
    return [text] if quoted else [item for item in text.split(";") if item]


def cmake_glob_recurse(pattern: str, relative_to: Path) -> list[str]:
    """file(GLOB_RECURSE) with CMake's defaults: files only, the last component matched in the pattern's directory
    and every directory below it, symbolic links to directories not followed."""
    directory, name_pattern = os.path.split(pattern)
    assert not any(c in directory for c in "*?["), f"a wildcard in a directory is not evaluated here: {pattern}"
    found = []
    for folder, _, files in os.walk(directory):
        found += [Path(folder, f) for f in files if fnmatch.fnmatchcase(f, name_pattern)]
    return sorted(path.relative_to(relative_to).as_posix() for path in found)


def keyword_arguments(values: list[str], keywords: set[str]) -> dict[str, list[str]]:
    """A CMake macro's arguments grouped by keyword (cmake_parse_arguments): options map to []."""
    groups, current = {}, None
    for value in values:
        if value in keywords:
            current = groups.setdefault(value, [])
        else:
            assert current is not None, f"argument {value!r} before any keyword"
            current.append(value)
    return groups


def install_python_files(groups, source_dir: Path, install_dir: str, installed: dict):
    """ctkMacroCompilePythonScript: each script (".py" added when its name lacks it) and resource is copied to the
    destination folder at its path relative to SOURCE_DIR, and that folder's content installed into INSTALL_DIR."""
    assert "NO_INSTALL_SUBDIR" in groups, "without NO_INSTALL_SUBDIR CTK installs one folder deeper; not evaluated here"
    for file_name in groups.get("SCRIPTS", []):
        file_name = file_name if "py" in Path(file_name).suffix else f"{file_name}.py"
        installed[f"{install_dir}/{file_name}"] = source_dir / file_name
    for file_name in groups.get("RESOURCES", []):
        installed[f"{install_dir}/{file_name}"] = source_dir / file_name


def cmake_install_tree(source_dir: Path, variables: dict | None = None, installed: dict | None = None) -> dict:
    """{path in the installed extension: source file} for the rules of source_dir/CMakeLists.txt and the
    subdirectories it adds. Any command that could install something and is not evaluated here fails, so that a new
    install rule cannot go unchecked."""
    variables = dict(variables or {"CMAKE_BINARY_DIR": "/build", "Slicer_QTSCRIPTEDMODULES_LIB_DIR": SCRIPTED_MODULES,
                                    "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR": SCRIPTED_MODULES})
    variables["CMAKE_CURRENT_SOURCE_DIR"] = str(source_dir)
    installed = {} if installed is None else installed
    for name, arguments in cmake_commands((source_dir / "CMakeLists.txt").read_text(encoding="utf-8")):
        values = [v for raw, quoted in arguments for v in cmake_value(raw, quoted, variables)]
        command = name.lower()
        if command in NOT_INSTALLING:
            continue
        if command == "set":
            variables[values[0]] = ";".join(values[1:])
        elif command == "file" and values[0] == "GLOB_RECURSE":
            variable, rest = values[1], values[2:]
            relative_to = Path(rest[1]) if rest[0] == "RELATIVE" else None
            rest = [v for v in (rest[2:] if relative_to else rest) if v != "CONFIGURE_DEPENDS"]
            assert relative_to is not None, "file(GLOB_RECURSE) without RELATIVE is not evaluated here"
            variables[variable] = ";".join(f for pattern in rest for f in cmake_glob_recurse(pattern, relative_to))
        elif command == "list" and values[0] == "REMOVE_DUPLICATES":
            variables[values[1]] = ";".join(dict.fromkeys(variables[values[1]].split(";")))
        elif command == "list" and values[0] == "FILTER" and values[3] == "REGEX":
            keep = values[2] == "INCLUDE"
            items = variables[values[1]].split(";")
            variables[values[1]] = ";".join(i for i in items if bool(re.search(values[4], i)) == keep)
        elif command == "ctkmacrocompilepythonscript":
            groups = keyword_arguments(values, {"TARGET_NAME", "SCRIPTS", "RESOURCES", "SOURCE_DIR", "DESTINATION_DIR",
                                                "INSTALL_DIR", "NO_INSTALL_SUBDIR", "GLOBAL_TARGET"})
            install_python_files(groups, Path(groups.get("SOURCE_DIR", [str(source_dir)])[0]),
                                 groups["INSTALL_DIR"][0], installed)
        elif command == "slicermacrobuildscriptedmodule":
            # Slicer's macro: ctkMacroCompilePythonScript of SCRIPTS and RESOURCES from the module folder into
            # Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR, with NO_INSTALL_SUBDIR unless WITH_SUBDIR is given.
            groups = keyword_arguments(values, {"NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR"})
            assert "WITH_SUBDIR" not in groups, "WITH_SUBDIR is not evaluated here"
            groups["NO_INSTALL_SUBDIR"] = []
            for listed in groups.get("SCRIPTS", []) + groups.get("RESOURCES", []):
                # The macro stops the configuration for a listed file that does not exist.
                assert (source_dir / listed).exists() or (source_dir / f"{listed}.py").exists(), listed
            install_python_files(groups, source_dir, variables["Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR"], installed)
        elif command == "add_subdirectory":
            cmake_install_tree(source_dir / values[0], variables, installed)
        else:
            raise AssertionError(f"{source_dir / 'CMakeLists.txt'}: {name}({' '.join(values[:3])} ...) is not "
                                 "evaluated by this test; teach cmake_install_tree what it installs")
    return installed


@pytest.fixture(scope="module")
def install_tree() -> dict:
    return cmake_install_tree(REPO)


def test_the_install_tree_holds_the_module_the_engine_its_model_and_the_sample_ct_with_its_licence(install_tree):
    modules_dir = f"{SCRIPTED_MODULES}/"
    assert all(path.startswith(modules_dir) for path in install_tree)
    installed = {path[len(modules_dir):] for path in install_tree}
    # Slicer loads every .py at the top of the folder as a module: only the module file may be there.
    assert {path for path in installed if "/" not in path and path.endswith(".py")} == {"R1Seg3DSlicer.py"}
    assert {"R1Seg3DSlicerScripts/batch.py", "R1Seg3DSlicerLib/__init__.py", "Resources/R1Seg3D.term.json",
            "Resources/requirements.txt", "r1seg_core/__init__.py",
            "r1seg_core/vocabulary/structures.json"} <= installed
    # Everything the engine's data folder holds ships (a retrained default model may bring other files).
    data = {p.relative_to(REPO).as_posix() for p in (REPO / "r1seg_core" / "data").rglob("*") if p.is_file()}
    assert data <= installed, sorted(data - installed)
    assert not [path for path in installed if "__pycache__" in path or path.endswith(".pyc")]
    # The sample CT's licence travels with it: the data folder's README names the source and the licence.
    readme = (REPO / "r1seg_core" / "data" / "README.md").read_text(encoding="utf-8")
    sample_section = readme.split("## `sample_ct.nii.gz`")[1].split("\n## ")[0]
    assert "r1seg_core/data/README.md" in installed and "| Licence | Apache-2.0" in sample_section


def test_the_install_rules_evaluate_as_cmake_evaluates_them(tmp_path, install_tree):
    """The top-level file's glob and list commands run by CMake itself (script mode), against this test's reading."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed; the Python evaluation of the same rules is used alone")
    lines, variables = [f'set(CMAKE_CURRENT_SOURCE_DIR "{REPO.as_posix()}")'], []
    for name, arguments in cmake_commands(CMAKE_FILE.read_text(encoding="utf-8")):
        if name in ("file", "list"):
            # CONFIGURE_DEPENDS (re-glob at build time) is refused in script mode and changes no result.
            lines.append(f"{name}({' '.join(raw for raw, _ in arguments if raw != 'CONFIGURE_DEPENDS')})")
            variables.append(arguments[1][0])
    lines += [f'foreach(f IN LISTS {" ".join(dict.fromkeys(variables))})', '  message("FILE ${f}")', "endforeach()"]
    (tmp_path / "rules.cmake").write_text("\n".join(lines) + "\n")
    run = subprocess.run([cmake, "-P", str(tmp_path / "rules.cmake")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    by_cmake = {line[5:] for line in run.stderr.splitlines() if line.startswith("FILE ")}
    by_test = {path[len(SCRIPTED_MODULES) + 1:] for path in install_tree if "/r1seg_core/" in f"/{path}"}
    assert by_cmake == by_test, (sorted(by_cmake - by_test), sorted(by_test - by_cmake))


ASK_FROM_THE_INSTALL_TREE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])          # what Slicer does for an extension's qt-scripted-modules folder
    import torch
    torch.set_num_threads(1)
    import r1seg_core
    from r1seg_core import Predictor, read_volume, sample_ct_path

    predictor = Predictor(device="cpu")
    result = predictor.ask(read_volume(sample_ct_path()), "Segment the liver.", sliding_window=False)
    files = sorted({m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)})
    print(json.dumps({"engine": r1seg_core.__file__, "model": str(predictor.model_dir), "ct": str(sample_ct_path()),
                      "voxels": {t.name: t.voxel_count for t in result.targets}, "answer": result.answer,
                      "files": files}))
""")


@pytest.mark.slow
def test_the_default_model_answers_from_the_install_tree_alone(tmp_path, install_tree):
    """A file the install rules miss (a weight, the tokenizer, the vocabulary, the CT) makes this fail: the engine
    runs in a clean interpreter whose only project folder is the copied install tree."""
    for installed_path, source in install_tree.items():
        (tmp_path / installed_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp_path / installed_path)
    modules_dir = tmp_path / SCRIPTED_MODULES
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # -I: no PYTHONPATH, no current folder, no user site-packages; the installed packages (torch, ...) remain.
    run = subprocess.run([sys.executable, "-I", "-c", ASK_FROM_THE_INSTALL_TREE, str(modules_dir)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for key in ("engine", "model", "ct"):
        assert Path(report[key]).is_relative_to(modules_dir), (key, report[key])
    assert report["voxels"].get("liver", 0) > 0, report["answer"]
    # (torch names two of its modules by a bare file name, hence the isabs.)
    from_the_checkout = [f for f in report["files"] if os.path.isabs(f) and Path(f).resolve().is_relative_to(REPO)]
    assert not from_the_checkout, from_the_checkout
