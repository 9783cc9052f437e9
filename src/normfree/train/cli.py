"""``normfree train`` and ``normfree eval``.

``normfree train [--recipe NAME] [--config FILE] [key=value ...]`` resolves the configuration
(:mod:`normfree.train.config_io`), then trains in this process, in each process started by
``torchrun``, or in ``--nproc N`` processes it spawns itself. ``--resume RUN_DIR`` continues a
run from its ``last.pt``. ``normfree eval CHECKPOINT`` reports raw and EMA metrics.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

from normfree.analysis.cli import (
    add_trust_code_argument,
    add_trust_pickle_argument,
    positive_int,
)
from normfree.atomic import atomic_write_json, check_writable
from normfree.console import report_error, report_out_of_memory

__all__ = ["add_parser", "run_eval", "run_train"]

log = logging.getLogger("normfree.train")

_DESCRIPTION = """\
Train a model with the NFNet recipe (SGD+Nesterov, AGC, warmup+cosine, label smoothing, EMA).
With no arguments: NF-ResNet-20 on scikit-learn's 8x8 digits (the 'digits' recipe).

Configuration: defaults <- --recipe (digits unless --config is given) <- --config FILE (YAML)
<- KEY=VALUE overrides (dotted keys, YAML values), e.g.
  normfree train --config cfg.yaml model=nfnet_f0 optim.lr=0.2 data=imagefolder:/data/in1k
Distributed: torchrun --nproc_per_node N -m normfree train ...   or   normfree train --nproc N
"""


class _TqdmHandler(logging.Handler):
    """Log lines that do not break tqdm progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover
            self.handleError(record)


def _setup_logging(rank: int) -> None:
    logger = logging.getLogger("normfree")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from normfree.train.config_io import config_help, list_recipes
    from normfree.train.run_folder import overridable_listed

    p = sub.add_parser(
        "train",
        help="train a model (default: NF-ResNet-20 on the bundled digits)",
        description=_DESCRIPTION,
        epilog="configuration keys (KEY=VALUE):\n" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("-c", "--config", metavar="FILE", help="YAML config file")
    p.add_argument(
        "-r",
        "--recipe",
        metavar="NAME",
        help=f"shipped recipe: {', '.join(list_recipes())} or none "
        "(default: digits unless --config is given)",
    )
    p.add_argument("-o", "--out", metavar="DIR", help="run folder (same as out_dir=DIR)")
    p.add_argument("--data", metavar="SPEC", help="dataset spec (same as data.spec=SPEC)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (last.pt), in that folder (no --out); KEY=VALUE may "
        f"change only {overridable_listed()}",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="let a new run replace an earlier run's files in its run folder",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (train.compile=true)"
    )
    p.add_argument("--nproc", type=int, metavar="N", help="spawn N data-parallel processes")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    add_trust_code_argument(p)  # model=converted:PATH naming its own factory
    p.set_defaults(func=run_train)

    e = sub.add_parser(
        "eval",
        help="evaluate a training checkpoint (raw and EMA weights)",
        description="Top-1/top-5 accuracy and loss of the raw and EMA weights of a checkpoint.",
    )
    e.add_argument("checkpoint", help="a .pt written by normfree train, or a run folder")
    e.add_argument("--data", metavar="SPEC", help="dataset spec (default: the run's)")
    e.add_argument("--split", choices=("val", "train"), default="val")
    e.add_argument("--image-size", type=positive_int,
                   help="resolution override (default: the run's)")  # fmt: skip
    e.add_argument("--test-size", type=positive_int,
                   help="evaluation resolution (default: the run's)")  # fmt: skip
    e.add_argument("--batch-size", type=positive_int, help="evaluation batch size")
    e.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast dtype")
    e.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    add_trust_code_argument(e)
    add_trust_pickle_argument(e)
    e.set_defaults(func=run_eval)


# ------------------------------------------------------------------------------------ train
def _resolve(args: argparse.Namespace) -> Any:
    from normfree.train.config import ConfigError
    from normfree.train.config_io import resolve_config
    from normfree.train.run_folder import resume_config

    overrides = list(args.overrides)
    keys = {item.split("=", 1)[0].strip() for item in overrides}
    for flag, given, names in (("--out", args.out, ("out_dir",)),
                               ("--data", args.data, ("data.spec", "data")),
                               ("--compile", getattr(args, "compile", False), ("train.compile",))):
        key = next((k for k in names if k in keys), None)  # fmt: skip
        if given and key:  # (argparse does not keep a flag's place among the overrides)
            raise ConfigError(f"{flag} and {key}= both given: {flag} is the same key; give one")
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.data:
        overrides.append(f"data.spec={args.data}")
    if getattr(args, "compile", False):
        overrides.append("train.compile=true")
    if args.resume is None:
        return resolve_config(args.recipe, args.config, overrides)
    if args.config or args.recipe:
        raise ConfigError("--resume continues a run with its own config; drop --config/--recipe")
    if args.overwrite:
        raise ConfigError("--overwrite starts a new run; it cannot be combined with --resume")
    if args.out:
        raise ConfigError(
            f"--out cannot be combined with --resume: the run continues in its own folder "
            f"{args.resume!r}; to branch it, start a new run from its weights "
            f"(--out NEW init_from={os.path.join(args.resume, 'last.pt')})"
        )
    return resume_config(args.resume, overrides)


def run_train(args: argparse.Namespace) -> int:
    """Entry point of ``normfree train`` (returns the exit code)."""
    from normfree.data.imagefolder import UnreadableImageError
    from normfree.train.checkpointing import CheckpointError
    from normfree.train.config import ConfigError
    from normfree.train.config_io import dump_config
    from normfree.train.loop import (
        NonFiniteLossError,
        RunAlreadyComplete,
        TrainingInterrupted,
        train,
    )

    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank)
    try:
        cfg = _resolve(args)
    except (ConfigError, CheckpointError) as e:
        return report_error(e, 2)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.nproc is not None:
        from normfree.train.distributed import select_device

        try:  # a device the workers cannot use fails here, once, not in every worker
            select_device(cfg.train.device, local_rank=max(args.nproc, 1) - 1)
        except ConfigError as e:
            return report_error(e, 2)
        one_gpu = str(cfg.train.device).strip().lower().startswith("cuda:")  # every process
        if args.nproc > 1 and one_gpu and cfg.dist.backend != "gloo":
            message = (f"train.device={cfg.train.device!r} puts all {args.nproc} processes on "
                       "one GPU, which NCCL refuses: use train.device=auto (one GPU per "
                       "process) or dist.backend=gloo")  # fmt: skip
            return report_error(ConfigError(message), 2)
        from normfree.train.config import validate_world_size

        try:  # each worker would refuse it, after rank 0 had written the run folder
            validate_world_size(cfg, max(args.nproc, 1))
        except ConfigError as e:
            return report_error(e, 2)
        if args.nproc > 1 and cfg.optim.update_in_backward:  # each worker would refuse it
            from normfree.train.config import UPDATE_IN_BACKWARD_ONE_PROCESS

            return report_error(ConfigError(UPDATE_IN_BACKWARD_ONE_PROCESS), 2)
        return _spawn(args, cfg)
    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except RunAlreadyComplete as e:  # nothing to do, nothing rewritten
        if rank == 0:
            print(e)
        return 0
    except (ConfigError, CheckpointError, UnreadableImageError) as e:
        return report_error(e, 2)
    except NonFiniteLossError as e:
        return report_error(e, 1)
    except RuntimeError as e:  # an allocation the machine cannot serve (images too large)
        fix = ("use a smaller data.image_size / data.test_size or train.batch_size / "
               "data.eval_batch_size")  # fmt: skip
        return report_out_of_memory(e, fix, 1)
    except OSError as e:  # disk full, folder gone or read-only mid-run (names the file)
        return report_error(e, 1)
    except TrainingInterrupted as e:
        if rank == 0:
            done = "last.pt written" if e.saved else "last.pt holds the last checkpoint before it"
            folder = e.resume_folder() or "<run folder>"
            print(f"{e}; {done}. Continue with --resume {folder}", file=sys.stderr)
        return 130
    if rank == 0:
        print(_result_line(summary, "run folder"))
        finetune = summary.get("finetune")
        if isinstance(finetune, dict) and "val_top1" in finetune:  # the phase's own result
            size = finetune.get("image_size")
            at = f" at {size} px" if size else ""
            print(_result_line(finetune, f"fine-tuned{at}, in"))
    return 0


def _result_line(summary: dict[str, Any], folder_label: str) -> str:
    """The one-line result of a phase: its final (and EMA) top-1, its best, time, folder."""
    ema = summary.get("ema_val_top1")
    ema_txt = f" (EMA {ema:.2f}%)" if ema is not None else ""
    return (
        f"val_top1 {summary['val_top1']:.2f}%{ema_txt}, best {summary['best_val_top1']:.2f}% "
        f"at epoch {summary['best_epoch']}; {summary['wall_time_s']:.1f}s; "
        f"{folder_label} {summary['run_dir']}"
    )


def _spawned_worker(local_rank: int, nproc: int, port: int, argv: list[str]) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from normfree.cli import main

    code = main(["train", *argv])
    if code:
        raise SystemExit(code)


def _child_argv(args: argparse.Namespace) -> list[str]:
    """The ``normfree train`` arguments of a spawned worker (everything but ``--nproc``)."""
    argv: list[str] = []
    for flag, value in (
        ("--config", args.config),
        ("--recipe", args.recipe),
        ("--out", args.out),
        ("--data", args.data),
        ("--resume", args.resume),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if args.overwrite:
        argv.append("--overwrite")
    if getattr(args, "compile", False):
        argv.append("--compile")
    if getattr(args, "trust_code", False):
        argv.append("--trust-code")
    return argv + list(args.overrides)


def _spawn(args: argparse.Namespace, cfg: Any) -> int:
    import torch.multiprocessing as mp

    from normfree.train.distributed import find_free_port

    if args.nproc < 1:
        print(f"error: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    if "WORLD_SIZE" in os.environ:
        print("error: --nproc cannot be combined with torchrun", file=sys.stderr)
        return 2
    argv = _child_argv(args)
    started = time.time()
    context = mp.start_processes(
        _spawned_worker,
        args=(args.nproc, find_free_port(), argv),
        nprocs=args.nproc,
        start_method="spawn",
        join=False,
    )
    interrupted = False
    try:
        while True:
            try:
                if context.join():
                    break
            except KeyboardInterrupt:
                # the workers got the same Ctrl-C: let them finish the step and write last.pt
                if interrupted:
                    for proc in context.processes:
                        proc.terminate()
                    raise
                interrupted = True
                print("waiting for the workers to write last.pt ...", file=sys.stderr)
    except mp.ProcessExitedException as e:
        _stop_workers(context)
        if e.signal_name:
            why = f"was killed by {e.signal_name}"
            if e.signal_name == "SIGKILL":
                why += " (out of memory? the kernel log says: dmesg | grep -i kill)"
        else:
            why = f"exited with code {e.exit_code}"
        print(
            f"error: worker rank {e.error_index} of {args.nproc} {why}; the other workers "
            f"were stopped. {_resume_advice(args, cfg, started)}",
            file=sys.stderr,
        )
        return int(e.exit_code) if e.exit_code and e.exit_code > 0 else 1
    except mp.ProcessRaisedException as e:
        _stop_workers(context)
        lines = [x for x in str(e).strip().splitlines() if x.strip()]
        print(
            f"error: worker rank {e.error_index} of {args.nproc} failed: "
            f"{lines[-1] if lines else 'unknown error'}",
            file=sys.stderr,
        )
        return 1
    return 0


def _resume_advice(args: argparse.Namespace, cfg: Any, started: float) -> str:
    """What to do after the workers died: continue from ``last.pt`` where one exists (the
    folder being resumed, ``--out``/``out_dir``, else the newest default folder of this model
    written since ``started``), otherwise start again."""
    from pathlib import Path

    run_dir = args.resume or cfg.out_dir
    if run_dir is not None:
        candidates = [Path(run_dir)]
    else:  # runs/<model>-<data>-<time>, named by rank 0
        candidates = sorted(Path("runs").glob(f"{cfg.model}-*"), key=_mtime, reverse=True)
        candidates = [p for p in candidates if _mtime(p) >= started - 1.0][:1]
    for folder in candidates:
        if (folder / "last.pt").is_file():
            return f"Continue from the last checkpoint with --resume {folder}"
    return "No checkpoint had been written: start the run again"


def _mtime(path: Any) -> float:
    try:
        return float(path.stat().st_mtime)
    except OSError:
        return 0.0


def _stop_workers(context: Any) -> None:
    """Terminate the workers still running (they would wait for the dead one forever)."""
    for proc in context.processes:
        if proc.is_alive():
            proc.terminate()
    for proc in context.processes:
        proc.join(10)


# ------------------------------------------------------------------------------------- eval
def run_eval(args: argparse.Namespace) -> int:
    """Entry point of ``normfree eval``."""
    from normfree.checkpoints import UnsafePickleError
    from normfree.train.checkpointing import CheckpointError
    from normfree.train.config import ConfigError
    from normfree.train.evaluate import evaluate_checkpoint

    _setup_logging(0)
    from normfree.convert import is_converted_file

    if is_converted_file(args.checkpoint):  # a `normfree convert` output file
        from normfree.convert.cli import run_eval_converted

        return run_eval_converted(args)
    try:
        check_writable(args.json)
        result = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            image_size=args.image_size,
            test_size=args.test_size,
            batch_size=args.batch_size,
            split=args.split,
            device=args.device,
            workers=args.workers,
            precision=args.precision,
        )
    except UnsafePickleError as e:  # no training checkpoint: a pickled converted module?
        if args.trust_pickle:
            from normfree.convert.cli import run_eval_converted

            return run_eval_converted(args)
        return report_error(e.with_opt_in("--trust-pickle"), 2)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        return report_error(e, 2)
    except RuntimeError as e:  # an allocation the machine cannot serve (images too large)
        fix = "use a smaller --test-size / --image-size or --batch-size"
        return report_out_of_memory(e, fix, 1)
    print(f"{result['model']} on {result['data']} ({result['split']}, {result['count']} images)")
    for name in ("raw", "ema"):
        m = result[name]
        if m is not None:
            print(
                f"  {name:4s} top1 {m['top1']:6.2f}%  top5 {m['top5']:6.2f}%  loss {m['loss']:.4f}"
            )
    if args.json:
        try:
            atomic_write_json(args.json, result)
        except OSError as e:
            return report_error(e, 2)
    return 0
