"""`r1seg models` (list the known models) and `r1seg models get NAME` (download, check and convert one)."""
from __future__ import annotations

from .catalogue import entry_named, load_registry, read_record, registry_path


def register(subparsers) -> None:
    models = subparsers.add_parser(
        "models", help="list the known models, or download one (`r1seg models get NAME`)",
        description="Without arguments: every model this project knows, with its source, revision, download size, "
                    "memory, licence and whether it is installed. `get NAME` downloads it from Hugging Face "
                    "(HF_ENDPOINT, HF_HUB_OFFLINE and proxy variables honoured), checks every file's SHA-256 and "
                    "converts it into a model folder under $R1SEG_CACHE (default ~/.cache/r1seg3d)/models; then "
                    "`--model NAME` uses it, offline.")
    actions = models.add_subparsers(dest="models_action")
    get = actions.add_parser("get", help="download, check and convert a model (resumes an interrupted download)")
    get.add_argument("name")
    get.add_argument("--keep-download", action="store_true",
                     help="keep the downloaded original files (in $R1SEG_CACHE/downloads/NAME) after converting")
    models.set_defaults(handler=run_models)


def run_models(args) -> int:
    if args.models_action == "get":
        from .download import install

        install(entry_named(args.name), keep_download=args.keep_download)
        return 0
    print(models_table())
    return 0


def models_table() -> str:
    lines = [f"models known to r1seg ({registry_path()}):"]
    for entry in load_registry().values():
        record = read_record(entry) if not entry.bundled else None
        state = ("installed (bundled)" if entry.bundled else f"installed: {entry.folder}" if entry.installed
                 else f"not installed: r1seg models get {entry.name}")
        lines += ["", f"{entry.name}  [{state}]", f"  {entry.title}"]
        for source in entry.sources:
            commit = next((s["commit"] for s in (record or {}).get("sources", ()) if s["role"] == source.role), None)
            pin = (f"revision {source.revision} (pinned)" if source.revision else
                   f"revision {commit} (recorded at download)" if commit else
                   "revision not pinned: the current commit of main, recorded at download")
            lines.append(f"  source ({source.role}): huggingface.co/{source.repo}, {pin}")
        lines += [f"  download: {entry.download}", f"  memory: {entry.memory}", f"  licence: {entry.licence}"]
        if entry.note:
            lines.append(f"  note: {entry.note}")
    return "\n".join(lines)
