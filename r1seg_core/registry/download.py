"""`r1seg models get NAME`: download a registry model with huggingface_hub, check every file, convert it.

Steps: ask the hub (HF_ENDPOINT, or huggingface.co) which files each source repository has at its pinned commit (or
at the current commit of main, which is then recorded and kept for a resume), check the disk space for the download
and the conversion, download each file at that commit into `<cache>/downloads/<name>/<role>` (a partial file is kept
as `NAME.part` and resumed by the next run), check each file's SHA-256 (pinned in the registry, else the
hub's LFS SHA-256; small non-LFS files by their git blob id), convert with `r1seg convert`'s code into a new
folder, record what was downloaded in `download.json`, and only then move the folder to `<cache>/models/<name>`.
huggingface_hub honours HF_HUB_OFFLINE, HF_TOKEN and the proxy variables (HTTPS_PROXY, NO_PROXY) itself.
"""
from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import CancelledError, R1SegError
from .. import cache_folder
from ..model.packaged import file_sha256
from .catalogue import RECORD_NAME, ModelEntry, Source

# A repository that has its weights as safetensors also keeps pickled copies in some releases: never download both.
PICKLED_WEIGHTS = (".bin", ".pth", ".pt", ".ckpt")
PART_SUFFIX = ".part"
GB = 1e9


class DownloadError(R1SegError):
    """A download that cannot go on; the message says what happened and what to do."""


@dataclass(frozen=True)
class RemoteFile:
    source: Source
    commit: str
    name: str
    size: int
    sha256: str | None      # expected: pinned in the registry, else the hub's LFS SHA-256
    blob_id: str | None     # git blob id of a non-LFS file


def hub_endpoint() -> str:
    """HF_ENDPOINT read now, not at import (huggingface_hub reads it once, when first imported)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def downloads_folder(entry: ModelEntry) -> Path:
    return cache_folder() / "downloads" / entry.name


def install(entry: ModelEntry, keep_download: bool = False, log=print, progress=None) -> Path:
    """Download, check and convert `entry`; returns its model folder. An installed model is left as it is.
    `progress(done_bytes, total_bytes, file_name)`, when given, follows the download (bytes already on disk from an
    interrupted run count as done) and replaces huggingface_hub's progress bar."""
    if entry.bundled or entry.installed:
        log(f"{entry.name} is installed: {entry.folder}")
        return entry.folder
    if offline():
        raise DownloadError(f"cannot download {entry.name}: HF_HUB_OFFLINE is set, so no network is used. Unset it "
                            "(or download on a connected machine and copy the model folder, r1seg_core/convert/README.md)")
    root = downloads_folder(entry)
    log(f"{entry.title}\n  licence: {entry.licence}\n  from {hub_endpoint()} into {root}")
    files = remote_files(entry, root)
    check_disk_space(files, root)
    total = sum(file.size for file in files)
    log(f"  {len(files)} files, {total / GB:.3f} GB")
    checked, done = {}, 0
    for file in files:
        received = (lambda count, before=done, name=file.name: progress(before + count, total, name)) if progress else None
        checked[file.source.role, file.name] = _fetch(file, root / file.source.role, received)
        done += file.size
        if progress:
            progress(done, total, file.name)
    folder = _convert(entry, root, files, checked)
    if not keep_download:
        shutil.rmtree(root, ignore_errors=True)
    log(f"installed {entry.name} in {folder}")
    return folder


def remote_files(entry: ModelEntry, root: Path) -> list[RemoteFile]:
    """The files to download, each at one commit per repository: the pinned one, the one recorded by an earlier
    (interrupted) run, or the current commit of main (recorded now, so a resume cannot mix two versions)."""
    from huggingface_hub import HfApi

    commits_path = root / "commits.json"
    recorded = json.loads(commits_path.read_text()) if commits_path.is_file() else {}
    api = HfApi(endpoint=hub_endpoint())
    files = []
    for source in entry.sources:
        revision = source.revision or recorded.get(source.role) or "main"
        with hub_errors(f"{source.repo} at revision {revision}"):
            info = api.model_info(source.repo, revision=revision, files_metadata=True)
        names = {sibling.rfilename: sibling for sibling in info.siblings or ()}
        chosen = _select(names, source.files)
        if not chosen:
            raise DownloadError(f"{source.repo} at {info.sha} has none of the files {', '.join(source.files)}: the "
                                "repository is empty or laid out differently; download it by hand and use `r1seg convert` "
                                "(r1seg_core/convert/README.md)")
        recorded[source.role] = info.sha
        for name in chosen:
            sibling = names[name]
            lfs_sha = sibling.lfs.sha256 if sibling.lfs else None
            files.append(RemoteFile(source, info.sha, name, int(sibling.size or 0), source.sha256.get(name) or lfs_sha,
                                    None if sibling.lfs else sibling.blob_id))
    root.mkdir(parents=True, exist_ok=True)
    commits_path.write_text(json.dumps(recorded, indent=1))
    return files


def _select(names, patterns: tuple[str, ...]) -> list[str]:
    chosen = sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns))
    if any(n.endswith(".safetensors") for n in chosen):
        chosen = [n for n in chosen if not n.endswith(PICKLED_WEIGHTS) and not n.endswith("pytorch_model.bin.index.json")]
    return chosen


def check_disk_space(files: list[RemoteFile], root: Path) -> None:
    """Room for what is still to download plus the converted copy (about as large as the weights)."""
    remaining = sum(max(file.size - _present_bytes(file, root), 0) for file in files)
    converted = sum(file.size for file in files)
    needed = remaining + converted
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DownloadError(f"not enough disk space in {cache_folder()}: the download needs {remaining / GB:.2f} GB more "
                            f"and the conversion about {converted / GB:.2f} GB, but {free / GB:.2f} GB are free. Free some "
                            "space, or set R1SEG_CACHE to a folder on a larger disk")


def _present_bytes(file: RemoteFile, root: Path) -> int:
    target = root / file.source.role / file.name
    for path in (target, _part(target)):
        if path.is_file():
            return path.stat().st_size
    return 0


def _part(target: Path) -> Path:
    return target.with_name(target.name + PART_SUFFIX)


def _fetch(file: RemoteFile, folder: Path, received=None) -> str:
    """Download one file and return its SHA-256 once it matches what is expected. The bytes go to `NAME.part`,
    which survives an interrupted run: the next run asks only for the rest (an HTTP range). huggingface_hub's own
    download deletes a partial file when it fails, so it resumes only within one run; its `http_get` does the
    transfer here (same session: token, proxies, retries, progress bar). `received(bytes of this file on disk)`, when
    given, is called as the bytes arrive, instead of the progress bar."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    target = folder / file.name
    if not target.is_file():
        part = _part(target)
        part.parent.mkdir(parents=True, exist_ok=True)
        if part.is_file() and part.stat().st_size > file.size:
            part.unlink()          # longer than the file: not a prefix of it
        url = hf_hub_url(file.source.repo, file.name, revision=file.commit, endpoint=hub_endpoint())
        with hub_errors(f"{file.source.repo}/{file.name}", folder), open(part, "ab") as stream:
            http_get(url, stream, resume_size=stream.tell(), headers=build_hf_headers(), expected_size=file.size,
                     displayed_filename=file.name, tqdm_class=_reporting_bar(received) if received else None)
        os.replace(part, target)
    digest = file_sha256(target)
    wrong = (file.sha256 and digest != file.sha256) or (file.blob_id and _git_blob_id(target) != file.blob_id)
    if wrong:
        target.unlink()
        expected = f"SHA-256 {file.sha256}" if file.sha256 else f"git blob id {file.blob_id}"
        raise DownloadError(f"checksum mismatch: {file.source.repo}/{file.name} at {file.commit} has SHA-256 {digest}, but "
                            f"{expected} was expected. The file was deleted and nothing was installed. Run the command "
                            f"again; if it happens again, the server ({hub_endpoint()}) serves a damaged or different file")
    return digest


def _reporting_bar(received):
    """A silent tqdm class for http_get that tells `received` how many bytes of the file are on disk: http_get starts
    it at the resumed size and advances it by each chunk written (backwards when a retry starts over)."""
    from tqdm import tqdm

    class ReportingBar(tqdm):
        def __init__(self, *args, **kwargs):
            self.bytes_on_disk = kwargs.get("initial", 0)
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n=1):
            self.bytes_on_disk += n
            received(self.bytes_on_disk)
            return super().update(n)

    return ReportingBar


def _git_blob_id(path: Path) -> str:
    """The git object id the hub reports for a file not stored in LFS: sha1 of "blob <size>\\0" and the bytes."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    digest.update(path.read_bytes())
    return digest.hexdigest()


def _partial_note(folder: Path | None) -> str:
    partial = sum(p.stat().st_size for p in folder.rglob("*" + PART_SUFFIX)) if folder and folder.is_dir() else 0
    return (f" {partial / 1e6:.1f} MB already downloaded are kept: run the same command to resume." if partial
            else " Run the same command again to retry.")


@contextmanager
def hub_errors(what: str, folder: Path | None = None):
    """huggingface_hub's exceptions as one message each, naming the cause and what to do."""
    import httpx2
    from huggingface_hub import errors

    endpoint = hub_endpoint()
    try:
        yield
    except errors.OfflineModeIsEnabled as error:
        raise DownloadError(f"cannot download {what}: HF_HUB_OFFLINE is set, so no network is used; unset it") from error
    except errors.RevisionNotFoundError as error:
        raise DownloadError(f"{what}: {endpoint} has no such revision. The registry pins a commit the repository does "
                            "not have (rewritten or deleted history, or a mirror that is behind); check the repository, "
                            "or pin another commit in the registry") from error
    except errors.RepositoryNotFoundError as error:
        raise DownloadError(f"{what}: {endpoint} has no such repository, or it is private or gated (log in with "
                            "`hf auth login`, or check HF_ENDPOINT)") from error
    except errors.EntryNotFoundError as error:
        raise DownloadError(f"{what}: the file is not in the repository at that revision") from error
    except (errors.LocalEntryNotFoundError, httpx2.TransportError) as error:
        cause = error.__cause__ or error
        raise DownloadError(f"cannot reach {endpoint} while downloading {what} ({type(cause).__name__}: {cause}). Check "
                            "the network, the proxy variables (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), or set HF_ENDPOINT "
                            "to a mirror." + _partial_note(folder)) from error
    except errors.HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        raise DownloadError(f"the download of {what} was interrupted: {endpoint} answered HTTP {status}."
                            + _partial_note(folder)) from error
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise DownloadError(f"the disk filled up while downloading {what}. Free some space, or set R1SEG_CACHE to a "
                                "folder on a larger disk." + _partial_note(folder)) from error
        raise DownloadError(f"the download of {what} was interrupted ({error})." + _partial_note(folder)) from error
    except KeyboardInterrupt as error:
        raise CancelledError(f"download of {what} interrupted." + _partial_note(folder)) from error


def _convert(entry: ModelEntry, root: Path, files: list[RemoteFile], checked: dict[tuple[str, str], str]) -> Path:
    """`r1seg convert` into a fresh folder next to the destination, then the record, then one rename."""
    from ..convert.converters import convert

    spec = entry.convert
    source_folder = root / spec["source"]
    source = source_folder
    if spec.get("file"):
        matches = sorted(p for p in source_folder.glob(spec["file"]) if p.is_file())
        if not matches:
            raise DownloadError(f"no downloaded file matches {spec['file']} in {source_folder}")
        source = next((p for p in matches if p.suffix == ".safetensors"), matches[0])
    tokenizer = root / spec["tokenizer"] if spec.get("tokenizer") else None
    config = source_folder / spec["config"] if spec.get("config") else None
    final = entry.folder
    partial = final.with_name(f".{final.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)   # not installed (no record), so a leftover of a failed run
    partial.parent.mkdir(parents=True, exist_ok=True)
    report = convert(spec["from"], source, partial, config_path=config, tokenizer_path=tokenizer)
    print(report.summary())
    record = {
        "name": entry.name, "title": entry.title, "licence": entry.licence,
        "installed_on": datetime.now(timezone.utc).isoformat(timespec="seconds"), "endpoint": hub_endpoint(),
        "converted_with": f"r1seg convert --from {spec['from']}",
        "sources": [{"role": s.role, "repo": s.repo, "revision_pinned": s.revision,
                     "commit": next(f.commit for f in files if f.source is s),
                     "files": {f.name: {"size": f.size, "sha256": checked[s.role, f.name]} for f in files if f.source is s}}
                    for s in entry.sources],
    }
    (partial / RECORD_NAME).write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(partial, final)
    return final
