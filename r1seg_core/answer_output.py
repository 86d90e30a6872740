"""How an answer reaches a person at a terminal, for `r1seg ask` (local or `--server`) and `r1seg chat`: the printed
report, the one progress bar, paths as the user typed them, and each segment's colour in the written file.

It belongs to neither the command line nor the server: both import it, and it imports neither.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def print_answer(summary: dict, stream=None) -> None:
    """The report of one answer (`AnswerResult.to_dict()`, here or from a server): notes on stderr, then the text
    and one line per target."""
    stream = stream or sys.stdout
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(summary["answer"], file=stream)
    for target in summary["targets"]:
        print(f"  {target['name']}: {target['status']}, {target['volume_ml']:.1f} mL, {target['voxel_count']} voxels",
              file=stream)


def print_outputs(args, summary: dict) -> None:
    """What `r1seg ask` wrote, and the timings when asked for."""
    if args.output:
        empty = "" if summary["present"] else " (no target found: its segments are empty)"
        print(f"wrote {shown_path(args.output)}{empty}")
    if args.json:
        print(f"wrote {shown_path(args.json)}")
    if args.timings:
        import json

        print(json.dumps(summary["timings_s"], indent=2))


def shown_path(path) -> str:
    """A path as a user in this folder would type it: relative to the working folder when it lies inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def progress_bar(stream=None):
    """A `progress(done, total, stage)` callback drawing one bar per stage on stderr. The bar starts at the
    first report and is advanced by increments, so its rate is windows per second as measured, never a rate
    over the zero seconds between its creation and the first batch."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int, stage: str) -> None:
        nonlocal bar
        if bar is not None and (bar.desc != stage or bar.total != total):
            bar.close()
            bar = None
        if bar is None:
            bar = tqdm(total=total, desc=stage, unit="window", file=stream or sys.stderr, leave=False,
                       dynamic_ncols=True, mininterval=0.5, disable=False)   # not hidden by quiet_libraries
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bar = None

    return update


def quiet_libraries() -> None:
    """Hide what a user cannot act on: the libraries' deprecation notices (addressed to this project's code, not
    to its users) and Hugging Face's own progress bars, so the windows' bar is the only one."""
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # tqdm's default for every bar that does not say otherwise (transformers' GGUF dequantisation draws its own).
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        from transformers.utils import logging
    except ImportError:               # a `--server` client needs no transformers
        return
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def segment_colors(result) -> dict[int, tuple[int, int, int]]:
    """Label value -> the vocabulary's colour of that target, as `AnswerResult.labelmap()` numbers them."""
    from .vocabulary import load_vocabulary

    vocabulary = load_vocabulary()
    colors = {}
    for value, target in enumerate(result.targets, start=1):
        structure = vocabulary.lookup(target.name)
        if structure is not None:
            colors[value] = tuple(structure.color)
    return colors
