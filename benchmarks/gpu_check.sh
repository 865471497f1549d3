#!/usr/bin/env bash
# GPU readiness check: gpu tests, streamed scoring, eval speed, distillation and FP8 vs bf16 speed of a
# generated ~1B Nemotron-H on one GPU, in under 7 minutes; one JSON ($OUT/gpu_check.json, else
# benchmarks/results/gpu_check.json) and a summary on stdout. See benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh               # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke   # tiny sizes on the CPU
set -u
cd "$(dirname "$0")/.."
# Packages the GPU machine lacks travel as wheels in .whl/ (see README "GPU check"); never pip install -e there.
if compgen -G ".whl/*.whl" > /dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_check: could not install .whl/*.whl (wrong Python?); going on without them" >&2
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# The PyTorch Mamba path allocates and frees ~10-17 GB float32 temporaries per block: avoid fragmentation OOMs.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# The script keeps its own 400 s budget and rewrites the JSON after every part; this is the backstop.
timeout -k 15 450 python3 benchmarks/gpu_check.py "$@"
