#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see README.md here): the GPU-only tests, then the Phi-3-mini-size
# whole-CT question of issue #3.
#
# That machine has torch, transformers, peft and safetensors but not monai or SimpleITK, and reaches no package
# index: their wheels travel in .whl/ (fetched here beforehand, README.md). Output goes to $OUT when it is set.
#   PRESET, CT_SIZE, CT_SPACING, OVERLAP and DEVICE override the defaults, e.g. for a dry run on a CPU:
#   PRESET=tiny CT_SIZE=64,256,256 CT_SPACING=2,1,1 DEVICE=cpu benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/r1seg_site .whl/*.whl
    export PYTHONPATH="/tmp/r1seg_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/device_check.txt"

{
    date -u
    if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
    python3 -c "import sys, torch, transformers, peft, monai, SimpleITK; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| transformers', transformers.__version__, '| peft', peft.__version__, '| monai', monai.__version__, '| SimpleITK', SimpleITK.Version_VersionString())"
    # What only a GPU can check: the CUDA answer equals the CPU's, resampling on the GPU equals SimpleITK.
    python3 -m pytest Testing/test_gpu.py -q -p no:cacheprovider || echo "GPU TESTS FAILED"
    # An abdominal CT as acquired (0.8 x 0.8 x 1.5 mm): 226 x 410 x 410 on the model grid, 126 windows at overlap 0.5.
    python3 benchmarks/inference.py --preset "${PRESET:-phi3-mini}" --synthetic "${CT_SIZE:-300,512,512}" \
        --spacing "${CT_SPACING:-1.5,0.8,0.8}" --overlap "${OVERLAP:-0.5}" --device "${DEVICE:-cuda}"
} 2>&1 | tee "$log"
