"""Time `Predictor()` on the bundled default model: the first load (an empty cache: the base LLM's GGUF file is
dequantised and its config parsed) against warm loads (both read back from the cache, keyed by the file's SHA-256).

Each load runs in its own process, as every `r1seg ask` does, and is timed three ways:
  * `Predictor()` itself, which also pays transformers' and PEFT's first imports (about 3 s on a slow CPU);
  * the whole start, `import r1seg_core.inference` included (what a user waits before the first window);
  * a second `Predictor()` in the same process (the libraries imported: what `r1seg serve`, `r1seg chat` and the
    Slicer module pay to load a model again).

    python benchmarks/default_model_load.py [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child() -> None:
    """One process: the times of its imports, its first Predictor() and a second one."""
    import warnings

    warnings.simplefilter("ignore")
    started = time.perf_counter()
    from r1seg_core.inference import Predictor

    imported, cpu_imported = time.perf_counter(), time.process_time()
    Predictor(device="cpu")
    loaded, cpu_loaded = time.perf_counter(), time.process_time()
    Predictor(device="cpu")
    again = time.perf_counter()
    print(json.dumps({"import_s": imported - started, "load_s": loaded - imported, "start_s": loaded - started,
                      "reload_s": again - loaded, "load_cpu_s": cpu_loaded - cpu_imported}))


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}; load average {load}")


def run(cache: Path, threads: int) -> dict:
    environment = {**os.environ, "R1SEG_CACHE": str(cache), "OMP_NUM_THREADS": str(threads),
                   "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    output = subprocess.run([sys.executable, __file__, "--child"], env=environment, check=True, capture_output=True,
                            text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="warm loads (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return
    print(f"machine: {machine()}")
    print(f"the bundled default model, CPU, {args.threads} thread(s); each load in its own process")
    with tempfile.TemporaryDirectory(prefix="r1seg-cache-") as cache:
        cold = run(Path(cache), args.threads)
        warm = [run(Path(cache), args.threads) for _ in range(args.repeats)]
    median = {key: statistics.median(w[key] for w in warm) for key in cold}
    print(f"{'':34}{'cold (empty cache)':>20}{f'warm (median of {args.repeats})':>22}{'cold / warm':>13}")
    for key, label in (("load_s", "Predictor()"), ("load_cpu_s", "Predictor(), CPU seconds"),
                       ("start_s", "import + Predictor()"),
                       ("reload_s", "second Predictor(), same process")):
        print(f"{label:34}{cold[key]:>19.2f}s{median[key]:>21.2f}s{cold[key] / median[key]:>12.1f}x")
    loads = ", ".join(f"{w['load_s']:.2f}" for w in warm)
    print(f"warm loads: {loads} s (Predictor())")


if __name__ == "__main__":
    main()
