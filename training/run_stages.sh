#!/usr/bin/env bash
# Train R1Seg3D: prepare the recipe's data, then run stages 1 to 4 in order, each starting from the previous
# stage's exported model folder. The trained model ends up in OUTPUT/final.
#
#   training/run_stages.sh [--nproc N] [--hostfile F] [--srun] [--no-prepare] [--config DIR] [--output DIR] [--data DIR]
#
#   --nproc N      processes per node: GPUs per node, or CPU ranks on a machine without GPUs
#                  (default: every GPU of the node; 1 process on a CPU-only machine)
#   --hostfile F   DeepSpeed hostfile ("node-1 slots=8", one line per node) for multi-node training; needs
#                  passwordless ssh between the nodes, the same paths on all of them and a shared OUTPUT/data
#   --srun         inside a SLURM allocation: start one rank per SLURM task with srun instead of DeepSpeed's
#                  launcher, with the rendezvous on the allocation's first node (slurm/two_nodes.sbatch)
#   --no-prepare   do not prepare the data here: it was prepared before (slurm/prepare.sbatch)
#   --config DIR   recipe folder (default training/recipes/paper-phi3)
#   --output DIR   run folder (default runs/r1seg3d): data/, stage1..4/, final/ (see training/run_layout.py)
#   --data DIR     prepared data folder (default OUTPUT/data); prepared here first when missing
#
# A stage whose export exists is skipped, so rerunning the same command after a failure or a kill resumes:
# finished stages are kept and the interrupted stage continues from its latest checkpoint.
# MASTER_PORT picks the rendezvous port (default: a free port on this node, 29500 with a hostfile, 20000 + the job
# id modulo 20000 under srun); PYTHON the interpreter (default python3), whose DeepSpeed launcher starts the ranks.
# R1SEG_* variables reach every rank on every node (training/launch.sh; srun passes the whole environment).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

NPROC="" HOSTFILE="" SRUN="" PREPARE=1 CONFIG="training/recipes/paper-phi3" OUTPUT="runs/r1seg3d" DATA=""
export PYTHON="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
    case "$1" in
        --nproc) NPROC="$2"; shift 2 ;;
        --hostfile) HOSTFILE="$2"; shift 2 ;;
        --srun) SRUN=1; shift ;;
        --no-prepare) PREPARE=""; shift ;;
        --config) CONFIG="$2"; shift 2 ;;
        --output) OUTPUT="$2"; shift 2 ;;
        --data) DATA="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "run_stages.sh: unknown argument $1" >&2; usage 2 ;;
    esac
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
absolute() { mkdir -p "$1" && (cd "$1" && pwd); }
CONFIG="$(cd "$CONFIG" && pwd)"
OUTPUT="$(absolute "$OUTPUT")"
DATA="$(absolute "${DATA:-$OUTPUT/data}")"
cd "$REPO"
# `--module training.train` must import from this checkout on every node; the launcher forwards PYTHON* variables.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "$SRUN" ]; then
    # One rank per task of the allocation; training/distributed.py reads RANK, LOCAL_RANK and WORLD_SIZE from
    # SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS. srun no longer passes the batch job's --cpus-per-task on
    # (Slurm 22.05+), and --kill-on-bad-exit ends every rank as soon as one fails or its node dies.
    if [ -z "${SLURM_JOB_NODELIST:-}" ]; then
        echo "run_stages.sh: --srun runs inside a SLURM allocation (sbatch training/slurm/two_nodes.sbatch)" >&2
        exit 2
    fi
    # awk reads the whole list: `head -n 1` would close the pipe early, and pipefail turns scontrol's SIGPIPE into
    # a failed job.
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')"
    MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"    # two jobs on one node do not collide
    export MASTER_ADDR MASTER_PORT
    LAUNCH=(srun --kill-on-bad-exit=1 --label ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"}
            "$PYTHON" -u -m)
elif [ -n "$HOSTFILE" ]; then
    # DeepSpeed's launcher (the `deepspeed` command) run by the chosen interpreter, so the ranks use its packages;
    # launch.sh carries the R1SEG_* variables to the other nodes.
    LAUNCH=("$REPO/training/launch.sh" "$OUTPUT" --module --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
else
    LAUNCH=("$REPO/training/launch.sh" "$OUTPUT" --module
            --master_port "${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}")
fi
if [ -n "$NPROC" ]; then
    if [ -n "$SRUN" ]; then
        echo "run_stages.sh: with --srun the allocation's tasks are the ranks; drop --nproc" >&2
        exit 2
    fi
    LAUNCH+=(--num_gpus "$NPROC")
fi

echo "[run_stages] recipe $CONFIG -> $OUTPUT (data: $DATA)"
if [ -n "$PREPARE" ] && ! "$PYTHON" -m training.data.prepare --recipe "$CONFIG" --output "$DATA" --workers "${NPROC:-4}"; then
    echo "[run_stages] data preparation failed: see the messages above (each names the case and the file)" >&2
    exit 1
fi

for STAGE in 1 2 3 4; do
    if [ "$STAGE" = 4 ]; then EXPORT="$OUTPUT/final"; else EXPORT="$OUTPUT/stage$STAGE/model"; fi
    if [ -f "$EXPORT/config.json" ]; then
        echo "[run_stages] stage $STAGE already finished ($EXPORT): skipped"
        continue
    fi
    mkdir -p "$OUTPUT/stage$STAGE"
    LOG="$OUTPUT/stage$STAGE/train.log"
    STARTED=$(date +%s)
    echo "[run_stages] stage $STAGE started; log: $LOG"
    set +e
    "${LAUNCH[@]}" training.train --stage "$STAGE" --recipe "$CONFIG" --output "$OUTPUT" --data "$DATA" 2>&1 \
        | tee -a "$LOG"
    STATUS=${PIPESTATUS[0]}
    set -e
    if [ "$STATUS" != 0 ] || [ ! -f "$EXPORT/config.json" ]; then
        KEPT=""
        if [ "$STAGE" -gt 1 ]; then KEPT="stages 1-$((STAGE - 1)) are kept and "; fi
        echo "[run_stages] stage $STAGE FAILED (exit code $STATUS); see $LOG. Fix the cause and rerun the same" \
             "command: ${KEPT}stage $STAGE resumes from its latest checkpoint." >&2
        exit 1
    fi
    echo "[run_stages] stage $STAGE finished in $(( $(date +%s) - STARTED )) s: $EXPORT"
done
echo "[run_stages] done: $OUTPUT/final (try: r1seg ask --model $OUTPUT/final CT.nii.gz \"segment the liver\")"
