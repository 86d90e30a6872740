"""`r1seg`: ask a question about a CT, evaluate a model, show a model card, create or convert model folders.

Exit codes: 0 done, 2 bad input, 3 model folder problem, 4 out of memory, 130 cancelled, 1 anything else.
Outputs are written only when the whole answer is ready, each atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import CancelledError, CheckpointError, InvalidInputError, OutOfMemoryError, R1SegError

EXIT_CODES = ((InvalidInputError, 2), (CheckpointError, 3), (OutOfMemoryError, 4), (CancelledError, 130), (R1SegError, 1))


def _progress_bar():
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int, stage: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=stage, unit="window", file=sys.stderr, leave=False)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def command_ask(args) -> int:
    check_output_folders(args)
    from .dicom_seg import prepare_dicom_seg
    series = prepare_dicom_seg(args)   # None unless -o x.dcm; its refusals come before any work
    if args.server:
        from .server.client import ask_command

        return ask_command(args, _progress_bar())
    from . import default_model_path
    from .inference import Predictor
    from .volume import read_volume

    model_dir = Path(args.model) if args.model else default_model_path()
    predictor = Predictor(model_dir, device=args.device, dtype=args.dtype, profile=args.profile)
    if predictor.is_placeholder:
        print(f"note: {model_dir} is an UNTRAINED PLACEHOLDER model: the pipeline runs end to end, "
              "but answers and masks are not meaningful. Pass --model with a trained or converted model.", file=sys.stderr)
    elif not args.model:
        print(f"note: the bundled default model is a small demonstration model, not for clinical use; its scores are "
              f"in {default_model_path() / 'MODEL_CARD.md'}", file=sys.stderr)
    volume = read_volume(args.ct)
    result = predictor.ask(volume, args.question, overlap=args.overlap, loops=args.loops, window_batch=args.window_batch,
                           answer_mode=args.answer_mode, global_step=args.global_step,
                           sliding_window=not args.no_sliding_window, seed=args.seed, progress=_progress_bar())
    summary = result.to_dict()
    print_answer(summary)
    if series is not None:
        from .dicom_seg import report_dicom_seg
        args.output = report_dicom_seg(result, volume, series, args.output, predictor)   # None: no file written
    elif args.output:
        # Also when nothing was found: empty, named segments, so a script can tell "absent" from a lost file.
        result.write(args.output, volume, _colors(result))
    if args.json:
        result.write_json(args.json)
    print_outputs(args, summary)
    return 0


def check_output_folders(args) -> None:
    """Before any work: an output whose folder is missing would otherwise fail after the whole answer."""
    for path in (Path(p) for p in (args.output, args.json) if p):
        if not path.parent.is_dir():
            raise InvalidInputError(f"output folder {path.parent} does not exist")


def print_answer(summary: dict) -> None:
    """`r1seg ask`'s report of an answer (AnswerResult.to_dict(), here or from a server): notes, text, targets."""
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(summary["answer"])
    for target in summary["targets"]:
        print(f"  {target['name']}: {target['status']}, {target['volume_ml']:.1f} mL, {target['voxel_count']} voxels")


def print_outputs(args, summary: dict) -> None:
    """What `r1seg ask` wrote, and the timings when asked for."""
    if args.output:
        print(f"wrote {args.output}" + ("" if summary["present"] else " (no target found: its segments are empty)"))
    if args.json:
        print(f"wrote {args.json}")
    if args.timings:
        print(json.dumps(summary["timings_s"], indent=2))


def _colors(result) -> dict[int, tuple[int, int, int]]:
    from .vocabulary import load_vocabulary

    vocabulary = load_vocabulary()
    colors = {}
    for value, target in enumerate(result.targets, start=1):
        structure = vocabulary.lookup(target.name)
        if structure is not None:
            colors[value] = tuple(structure.color)
    return colors


def command_info(args) -> int:
    from .config import R1Seg3DConfig
    from .model.checkpoint import model_card

    folder = Path(args.model)
    config = R1Seg3DConfig.load(folder)
    print(f"{folder}")
    print(model_card(config), end="")
    return 0


def command_init_model(args) -> int:
    import torch

    from .model import build_model, preset_config

    torch.manual_seed(args.seed)
    config = preset_config(args.preset)
    config.card.update(name=args.name or f"R1Seg3D {args.preset} (untrained)", untrained=True,
                       description=f"random weights from preset {args.preset!r}, seed {args.seed}", licence="Apache-2.0")
    model = build_model(config)
    model.save_pretrained(args.output)
    print(f"wrote an untrained {args.preset} model to {args.output}")
    return 0


def _target_names(text: str | None) -> tuple[str, ...] | None:
    """Comma-separated names -> canonical vocabulary names; an unknown one is an error naming it."""
    if not text:
        return None
    from .vocabulary import load_vocabulary

    vocabulary, names = load_vocabulary(), []
    for word in (part.strip() for part in text.split(",") if part.strip()):
        structure = vocabulary.lookup(word)
        if structure is None:
            raise InvalidInputError(f"--targets: {word!r} is not a structure of the vocabulary")
        names.append(structure.name)
    return tuple(names)


def command_evaluate(args) -> int:
    from .evaluation import EvaluationSettings, compare, evaluate, merge, parse_shard
    from .evaluation.questions import KINDS

    if args.compare:
        if not args.out:
            raise InvalidInputError("--compare needs --out DIR for the comparison")
        print(f"wrote {compare(*args.compare, args.out) / 'compare.md'}")
        return 0
    if args.merge:
        print(f"wrote {merge(args.merge) / 'report.md'}")
        return 0
    if not (args.data and args.out):
        raise InvalidInputError("r1seg evaluate needs --data LIST.json and --out REPORT_DIR "
                                "(or --merge REPORT_DIR, or --compare A B --out DIR)")
    kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else KINDS
    settings = EvaluationSettings(
        data=Path(args.data), out=Path(args.out), model=Path(args.model) if args.model else None, split=args.split,
        loops=args.loops, overlap=args.overlap, profile=args.profile, sliding_window=not args.no_sliding_window,
        kinds=kinds,
        max_questions_per_kind=args.max_questions_per_kind, targets=_target_names(args.targets), device=args.device,
        dtype=args.dtype,
        window_batch=args.window_batch, save_masks=args.save_masks, shard=parse_shard(args.shard),
        max_cases=args.max_cases)
    report = evaluate(settings)
    if report is None:
        print(f"scored this shard's cases into {args.out}; the report is written when every case is scored "
              f"(r1seg evaluate --merge {args.out})")
    else:
        print(f"wrote {report / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .model.builder import PRESETS

    parser = argparse.ArgumentParser(prog="r1seg", description="Reasoning segmentation of CT (R1Seg-3D).")
    commands = parser.add_subparsers(dest="command", required=True)

    ask = commands.add_parser("ask", help="answer a question about a CT and write the masks")
    ask.add_argument("ct", help="CT file (.nii/.nii.gz/.nrrd/.mha) or DICOM series folder")
    ask.add_argument("question", help='e.g. "segment the liver"')
    ask.add_argument("-o", "--output", help="labelmap to write: .seg.nrrd (Slicer segmentation), .nrrd or .nii.gz")
    ask.add_argument("--model", help="model folder (default: the bundled default model)")
    ask.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    ask.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                     help="weights and activations: auto is bfloat16 on a GPU, float32 on a CPU; bfloat16 halves a CPU's memory use")
    ask.add_argument("--overlap", type=float, default=None,
                     help="window overlap in [0, 1) (default: the profile's, 0.25 project, 0.5 original)")
    ask.add_argument("--loops", type=int, default=None, help="refinement loops 0-3 (default: the model's)")
    ask.add_argument("--window-batch", type=int, default=None, help="windows per batch (default 16 on GPU, 4 on CPU)")
    ask.add_argument("--answer-mode", choices=("constrained", "generate", "sample"), default=None,
                     help="per-window answers: score the answer templates (fast; the project profile's default), "
                          "generate greedily (the original profile's default) or sample top-p 0.9 from --seed")
    ask.add_argument("--seed", type=int, default=0, help="seed of --answer-mode sample (default 0)")
    ask.add_argument("--profile", choices=("auto", "project", "original"), default="auto",
                     help="inference profile: original = the published code's preprocessing, fusion and answers; "
                          "auto (default) picks it for models converted from the published weights")
    ask.add_argument("--no-sliding-window", action="store_true",
                     help="the whole CT resized to one window instead of sliding windows (the paper's Fig. 4 ablation)")
    ask.add_argument("--global-step", choices=("off", "answer", "skip"), default="answer",
                     help="one pass over the whole CT for the text answer (answer), also skipping far windows (skip)")
    ask.add_argument("--json", help="write the result (answer, volumes, timings) as JSON")
    ask.add_argument("--timings", action="store_true", help="print per-step timings")
    ask.add_argument("--server", metavar="URL", help="ask a running `r1seg serve` (e.g. http://127.0.0.1:8740) "
                     "instead of loading the model here; --model, --device, --dtype and --profile are then the server's")
    ask.add_argument("--token-file", help="with --server: file holding the server's token")
    ask.set_defaults(handler=command_ask)

    info = commands.add_parser("info", help="print a model folder's card")
    info.add_argument("model")
    info.set_defaults(handler=command_info)

    init = commands.add_parser("init-model", help="write a fresh, untrained model folder from a preset")
    init.add_argument("output")
    init.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--name")
    init.set_defaults(handler=command_init_model)

    evaluate = commands.add_parser("evaluate", help="score a model on a data list: cases.csv, report.md, plots")
    evaluate.add_argument("--data", help="data list JSON (cases, or an M3D-Seg style train/test split)")
    evaluate.add_argument("--out", help="report folder (resumed when it holds the same run)")
    evaluate.add_argument("--model", help="model folder (default: the bundled default model)")
    evaluate.add_argument("--split", default="test", help="the part of a split file to score (default test)")
    evaluate.add_argument("--loops", type=int, default=None, help="refinement loops 0-3 (default: the model's)")
    evaluate.add_argument("--overlap", type=float, default=None,
                          help="window overlap in [0, 1) (default: the profile's, 0.25 project, 0.5 original)")
    evaluate.add_argument("--profile", choices=("auto", "project", "original"), default="auto",
                          help="inference profile (see r1seg ask --profile); auto picks original for converted weights")
    evaluate.add_argument("--no-sliding-window", action="store_true",
                          help="resize the whole CT to one window (the paper's Fig. 4 ablation)")
    evaluate.add_argument("--kinds", help="comma-separated question kinds (default: all of "
                          "explicit,implicit,multi,absent_in_region,absent_out_of_region,custom)")
    evaluate.add_argument("--max-questions-per-kind", type=int, default=None,
                          help="at most this many questions of each kind per case (default: all)")
    evaluate.add_argument("--targets", help="comma-separated structures to ask about, e.g. those the model was trained "
                          "on (default: every labelled one); out-of-region absent questions may name any structure")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    evaluate.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    evaluate.add_argument("--window-batch", type=int, default=None, help="windows per batch")
    evaluate.add_argument("--save-masks", action="store_true",
                          help="write each prediction as REPORT_DIR/masks/<id>__<target>__<kind>.nii.gz")
    evaluate.add_argument("--shard", default="0/1", help="I/N: score cases I, I+N, ... (0 <= I < N; default 0/1)")
    evaluate.add_argument("--max-cases", type=int, default=None,
                          help="stop after scoring this many cases (the next run continues)")
    evaluate.add_argument("--merge", metavar="REPORT_DIR", help="write the report from every shard's rows")
    evaluate.add_argument("--compare", nargs=2, metavar=("REPORT_A", "REPORT_B"),
                          help="two finished reports side by side (with --out DIR)")
    evaluate.set_defaults(handler=command_evaluate)

    from .convert.commands import register
    register(commands)
    from .server.command import add_parser as add_serve_parser
    add_serve_parser(commands)
    from .registry.command import register as register_models
    register_models(commands)
    from .batch import register as register_batch
    register_batch(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "model", None) and not getattr(args, "server", None):   # a folder or a registry name
            from .registry import resolve_model
            args.model = str(resolve_model(args.model))
        return args.handler(args)
    except R1SegError as error:
        print(f"error: {error}", file=sys.stderr)
        return next(code for kind, code in EXIT_CODES if isinstance(error, kind))
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
