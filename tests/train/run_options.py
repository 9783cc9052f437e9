"""Overrides shared by the training-system tests (importable from tests/train: conftest.py
puts this folder on sys.path)."""

# quiet, one thread, and on the CPU also where CUDA is present: the exact-resume and
# DDP-equality checks hold bit for bit there (on CUDA with train.deterministic=true:
# test_cuda_train.py)
QUIET = ["log.progress=false", "log.tensorboard=false", "log.plot=false", "train.threads=1",
         "train.device=cpu"]  # fmt: skip
