"""The models `r1seg models` knows (data: models.json, or the file $R1SEG_REGISTRY names) and where they live.

An installed model is a model folder under the project's cache, `<cache>/models/<name>`, holding `download.json`
(the record of what was downloaded: repositories, commits, files and their SHA-256). That folder is the only thing
`--model NAME` needs: no network is used once it exists.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidInputError
from .. import cache_folder

BUNDLED_REGISTRY = Path(__file__).resolve().parent / "models.json"
REGISTRY_VARIABLE = "R1SEG_REGISTRY"
RECORD_NAME = "download.json"


@dataclass(frozen=True)
class Source:
    role: str
    repo: str
    revision: str | None          # a commit; None: the current commit of main, resolved and recorded at download
    files: tuple[str, ...]        # shell-style patterns
    sha256: dict = field(default_factory=dict)   # file -> pinned SHA-256 (optional)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    title: str
    answers: bool
    download: str
    memory: str
    licence: str
    bundled: bool = False
    note: str = ""
    sources: tuple[Source, ...] = ()
    convert: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        """Where the converted model folder lives (the bundled model: inside the package)."""
        if self.bundled:
            from .. import default_model_path

            return default_model_path()
        return models_folder() / self.name

    @property
    def installed(self) -> bool:
        return self.bundled or (self.folder / RECORD_NAME).is_file()


def models_folder() -> Path:
    return cache_folder() / "models"


def registry_path() -> Path:
    return Path(os.environ.get(REGISTRY_VARIABLE) or BUNDLED_REGISTRY)


def load_registry(path: Path | None = None) -> dict[str, ModelEntry]:
    path = Path(path or registry_path())
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = {}
        for item in data["models"]:
            sources = tuple(Source(s["role"], s["repo"], s.get("revision"), tuple(s["files"]), dict(s.get("sha256", {})))
                            for s in item.get("sources", ()))
            fields = {k: v for k, v in item.items() if k not in ("sources",)}
            entries[item["name"]] = ModelEntry(**fields, sources=sources)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InvalidInputError(f"model registry {path} cannot be read ({error}); fix it or unset {REGISTRY_VARIABLE}") from error
    return entries


def entry_named(name: str) -> ModelEntry:
    entries = load_registry()
    if name not in entries:
        raise InvalidInputError(f"no model named {name!r}; `r1seg models` lists the names: {', '.join(entries)}")
    return entries[name]


def resolve_model(value: str | os.PathLike | None) -> Path | None:
    """What `--model` means, for every command: an existing folder is used as it is; otherwise a name from the
    registry, which must be installed (`r1seg models get NAME`) and must answer questions. None stays None (the
    command's default model)."""
    if value is None:
        return None
    path = Path(value)
    if path.exists():
        return path
    entries = load_registry()
    if str(value) not in entries and ("/" in str(value) or os.sep in str(value)):
        # A path, not a name: a missing folder is the model loader's to refuse (exit code 3), when the model loads;
        # a server loads it at its first question, and must start to say so.
        return path
    entry = entries.get(str(value))
    if entry is None:
        raise InvalidInputError(f"--model {value}: no such folder, and not a model name; `r1seg models` lists the names "
                                f"({', '.join(entries)})")
    if not entry.answers:
        raise InvalidInputError(f"--model {value}: {entry.title}; it is for training (r1seg_core/convert/README.md), "
                                "not a model that answers questions")
    if not entry.installed:
        raise InvalidInputError(f"--model {value}: the model is not installed; download it with `r1seg models get "
                                f"{value}` ({entry.download})")
    return entry.folder


def read_record(entry: ModelEntry) -> dict | None:
    try:
        return json.loads((entry.folder / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
