#!/usr/bin/env bash
# Ablation study on the intra Omniglot setting (RESULTS.md section 3).
#
# Meta-trains the full PudNet and three ablations with the `quick` budget (300 steps x 2 tasks,
# narrower hypernetwork) for each seed, then evaluates every run on the same 100 fixed unseen-class
# 20-way tasks. Runs two at a time, each pinned to one core (2-core CPU); on a bigger machine set
# PARALLEL. Resumable: rerunning skips finished runs and resumes interrupted ones from their
# checkpoints. Then: python launch/ablation_table.py runs/ablation > results/ablation/table.md
#
#   bash launch/ablation.sh            # seeds 0 1
#   SEEDS="0 1 2" bash launch/ablation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-runs/ablation}
SEEDS=${SEEDS:-"0 1"}
PARALLEL=${PARALLEL:-2}
mkdir -p "$ROOT"

declare -A VARIANT=(
  [full]=""
  [no_recurrent]="--config.hyper.recurrent=False"
  [no_sketch]="--config.hyper.sketch_conditioning=False"
  [no_prototype]="--config.hyper.classifier=generated"
)

jobs_list=()
for seed in $SEEDS; do
  for name in full no_recurrent no_sketch no_prototype; do
    jobs_list+=("$name $seed")
  done
done

run_one() {
  local name=$1 seed=$2 slot=$3
  local dir="$ROOT/${name}_s${seed}"
  if [[ -f "$dir/results.json" ]]; then echo "skip $dir (done)"; return; fi
  local pin=()
  if command -v taskset >/dev/null && [[ "$(nproc)" -ge "$PARALLEL" ]]; then pin=(taskset -c "$slot"); fi
  echo "start $dir $(date -u +%FT%TZ)"
  # shellcheck disable=SC2086
  "${pin[@]}" python -m pudnet_jax.main --config=configs/intra.py:quick --workdir="$dir" \
    --config.seed="$seed" --config.data.num_eval_tasks=100 --config.train.progress_bar=False \
    ${VARIANT[$name]} >"$dir.log" 2>&1 || { echo "FAILED $dir (see $dir.log)"; return 1; }
  echo "done  $dir $(date -u +%FT%TZ)"
}

i=0
for job in "${jobs_list[@]}"; do
  run_one $job $((i % PARALLEL)) &
  i=$((i + 1))
  if (( i % PARALLEL == 0 )); then wait; fi
done
wait
