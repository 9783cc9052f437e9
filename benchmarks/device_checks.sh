#!/usr/bin/env bash
# Everything normfree checks on a CUDA machine, in one run (GPU time is short and a machine
# starts bare): the device tests, the whole-model benchmark on the GPU in fp32 and bf16, then
# the whole test suite with CUDA visible (device "auto" is then CUDA in the training tests).
# Each step has its own time limit and writes its log into OUTDIR as it goes.
#
#   bash benchmarks/device_checks.sh OUTDIR [SECONDS_FOR_THE_WHOLE_SUITE]
#
# normfree is imported from src/ (no install needed); the packages of pyproject.toml's dev
# extra must be importable.
set -uo pipefail
out=${1:?usage: device_checks.sh OUTDIR [SECONDS_FOR_THE_WHOLE_SUITE]}
suite_s=${2:-150}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(mktemp -d)}"
step() { echo "== $1 ($(date -u +%H:%M:%S))"; }

step environment
{ nvidia-smi -L; python3 -c 'import torch, timm, torchvision, sys; print(sys.version.split()[0],
  "torch", torch.__version__, "cuda", torch.version.cuda, "timm", timm.__version__,
  "torchvision", torchvision.__version__, torch.cuda.get_device_name(0))'; } 2>&1 |
  tee "$out/environment.txt"

step "device tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rA --durations=8 tests/test_cuda.py \
  tests/train/test_cuda_train.py 2>&1 | tee "$out/device_tests.log"

models=torchvision:resnet50_nonorm,normfree:nf_resnet50,timm:nf_resnet50,torchvision:resnet50
models=$models,timm:dm_nfnet_f0,normfree:nfnet_f0,timm:nf_regnet_b0,normfree:nf_regnet_b0
for precision in fp32 bf16; do
  step "bench_train cuda $precision"
  timeout 120 python3 benchmarks/bench_train.py --device cuda --batch 64 --size 224 \
    --rounds 10 --fused-optimizer --precision "$precision" --only "$models" 2>&1 |
    tee "$out/bench_train_cuda_$precision.log"
done

step "whole suite, CUDA visible"
timeout "$suite_s" python3 -m pytest -q -p no:cacheprovider -n 12 --durations=5 tests 2>&1 |
  tee "$out/suite.log"
step done
