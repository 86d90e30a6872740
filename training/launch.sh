#!/usr/bin/env bash
# Run DeepSpeed's launcher from RUN_DIR so that every rank, on every node, gets this shell's R1SEG_* variables.
#
#   training/launch.sh RUN_DIR [DeepSpeed launcher arguments...]      (PYTHON: the interpreter, default python3)
#
# On one node the launcher starts the ranks with its own environment. Across nodes (hostfile) it starts them over
# pdsh/ssh in a fresh environment that receives only PYTHON*, NCCL*, UCX*, MV2* and MLFLOW* variables plus the
# lines of ~/.deepspeed_env and ./.deepspeed_env (deepspeed/launcher/runner.py). So the R1SEG_* variables
# (R1SEG_MODELS, R1SEG_DATA, R1SEG_COLLECTIVE_TIMEOUT_S, ...) are written to RUN_DIR/.deepspeed_env and the
# launcher runs from RUN_DIR; every node then starts in RUN_DIR, which must be on a shared filesystem.
set -euo pipefail
RUN_DIR="$1"; shift
mkdir -p "$RUN_DIR"
ENV_FILE="$RUN_DIR/.deepspeed_env"
: > "$ENV_FILE.partial"
for NAME in $(compgen -e R1SEG_ || true); do
    VALUE="${!NAME}"
    # The runner writes `export NAME="VALUE";` into the remote command line: these characters would be
    # interpreted by the remote shell, and a newline cannot be written as one line of the file.
    if [[ "$VALUE" == *[$'\n'\"\$\`\\]* ]]; then
        echo "launch.sh: $NAME=$VALUE holds a newline, quote, \$, backquote or backslash, which DeepSpeed's" \
             "multi-node runner cannot pass to the other nodes; use a plain path" >&2
        exit 2
    fi
    printf '%s=%s\n' "$NAME" "$VALUE" >> "$ENV_FILE.partial"
done
mv "$ENV_FILE.partial" "$ENV_FILE"
cd "$RUN_DIR"
exec "${PYTHON:-python3}" -m deepspeed.launcher.runner "$@"
