#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one script (run on a CUDA machine from the repository root):
# the paper preset's training images/s fp32 vs bf16 autocast, with and without torch.compile and
# channels_last, fused vs per-dataset vs unconstrained; sampling throughput; peak memory.
#     bash benchmarks/gpu_check.sh 2>&1 | tee gpu.txt
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
S="--preset paper --device cuda --batch 128 --constraint-batch 64 --steps 10 --repeats 3"
echo "== training, fp32"; python benchmarks/primal_step.py $S --precision fp32 --constraints 1,3,10
echo "== training, bf16 autocast"; python benchmarks/primal_step.py $S --constraints 1,3,10
echo "== training, bf16 + channels_last"; python benchmarks/primal_step.py $S --channels-last --constraints 3 --modes fused
echo "== training, bf16 + torch.compile"; python benchmarks/primal_step.py $S --compile --constraints 3 --modes fused
echo "== training, fp32 + torch.compile"; python benchmarks/primal_step.py $S --compile --precision fp32 --constraints 3 --modes fused
echo "== sampling"; python benchmarks/sampling.py --preset paper --device cuda --n 2000 --n-ddpm 500 --eval-n 1000,15000 --measure-up-to 15000
echo "== memory"; python benchmarks/memory.py --preset paper --device cuda
