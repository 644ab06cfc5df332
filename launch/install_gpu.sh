#!/usr/bin/env bash
# Installs pudnet_jax's requirements with JAX for NVIDIA GPUs (CUDA 12 wheels from PyPI: no local
# CUDA toolkit needed, only an NVIDIA driver >= 525). From anywhere:
#
#   bash launch/install_gpu.sh            # JAX at the version pinned in requirements.txt
#   JAX_VERSION= bash launch/install_gpu.sh   # newest JAX instead (then check the other pins)
#
# On a cluster, run it once in the Python environment every node uses (shared home or image).
set -euo pipefail
cd "$(dirname "$0")/.."

JAX_VERSION=${JAX_VERSION-$(sed -n 's/^jax==//p' requirements.txt)}
pip install -U "jax[cuda12]${JAX_VERSION:+==$JAX_VERSION}"
# Everything else from requirements.txt except the CPU jax/jaxlib pins.
pip install -r <(grep -v -E '^(jax|jaxlib)==' requirements.txt)

python - <<'PY'
import jax
print("JAX", jax.__version__, "devices:", jax.devices())
assert jax.default_backend() == "gpu", "JAX did not find a GPU: check the driver (nvidia-smi)."
PY
