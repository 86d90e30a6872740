"""`r1seg`: ask a question about a CT, show a model card, create or convert model folders.

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
    from . import default_model_path
    from .inference import Predictor
    from .volume import read_volume

    outputs = [Path(p) for p in (args.output, args.json) if p]
    for path in outputs:
        if not path.parent.is_dir():
            raise InvalidInputError(f"output folder {path.parent} does not exist")
    model_dir = Path(args.model) if args.model else default_model_path()
    predictor = Predictor(model_dir, device=args.device, dtype=args.dtype)
    if predictor.is_placeholder:
        print(f"note: {model_dir} is an UNTRAINED PLACEHOLDER model: the pipeline runs end to end, "
              "but answers and masks are not meaningful. Pass --model with a trained or converted model.", file=sys.stderr)
    volume = read_volume(args.ct)
    result = predictor.ask(volume, args.question, overlap=args.overlap, loops=args.loops, window_batch=args.window_batch,
                           answer_mode=args.answer_mode, global_step=args.global_step, progress=_progress_bar())
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(result.answer)
    for target in result.targets:
        print(f"  {target.name}: {'present' if target.present else 'absent'}, {target.volume_ml:.1f} mL, "
              f"{target.voxel_count} voxels")
    if args.output:
        if result.present:
            result.write(args.output, volume, _colors(result))
            print(f"wrote {args.output}")
        else:
            print(f"no target found: {args.output} not written", file=sys.stderr)
    if args.json:
        result.write_json(args.json)
        print(f"wrote {args.json}")
    if args.timings:
        print(json.dumps(result.to_dict()["timings_s"], indent=2))
    return 0


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
    ask.add_argument("--overlap", type=float, default=0.25, help="window overlap in [0, 1) (default 0.25)")
    ask.add_argument("--loops", type=int, default=None, help="refinement loops 0-3 (default: the model's)")
    ask.add_argument("--window-batch", type=int, default=None, help="windows per batch (default 16 on GPU, 4 on CPU)")
    ask.add_argument("--answer-mode", choices=("constrained", "generate"), default="constrained",
                     help="score the model's answer templates (fast, default) or generate greedily")
    ask.add_argument("--global-step", choices=("off", "answer", "skip"), default="answer",
                     help="one pass over the whole CT for the text answer (answer), also skipping far windows (skip)")
    ask.add_argument("--json", help="write the result (answer, volumes, timings) as JSON")
    ask.add_argument("--timings", action="store_true", help="print per-step timings")
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

    from .convert.commands import register
    register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except R1SegError as error:
        print(f"error: {error}", file=sys.stderr)
        return next(code for kind, code in EXIT_CODES if isinstance(error, kind))
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
