"""Time loading a model folder: seconds and peak resident memory of `R1Seg3D.from_pretrained`.

The baseline, measured in the same run on the same folder, is the plain way: build the model with random
initialisation, read the weights, copy them into the parameters. Each load runs in its own process, so its
peak memory is its own.

    python benchmarks/loading.py --preset phi3-mini --dtype bfloat16      # writes a 7.7 GB folder under --workdir
"""
from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def write_folder(preset: str, dtype: torch.dtype, folder: Path) -> None:
    """A checkpoint of the preset's size; the values do not matter for timing, so they are zeros."""
    from r1seg_core.model import build_model, preset_config
    from r1seg_core.model.checkpoint import weight_init_skipped

    with weight_init_skipped():
        model = build_model(preset_config(preset), dtype=dtype)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.zero_()
    model.save_pretrained(folder)


def load(folder: Path, dtype: torch.dtype, way: str) -> dict:
    from r1seg_core.config import R1Seg3DConfig
    from r1seg_core.model import R1Seg3D, build_model
    from r1seg_core.model.checkpoint import read_weights

    config = R1Seg3DConfig.load(folder)
    model_type = config.language_model.hf_config["model_type"]
    # transformers imports a model family's code on first use: seconds that neither way should be charged.
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    start = time.perf_counter()
    if way == "loader":
        R1Seg3D.from_pretrained(folder, dtype=dtype)
    else:
        model = build_model(config, dtype=dtype)
        model.load_state_dict(read_weights(folder))
    return {"seconds": time.perf_counter() - start,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--load", nargs=2, metavar=("FOLDER", "WAY"), help=argparse.SUPPRESS)   # one child process
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    if args.load:
        print(json.dumps(load(Path(args.load[0]), dtype, args.load[1])))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        folder = Path(scratch) / args.preset
        write_folder(args.preset, dtype, folder)
        size_gb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2 ** 30
        print(f"{args.preset} in {args.dtype}: {size_gb:.2f} GB of weights; CPU, {torch.get_num_threads()} threads")
        results = {}
        for way in ("baseline", "loader"):
            child = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--load", str(folder), way],
                                   check=True, capture_output=True, text=True)
            results[way] = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{way:9s} {results[way]['seconds']:7.1f} s, peak resident memory {results[way]['peak_rss_gb']:.1f} GB")
        print(f"loader speed-up x{results['baseline']['seconds'] / results['loader']['seconds']:.1f}")


if __name__ == "__main__":
    main()
