#!/usr/bin/env bash
# The prepared GPU check (issue #19): run it whenever a GPU is at hand, in one call of the device tool:
#     bash benchmarks/gpu_check.sh            # every part, under 8 minutes on one H200
#     bash benchmarks/gpu_check.sh --only engine,nccl
# It needs no Ray and no installs: the machine's own python3 with torch, triton and cupy, and this checkout.
# Results (gpu_check.json, each part's log, bench_kernels.json) go to $OUT when the device tool sets it, else
# results/gpu_check/; the summary table is printed last. Exit status 1 when any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-results/gpu_check}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 \
    | tee "$out/nvidia-smi.csv"
python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
                                        "triton", triton.__version__)'
exec python3 benchmarks/gpu_check.py --out "$out" "$@"
