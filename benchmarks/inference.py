"""Time one whole-CT question: per-step seconds, windows per second, peak memory, and the fast path's speed-up.

The baseline is the paper's way, measured in the same run on the same model and CT: one window at a time,
with the answer generated token by token. The fast path batches windows and scores the answer templates.

    python benchmarks/inference.py --preset tiny                      # bundled sample CT, CPU
    python benchmarks/inference.py --preset mid --ct CT --device cpu
    python benchmarks/inference.py --preset phi3-mini --synthetic 300,512,512 --spacing 1.5,0.8,0.8 --overlap 0.5 --device cuda
"""
from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np
import torch

from r1seg_core.inference import Predictor
from r1seg_core.inference.devices import resolve_device, resolve_dtype
from r1seg_core.model import build_model, preset_config
from r1seg_core import sample_ct_path
from r1seg_core.volume import Volume, read_volume, write_labelmap


def synthetic_ct(shape_zyx: tuple[int, int, int], spacing_zyx=(2.0, 1.0, 1.0)) -> Volume:
    """A body-like HU volume (soft tissue ellipse in air) of the given size; only its size matters for timing."""
    z, y, x = np.ogrid[:shape_zyx[0], :shape_zyx[1], :shape_zyx[2]]
    body = ((y - shape_zyx[1] / 2) / (shape_zyx[1] * 0.45)) ** 2 + ((x - shape_zyx[2] / 2) / (shape_zyx[2] * 0.45)) ** 2 < 1
    array = np.where(np.broadcast_to(body, shape_zyx), 40, -1000).astype(np.int16)
    array += np.random.default_rng(0).integers(-20, 20, size=shape_zyx, dtype=np.int16)
    return Volume(array, tuple(reversed(spacing_zyx)), (0.0, 0.0, 0.0), np.eye(3))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decoded_windows(result) -> int:
    return sum(t.windows_positive for t in result.targets)


def run(predictor: Predictor, volume: Volume, question: str, cached: bool = False, **options) -> tuple[float, object]:
    """One question; by default as if the CT were new (the predictor caches a CT's encoder outputs)."""
    if not cached:
        predictor.clear_cache()
    start = time.perf_counter()
    result = predictor.ask(volume, question, **options)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", help="a model folder instead of a preset with random weights")
    parser.add_argument("--ct", help="CT file or DICOM folder (default: the bundled sample CT)")
    parser.add_argument("--synthetic", help="time a synthetic CT of this z,y,x size instead")
    parser.add_argument("--spacing", default="2,1,1", help="the synthetic CT's z,y,x spacing in mm (default: the model's)")
    parser.add_argument("--question", default="segment the liver")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on a CPU), float32 or bfloat16")
    parser.add_argument("--window-batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="fast-path runs; the best is reported")
    parser.add_argument("--skip-baseline", action="store_true", help="do not time the one-window-at-a-time path")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model:
        predictor = Predictor(args.model, device=device, dtype=dtype)
    else:
        # Random weights built in place, in the run's dtype: a Phi-3-size model initialised on 2 CPU cores in fp32
        # takes minutes and twice the memory.
        with torch.device(device):
            model = build_model(preset_config(args.preset), dtype=dtype)
        predictor = Predictor(model=model, device=device, dtype=dtype)
    start = time.perf_counter()
    volume = (synthetic_ct(tuple(int(v) for v in args.synthetic.split(",")), tuple(float(v) for v in args.spacing.split(",")))
              if args.synthetic else read_volume(args.ct or sample_ct_path()))
    read_s = time.perf_counter() - start
    cpu = platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu}, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {str(dtype).removeprefix('torch.')}; model: {args.model or args.preset}; CT {volume.shape} (z,y,x) "
          f"spacing {tuple(round(s, 3) for s in volume.spacing)} mm; overlap {args.overlap}")

    run(predictor, volume, args.question, overlap=args.overlap, window_batch=args.window_batch)   # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fast_s, fast = min((run(predictor, volume, args.question, overlap=args.overlap, window_batch=args.window_batch,
                            global_step="off") for _ in range(args.repeats)), key=lambda pair: pair[0])
    peak = peak_memory_mb(device)
    start = time.perf_counter()
    if fast.present:
        write_labelmap("/tmp/r1seg_benchmark.seg.nrrd", fast.labelmap()[0], volume, fast.labelmap()[1])
    write_s = time.perf_counter() - start
    print(f"windows: {fast.windows}; masks decoded in {decoded_windows(fast)} of them")
    print("fast path (batched windows, teacher-forced answer), seconds per step:")
    for step, seconds in {"read": read_s, **fast.timings, "write": write_s}.items():
        print(f"  {step:14s} {seconds:8.3f}")
    print(f"  {'total':14s} {fast_s:8.3f}  ({fast.windows / fast_s:.2f} windows/s), peak memory {peak:.0f} MB")
    with_global_s, with_global = run(predictor, volume, args.question, overlap=args.overlap, window_batch=args.window_batch,
                                     global_step="answer")
    print(f"global text-answer step: {with_global.timings['global_step']:.3f} s of a {with_global_s:.3f} s run")
    skip_s, skipping = run(predictor, volume, args.question, overlap=args.overlap, window_batch=args.window_batch,
                           global_step="skip")
    print(f"global step skipping far windows: {skip_s:.3f} s, {decoded_windows(skipping)} of {skipping.windows} windows decoded "
          f"(an untrained model's coarse mask decides nothing useful)")
    follow_s, _ = run(predictor, volume, "and the spleen?", cached=True, overlap=args.overlap,
                      window_batch=args.window_batch, global_step="off")
    print(f"follow-up question on the same CT (resampled CT and encoder outputs reused): {follow_s:.3f} s")
    if not args.skip_baseline:
        # A trained model stops after its answer ("The liver is [SEG]."); an untrained one never emits EOS, so the
        # baseline generates as many tokens as the longest answer template instead of the model's 48-token limit.
        config = predictor.model.config
        templates = predictor.answer_templates([t.name for t in fast.targets])
        config.max_answer_tokens = max(len(answer) for pair in templates for answer in pair)
        base_s, base = run(predictor, volume, args.question, overlap=args.overlap, window_batch=1,
                           answer_mode="generate", global_step="off")
        print(f"baseline (one window at a time, {config.max_answer_tokens} generated tokens per window, masks decoded in "
              f"{decoded_windows(base)} of {base.windows} windows): {base_s:.3f} s ({base.windows / base_s:.2f} windows/s)")
        # Same windows answered on both sides, so the LLM step compares like with like; the whole question does not
        # when the untrained model's generated answers hold no [SEG] (then the baseline decodes no masks at all).
        print(f"fast path speed-up: LLM step x{base.timings['llm'] / fast.timings['llm']:.2f} "
              f"({fast.timings['llm']:.3f} s vs {base.timings['llm']:.3f} s); whole question x{base_s / fast_s:.2f}")


if __name__ == "__main__":
    main()
