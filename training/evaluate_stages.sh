#!/usr/bin/env bash
# Evaluate every stage's model of a run on the recipe's held-out data, for the model card's per-stage tables.
#
#   training/evaluate_stages.sh RUN_DIR REPORT_DIR [RECIPE_DIR]
#
# RUN_DIR is the folder given to run_stages.sh; each stage's export (stage1/model ... final) is scored by
# `r1seg evaluate` into REPORT_DIR/stageN (resumed when it holds the same run). The recipe's heldout.json names the
# held-out cases; the questions ask about the recipe's trained organs, plus the evaluation's out-of-region set.
set -euo pipefail
RUN="$1" REPORTS="$2" RECIPE="${3:-training/recipes/default-smollm2}"
# The organs the recipe trains (stage 1's crops.targets), as training/calibrate.py reads them.
TARGETS=$(python3 -c 'import sys; from training.recipe import load_recipe; print(",".join(load_recipe(sys.argv[1]).stages[1].crops.targets))' "$RECIPE")
for STAGE in 1 2 3 4; do
    if [ "$STAGE" = 4 ]; then MODEL="$RUN/final"; else MODEL="$RUN/stage$STAGE/model"; fi
    [ -f "$MODEL/config.json" ] || { echo "[evaluate_stages] stage $STAGE: no model at $MODEL, skipped"; continue; }
    echo "[evaluate_stages] stage $STAGE: $MODEL"
    r1seg evaluate --model "$MODEL" --data "$RECIPE/heldout.json" --out "$REPORTS/stage$STAGE" \
        --max-questions-per-kind 10 --targets "$TARGETS"
done
