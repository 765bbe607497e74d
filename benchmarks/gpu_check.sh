#!/usr/bin/env bash
# GPU check for the SDXL port (about 8 minutes on one H100, most of it building random full-size weights):
#   1. benchmarks/unet_speed.py --config full: our SDXL UNet vs diffusers', fp16, 1024 px, batch 2;
#   2. benchmarks/sdxl_speed.py --full: seconds per step of plain DDIM, W2SD and the published W2SD loop
#      (diffusers + peft), demo settings, same GPU, same process, with the ratios and their targets.
# Usage: bash benchmarks/gpu_check.sh            (CUDA)
#        bash benchmarks/gpu_check.sh --dry-run  (CPU, tiny configs: exercises the same code paths in ~2 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python - <<'PY'
import torch, diffusers, peft
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, {gpu}")
PY
if [ "${1:-}" = "--dry-run" ]; then
  echo "== unet_speed (tiny, CPU) =="
  timeout 300 python benchmarks/unet_speed.py --config tiny --device cpu --dtype float32 --iters 2 --warmup 1 --threads 1
  echo "== sdxl_speed (tiny, CPU) =="
  timeout 300 python benchmarks/sdxl_speed.py --config tiny --device cpu --dtype float32 --T 2 --rank 4 --threads 1
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  echo "== unet_speed (full SDXL UNet, fp16, CUDA) =="
  timeout 240 python benchmarks/unet_speed.py --config full --device cuda --dtype float16
  echo "== sdxl_speed (full SDXL UNet, fp16, CUDA, T=10) =="
  timeout 240 python benchmarks/sdxl_speed.py --full --T 10 --repeats 2
fi
