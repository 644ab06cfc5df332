#!/usr/bin/env bash
# Prepared GPU check (< 10 min on one H100/H200; no internet needed). From the repo root:
#
#   bash launch/gpu_check.sh               # on the GPU machine: asserts the gpu backend
#   bash launch/gpu_check.sh --cpu_smoke   # tiny sizes on CPU, to check the script itself
#
# Prints jax.devices(), the compiled latency of predict (resnet18, 10 classes, 500 and 1000
# images), the time of one Adam epoch from scratch on resnet18 over 10k images (CIFAR-10 from
# $PUDNET_DATA_DIR if present, else synthetic: the log says which), and meta-training step times
# with task_loop='vmap' vs 'unroll'. With $OUT set, everything is also written to
# $OUT/gpu_check.log. Extra arguments go to launch/gpu_check.py (e.g. --task_loops vmap).
#
# Installs nothing from the internet. It expects jax with CUDA on the machine; if a .whl/
# directory with wheels (e.g. jax[cuda12] and its plugins, built elsewhere) sits in the repo
# root, they are installed offline first.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  pip install -q --no-index .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

LOG=/dev/null
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  LOG="$OUT/gpu_check.log"
fi
{
  echo "gpu_check: $(date -u +%FT%TZ) git $(git rev-parse --short HEAD 2>/dev/null || echo none)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
  python launch/gpu_check.py "$@"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
