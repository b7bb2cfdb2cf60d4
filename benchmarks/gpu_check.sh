#!/usr/bin/env bash
# One prepared check for a single lent GPU (H100/H200), in well under 5 minutes: ViT-B/16 train-step throughput in
# bf16, MFU against a bf16 matmul measured in the same process, and the PSD(ema)/CLIP step ratio, side by side.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   BATCH=512 bash benchmarks/gpu_check.sh       # another global batch
#
# The GPU image has jax, flax, optax and orbax but not grain, ml_collections, clu or tensorboardX. Download
# their wheels beforehand into .whl/ (python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# -d .whl grain ml_collections clu tensorboardX array-record); this script installs them into /tmp/site if found.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'PY' || { echo "gpu_check: JAX sees no GPU" >&2; exit 2; }
import jax
assert jax.devices()[0].platform == "gpu", jax.devices()
print(jax.__version__, jax.devices())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
python3 benchmarks/throughput.py --model=ViT-B/16 --batch="${BATCH:-256}" --dtype=bfloat16 --rounds=5 --steps=10
