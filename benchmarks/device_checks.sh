#!/usr/bin/env bash
# Everything normfree checks on a CUDA machine, in one run (GPU time is short and a machine
# starts bare): the device tests, the whole-model benchmark on the GPU in fp32 and bf16 with a
# profile of one train step, the whole test suite with CUDA visible, and last (it compiles
# for minutes) the torch.compile'd benchmark. Each step has its own time limit and writes
# its log into OUTDIR as it goes; failing tests are listed in OUTDIR/*_failures.txt the moment
# they fail, so a step cut off by its limit still names them; the exit status is non-zero
# when a test failed.
#
#   bash benchmarks/device_checks.sh OUTDIR [SECONDS_FOR_THE_WHOLE_SUITE [SECONDS_FOR_COMPILE]]
#
# normfree is imported from src/ (no install needed); the packages of pyproject.toml's dev
# extra must be importable, and pytest-xdist for the suite. docs/benchmarks.md ("On a GPU")
# has the first run's results: on an H200 all of it took about 8 minutes without the compile
# step, which needs several more.
set -uo pipefail
out=${1:?usage: device_checks.sh OUTDIR [SECONDS_FOR_THE_WHOLE_SUITE [SECONDS_FOR_COMPILE]]}
suite_s=${2:-180}
compile_s=${3:-300}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the script runs from the repository root
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(mktemp -d)}"
step() { echo "== $1 ($(date -u +%H:%M:%S))"; }
workers() { python3 -c 'import xdist' 2>/dev/null && echo "-n $1"; }  # pytest-xdist if present
# pytest -v output to LOG, its FAILED lines also to FAILURES as they appear
tests() {
  local log=$1 failures=$2 limit=$3
  shift 3
  timeout "$limit" python3 -m pytest -v --tb=short -p no:cacheprovider -p no:benchmark "$@" \
    2>&1 | tee "$log" | grep --line-buffered -E "(FAILED|ERROR) tests/" | tee "$failures"
  tail -3 "$log"
}

step environment
{ nvidia-smi -L; python3 -c 'import torch, timm, torchvision, sys; print(sys.version.split()[0],
  "torch", torch.__version__, "cuda", torch.version.cuda, "timm", timm.__version__,
  "torchvision", torchvision.__version__, torch.cuda.get_device_name(0))'; } 2>&1 |
  tee "$out/environment.txt"

step "device tests"
tests "$out/device_tests.log" "$out/device_tests_failures.txt" 300 $(workers 4) \
  tests/test_cuda.py tests/train/test_cuda_train.py

models=torchvision:resnet50_nonorm,normfree:nf_resnet50,timm:nf_resnet50,torchvision:resnet50
models=$models,timm:dm_nfnet_f0,normfree:nfnet_f0,timm:nf_regnet_b0,normfree:nf_regnet_b0
for precision in fp32 bf16; do
  step "bench_train cuda $precision"
  timeout 150 python3 benchmarks/bench_train.py --device cuda --batch 64 --size 224 \
    --rounds 10 --fused-optimizer --precision "$precision" --only "$models" 2>&1 |
    tee "$out/bench_train_cuda_$precision.log"
done
step "profile of a normfree nf_resnet50 train step"
timeout 90 python3 benchmarks/bench_train.py --device cuda --batch 64 --size 224 \
  --fused-optimizer --profile normfree:nf_resnet50 > "$out/profile_nf_resnet50.log" 2>&1
grep "GPU kernels" "$out/profile_nf_resnet50.log"

step "whole suite, CUDA visible"
OMP_NUM_THREADS=2 tests "$out/suite.log" "$out/suite_failures.txt" "$suite_s" $(workers 8) tests

step "bench_train cuda fp32, compiled"
timeout "$compile_s" python3 benchmarks/bench_train.py --device cuda --batch 64 --size 224 \
  --rounds 5 --fused-optimizer --compile --group resnet50 \
  --only torchvision:resnet50_nonorm,normfree:nf_resnet50,timm:nf_resnet50 2>&1 |
  tee "$out/bench_train_cuda_compiled.log"
step done
# non-zero when a test failed (the benchmarks' own errors are in their logs)
! cat "$out"/*_failures.txt 2>/dev/null | grep -q .
