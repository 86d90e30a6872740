#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see README.md here): the Phi-3-mini-size whole-CT question of issue #3.
#
# That machine has torch, transformers, peft and safetensors but not monai or SimpleITK, and reaches no package
# index: their wheels travel in .whl/ (fetched here beforehand, README.md). Output goes to $OUT when it is set.
#   PRESET, CT_SIZE, OVERLAP and DEVICE override the defaults, e.g. for a dry run on a CPU:
#   PRESET=tiny CT_SIZE=64,256,256 DEVICE=cpu benchmarks/device_check.sh
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
    python3 benchmarks/inference.py --preset "${PRESET:-phi3-mini}" --synthetic "${CT_SIZE:-225,410,410}" \
        --overlap "${OVERLAP:-0.5}" --device "${DEVICE:-cuda}"
} 2>&1 | tee "$log"
