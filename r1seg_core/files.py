"""Writing a file so that a crash, or a reader at the same moment, never sees half of it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: str | os.PathLike, write) -> Path:
    """`write(stream)` fills a temporary binary file beside `path`, which then replaces `path` in one step. On any
    failure the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """`text` as UTF-8 at `path`, written as write_atomically writes."""
    return write_atomically(path, lambda stream: stream.write(text.encode("utf-8")))
