"""The `convert` and `compat-run` subcommands of `r1seg`; `register(subparsers)` adds them to its parser.

Each subcommand stores its handler as `handler` (`args.handler(args)` returns the exit code; errors are raised as
R1SegError for the CLI to report). The heavy modules load inside the handlers, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .keymaps import SOURCE_KINDS


def register(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert", help="convert a released R1Seg-3D (or SegVol) checkpoint into a model folder",
        description="Convert an original checkpoint into a model folder of this project. Every original tensor is "
                    "renamed and checked; missing, unexpected or mis-sized tensors stop the conversion.")
    convert.add_argument("--from", dest="source_kind", required=True, choices=SOURCE_KINDS,
                         help="r1seg3d-sam: stage-1 state dict; r1seg3d: original Hugging Face folder (merged); "
                              "r1seg3d-lora: stage-3/4 model_with_lora.bin; segvol-vit: SegVol ViT_pretrain.ckpt")
    convert.add_argument("source", type=Path, metavar="SRC", help="the original file (the folder for r1seg3d)")
    convert.add_argument("destination", type=Path, metavar="DST", help="new, empty output folder")
    convert.add_argument("--config", type=Path, metavar="JSON",
                         help="sizes when they differ from the published ones: an original config.json or a compat "
                              "*.config.json")
    convert.add_argument("--tokenizer", type=Path, metavar="DIR",
                         help="tokenizer folder: the CLIP tokenizer for r1seg3d-sam, the release folder for "
                              "r1seg3d-lora (default for r1seg3d: SRC itself)")
    convert.add_argument("--skip-keys", nargs="+", default=[], metavar="KEY",
                         help="original tensor names or shell-style patterns to leave out on purpose")
    convert.add_argument("--merge-lora", action="store_true",
                         help="r1seg3d-lora only: fold the adapter into the LLM weights instead of keeping it")
    convert.set_defaults(handler=run_convert)

    compat = subparsers.add_parser(
        "compat-run", help="run a converted model on a compatibility-vector input file",
        description="Load a converted model folder, run the forwards of the compat README on the inputs stored in "
                    "IO and write every intermediate and output under the README's tensor names.")
    compat.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    compat.add_argument("io_file", type=Path, metavar="IO.safetensors")
    compat.add_argument("out_file", type=Path, metavar="OUT.safetensors")
    compat.set_defaults(handler=run_compat_command)


def _quiet_progress_bars() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()


def run_convert(args: argparse.Namespace) -> int:
    from .converters import convert

    _quiet_progress_bars()
    report = convert(args.source_kind, args.source, args.destination, config_path=args.config,
                     tokenizer_path=args.tokenizer, skip_keys=tuple(args.skip_keys), merge_lora=args.merge_lora)
    print(report.summary())
    return 0


def run_compat_command(args: argparse.Namespace) -> int:
    from .compat_run import run_compat

    _quiet_progress_bars()
    names = run_compat(args.model_dir, args.io_file, args.out_file)
    print(f"wrote {len(names)} tensors to {args.out_file}")
    return 0
