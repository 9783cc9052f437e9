"""``python tests/train/faulty_normfree.py ARGS`` = ``python -m normfree ARGS`` with the faults
of ``NORMFREE_TEST_FAULTS`` injected into every ``normfree.train.train`` call (see faults.py).
Also a torchrun training script."""

from __future__ import annotations

import sys

from faults import callbacks_from_env

import normfree.train.loop as loop
from normfree.cli import main

_train = loop.train


def _train_with_faults(*args, **kwargs):
    return _train(*args, callbacks=callbacks_from_env(), **kwargs)


loop.train = _train_with_faults

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
