"""Run folders that cannot be clobbered and faults that end in one clean line (issue 13):
the folder lock, earlier runs, an edited config.yaml on resume, stale temp files, disk full,
a read-only folder, bad devices, malformed overrides, eval's input checks, unreadable images,
inputs below a model's minimum size and the recovery of a diverged run."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from faults import FAULTY_CLI
from run_options import QUIET

from normfree.cli import main
from normfree.train import Callback, load_checkpoint, train
from normfree.train.run_folder import LOCK_FILE, RunFolderError, RunFolderLock

TINY = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=32", *QUIET]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step run folder (copy it before changing it)."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def _one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------- lock
def _hold_lock(run: Path) -> subprocess.Popen:
    """Another process holding the folder's lock the way normfree does (flock, pid inside)."""
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(run / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'pid {os.getpid()} on test'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_folder_in_use_is_refused_and_a_dead_holder_is_detected(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(tiny_run, tmp_path)
    holder = _hold_lock(run)
    try:
        assert main(["train", "--resume", str(run)]) == 2
        _one_line_error(capsys.readouterr().err, "in use by another normfree process",
                        f"pid {holder.pid}")  # fmt: skip
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        (fresh / LOCK_FILE).touch()
        holder2 = _hold_lock(fresh)
        assert main(["train", "--out", str(fresh), *TINY]) == 2
        _one_line_error(capsys.readouterr().err, "in use by another normfree process")
        holder2.kill()
        holder2.wait()
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9): its lock file stays but the lock is free again
    assert (run / LOCK_FILE).read_text().startswith(f"pid {holder.pid}")
    with RunFolderLock(run) as lock:
        assert lock.held and f"pid {os.getpid()}" in (run / LOCK_FILE).read_text()
        with pytest.raises(RunFolderError, match="in use"):
            RunFolderLock(run).acquire()  # and a second taker in this process is refused too
    RunFolderLock(run).acquire().release()


@pytest.mark.slow
def test_two_concurrent_cli_runs_into_one_folder(tmp_path: Path) -> None:
    """Two ``normfree train --out same`` processes: the second stops with a clear error, the
    first finishes; then two concurrent ``--resume`` of one run: the second is refused."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "NORMFREE_TEST_FAULTS": "sleep=1.0"}  # fmt: skip
    args = ["train", "--out", str(run), *QUIET, "train.epochs=3", "train.max_steps_per_epoch=6",
            "train.batch_size=32", "train.checkpoint_every_steps=2"]  # fmt: skip
    first = subprocess.Popen([sys.executable, FAULTY_CLI, *args], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "last.pt").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.1)
    second = subprocess.run([sys.executable, "-m", "normfree", *args], env=env, text=True,
                            capture_output=True, timeout=120)  # fmt: skip
    assert second.returncode == 2
    _one_line_error(second.stderr, "in use by another normfree process", f"pid {first.pid}")
    resume = subprocess.run([sys.executable, "-m", "normfree", "train", "--resume", str(run)],
                            env=env, text=True, capture_output=True, timeout=120)  # fmt: skip
    assert resume.returncode == 2
    _one_line_error(resume.stderr, "in use by another normfree process")
    _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    epochs = [r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").open())
              if r["kind"] == "epoch"]  # fmt: skip
    assert epochs == [1, 2, 3]  # one run's records, not two interleaved


# ------------------------------------------------------------------ earlier runs
def test_a_folder_with_an_earlier_run_needs_overwrite(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(tiny_run, tmp_path)
    (run / "last.pt").unlink()  # best.pt and metrics.jsonl of the earlier run remain
    old_best = (run / "best.pt").read_bytes()
    assert main(["train", "--out", str(run), *TINY]) == 2
    _one_line_error(capsys.readouterr().err, "already holds an earlier run", "best.pt",
                    "metrics.jsonl", "--overwrite")  # fmt: skip
    assert (run / "best.pt").read_bytes() == old_best
    (run / "notes.txt").write_text("mine")
    assert main(["train", "--out", str(run), "--overwrite", *TINY, "seed=1"]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]  # not appended
    assert load_checkpoint(run / "best.pt")["config"]["seed"] == 1
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_reports_an_edited_config_and_cleans_stale_temp_files(
    tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _copy(tiny_run, tmp_path)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("epochs: 1", "epochs: 2"))
    stale = run / ".last.pt.k2j4x9.tmp"
    stale.write_bytes(b"\0" * 4096)  # left by a kill during a checkpoint write
    with caplog.at_level(logging.WARNING, logger="normfree"):
        assert main(["train", "--resume", str(run)]) == 0
    log = caplog.text
    assert "config.yaml was edited" in log and "train.epochs: checkpoint 1, config.yaml 2" in log
    assert "checkpoint's config wins" in log
    assert "epochs: 1" in (run / "config.yaml").read_text()  # rewritten from the checkpoint
    assert not stale.exists() and "removed" in log and stale.name in log


# ----------------------------------------------------------------- I/O faults
def test_disk_full_while_saving_is_one_line_and_keeps_last_pt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    real_fsync = os.fsync
    full = {"on": False}

    def fsync(fd: int) -> None:
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    class FillDisk(Callback):
        def on_step_end(self, trainer: object) -> None:
            full["on"] = trainer.global_step >= 2

    monkeypatch.setattr(os, "fsync", fsync)
    real_train = train
    monkeypatch.setattr("normfree.train.loop.train",
                        lambda *a, **k: real_train(*a, callbacks=[FillDisk()], **k))  # fmt: skip
    code = main(["train", "--out", str(run), *TINY, "train.max_steps_per_epoch=6",
                 "train.checkpoint_every_steps=2"])  # fmt: skip
    assert code == 1
    _one_line_error(capsys.readouterr().err, "last.pt", "the disk is full", "left as it was")
    assert load_checkpoint(run / "last.pt")["position"]["global_step"] == 2
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_read_only_run_folder_on_resume(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    run = _copy(tiny_run, tmp_path)
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
        if Path(str(kwargs.get("dir"))) == run:  # a read-only mount (root ignores chmod)
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    before = (run / "last.pt").read_bytes()
    assert main(["train", "--resume", str(run)]) == 2
    _one_line_error(capsys.readouterr().err, "is not writable", "Read-only file system")
    assert (run / "last.pt").read_bytes() == before


# ------------------------------------------------------------- bad input, CLI
@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["train", "train.device=tpu"], ["train.device='tpu'", "auto, cpu, cuda"]),
        (["train", "model_kwargs.width=["], ["model_kwargs.width", "not valid YAML"]),
        (["spp", "--override", "alpha=[", "nf_resnet_cifar20"], ["alpha=[", "not valid YAML"]),
        (["spp", "nf_resnet_cifar20[alpha=[]"], ["nf_resnet_cifar20[alpha=[]", "not valid YAML"]),
        (["diagnose", "nf_resnet_cifar20[alpha=[]"], ["not valid YAML"]),
    ],
    ids=["tpu", "train-yaml", "spp-override-yaml", "spp-spec-yaml", "diagnose-spec-yaml"],
)
def test_bad_devices_and_malformed_overrides_are_one_line(
    argv: list[str], needles: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[0] == "train":
        argv = ["train", "--out", str(tmp_path / "run"), *TINY, *argv[1:]]  # after TINY's cpu
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, *needles)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"model: [unclosed\n", ["bad.cfg", "not valid YAML", "at line 2, column 1"]),
        (b"PK\x03\x04\x80\xff a checkpoint", ["bad.cfg", "not a UTF-8 text file", "init_from="]),
    ],
    ids=["yaml", "binary"],
)
def test_a_bad_config_file_is_one_line(
    content: bytes, needles: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.cfg"
    config.write_bytes(content)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), *TINY]) == 2
    _one_line_error(capsys.readouterr().err, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "run"), *TINY, "train.device=cuda"]
    assert main(["train", *out]) == 2
    _one_line_error(capsys.readouterr().err, "CUDA is not available")
    assert main(["train", "--nproc", "2", *out]) == 2  # before spawning
    _one_line_error(capsys.readouterr().err, "CUDA is not available")


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_more_processes_than_gpus_is_one_line_before_spawning(
    device: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """``--nproc 2`` on a machine with one GPU: process 1 would pick cuda:1, which does not
    exist (before, every worker but the first died with a CUDA device-side assertion)."""
    from normfree.train.distributed import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device(device, local_rank=0) == torch.device("cuda:0")
    out = ["--out", str(tmp_path / "run"), *TINY, f"train.device={device}"]
    assert main(["train", "--nproc", "2", *out]) == 2
    _one_line_error(capsys.readouterr().err, "process 1", "1 CUDA device(s)", "at most 1")
    assert not (tmp_path / "run").exists()
    # a fixed device puts every process on one GPU: NCCL refuses, gloo would run
    assert main(["train", "--nproc", "2", *out[:-1], "train.device=cuda:0"]) == 2
    _one_line_error(capsys.readouterr().err, "all 2 processes on one GPU", "dist.backend=gloo")
    assert not (tmp_path / "run").exists()


def test_eval_checks_its_inputs_before_evaluating(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("evaluation ran")

    monkeypatch.setattr(sys.modules["normfree.train.evaluate"], "evaluate", never)
    ckpt = str(tiny_run / "last.pt")
    with pytest.raises(SystemExit) as refused:  # argparse's own check (positive_int)
        main(["eval", ckpt, "--batch-size", "0"])
    assert refused.value.code == 2
    _one_line_error(capsys.readouterr().err, "--batch-size", "got 0")
    assert main(["eval", ckpt, "--workers", "-1"]) == 2
    _one_line_error(capsys.readouterr().err, "--workers must be a non-negative number, got -1")
    assert main(["eval", ckpt, "--device", "tpu"]) == 2
    _one_line_error(capsys.readouterr().err, "--device='tpu'")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["eval", ckpt, "--json", str(blocker / "r.json")]) == 2
    _one_line_error(capsys.readouterr().err, "cannot write", "r.json")


def test_eval_refuses_a_checkpoint_asking_for_a_bigger_model(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A small file whose model_args ask for a huge model fails on the meta-device check,
    before any real model is built."""
    state = torch.load(tiny_run / "last.pt", weights_only=True)
    state["model_args"]["kwargs"]["width"] = 64  # ~1000x the parameters of the stored tensors
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    built: list[str] = []
    import normfree.train.builders as builders

    real_build = builders.build_model

    def build(args: dict) -> torch.nn.Module:
        model = real_build(args)
        if not any(p.is_meta for p in model.parameters()):
            built.append(args["name"])
        return model

    monkeypatch.setattr(builders, "build_model", build)
    assert main(["eval", str(bad)]) == 2
    _one_line_error(capsys.readouterr().err, "does not hold the weights", "shape")
    assert built == []  # nothing was allocated for real


def test_unreadable_image_is_named_or_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    pil = pytest.importorskip("PIL.Image")
    root = tmp_path / "images"
    rng = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(20):
            arr = torch.randint(0, 256, (16, 16, 3), generator=rng, dtype=torch.uint8).numpy()
            pil.fromarray(arr).save(root / c / f"{i}.jpg")
    broken = root / "a" / "3.jpg"
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated JPEG
    args = [f"--data=imagefolder:{root}", "data.image_size=16", "data.test_size=16",
            "train.epochs=1", "train.batch_size=8", *QUIET]  # fmt: skip
    assert main(["train", "--out", str(tmp_path / "r1"), *args]) == 2
    _one_line_error(capsys.readouterr().err, str(broken), "data.skip_unreadable=true")
    with caplog.at_level(logging.WARNING, logger="normfree"):
        assert (
            main(["train", "--out", str(tmp_path / "r2"), *args, "data.skip_unreadable=true"]) == 0
        )
    assert f"skipping unreadable image {broken}" in caplog.text
    assert "1 unreadable file(s) skipped so far" in caplog.text


def test_inputs_below_the_minimum_size_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--out", str(tmp_path / "run"), *TINY, "model=nf_regnet_b0"]
    assert main([*argv, "--data", "synthetic:size=4,n=64"]) == 2
    _one_line_error(capsys.readouterr().err, "data.image_size=4", "minimum size of 32x32")


# ----------------------------------------------------------- diverged-run recovery
@pytest.mark.slow
def test_a_diverged_run_recovers_with_a_lower_learning_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An lr far too high diverges in epoch 2; resuming as is diverges again at the same step;
    resuming with optim.lr=0.1 completes with finite weights and a falling loss, and the change
    is in config_history.jsonl and in the checkpoint's config."""
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), *QUIET, "train.epochs=4", "train.max_steps_per_epoch=3",
            "train.batch_size=32", "schedule.warmup_steps=15", "optim.lr=300",
            "log.every_steps=1"]  # fmt: skip
    assert main(argv) == 1
    assert "non-finite loss (nan) at step 5" in capsys.readouterr().err
    assert load_checkpoint(run / "last.pt")["position"]["global_step"] == 3
    assert main(["train", "--resume", str(run)]) == 1
    assert "non-finite loss (nan) at step 5" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "optim.lr=0.1"]) == 0
    state = load_checkpoint(run / "last.pt")
    assert state["position"]["global_step"] == 12 and state["config"]["optim"]["lr"] == 0.1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").open())
              if r["kind"] == "step" and r["step"] > 3]  # fmt: skip
    assert len(losses) == 9 and losses[-1] < losses[0] / 1000
    history = [json.loads(x) for x in (run / "config_history.jsonl").open()]
    assert history == [{**history[0], "event": "resume", "step": 3,
                        "changes": {"optim.lr": {"from": 300.0, "to": 0.1}}}]  # fmt: skip


# ------------------------------------------------------------------ resume input
def test_resume_refuses_non_finite_overrides_before_touching_the_run(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(tiny_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for override in ("optim.clipping=.inf", "optim.agc_eps=.inf", "optim.lr=.nan"):
        assert main(["train", "--resume", str(run), override]) == 2
        _one_line_error(capsys.readouterr().err, override.split("=")[0], "finite number")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_out_with_resume_is_refused_and_the_run_keeps_its_out_dir(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(tiny_run, tmp_path)
    config = (run / "config.yaml").read_text()
    other = tmp_path / "other"
    assert main(["train", "--resume", str(run), "--out", str(other)]) == 2
    _one_line_error(capsys.readouterr().err, "--out cannot be combined with --resume",
                    "init_from=")  # fmt: skip
    assert main(["train", "--resume", str(run), f"out_dir={other}"]) == 2
    _one_line_error(capsys.readouterr().err, "cannot change 'out_dir'", "init_from=")
    assert (run / "config.yaml").read_text() == config and not other.exists()


def test_resuming_a_complete_run_trains_nothing_and_rewrites_nothing(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from normfree.train import RunAlreadyComplete, config_from_dict

    run = _copy(tiny_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(run)]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and "already complete (1 of 1 epochs)" in out, out
    assert f"init_from={run / 'last.pt'}" in out and "Traceback" not in err
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == {**before, LOCK_FILE: after[LOCK_FILE]}  # summary.json as it was
    cfg = config_from_dict(load_checkpoint(run / "last.pt")["config"])
    with pytest.raises(RunAlreadyComplete, match="already complete"):
        train(cfg, resume=run)


def test_default_run_folders_of_one_second_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs started in the same second without --out: each gets its own folder."""
    from datetime import datetime

    import normfree.train.trainer_state as ts
    from normfree.train import resolve_config
    from normfree.train.distributed import DistInfo

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(ts, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(overrides=TINY)
    first, lock1 = ts.prepare_run_dir(cfg, DistInfo(), "digits")
    second, lock2 = ts.prepare_run_dir(cfg, DistInfo(), "digits")
    try:
        assert first == Path("runs/nf_resnet_cifar20-digits-20260102-030405")
        assert second == Path(f"{first}-2") and lock1.held and lock2.held
        assert ts.default_run_dir(cfg, "digits") == Path(f"{first}-3")
    finally:
        lock1.release()
        lock2.release()


def test_update_in_backward_with_nproc_is_refused_before_spawning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import normfree.train.cli as train_cli

    def spawn(*args: object) -> int:
        raise AssertionError("workers were spawned")

    monkeypatch.setattr(train_cli, "_spawn", spawn)
    argv = ["train", "--nproc", "2", "--out", str(tmp_path / "run"), *TINY,
            "optim.update_in_backward=true", "train.native_kernels=true"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    _one_line_error(err, "'optim.update_in_backward' must be false with several processes")
    assert "--resume" not in err and not (tmp_path / "run").exists()


def test_a_dead_worker_advises_resume_only_where_a_checkpoint_exists(tmp_path: Path) -> None:
    from argparse import Namespace

    from normfree.train import resolve_config
    from normfree.train.cli import _resume_advice

    run = tmp_path / "run"
    run.mkdir()
    cfg = resolve_config(overrides=[f"out_dir={run}"])
    args = Namespace(resume=None)
    assert "No checkpoint had been written" in _resume_advice(args, cfg, time.time())
    (run / "last.pt").write_bytes(b"")
    assert _resume_advice(args, cfg, time.time()) == (
        f"Continue from the last checkpoint with --resume {run}"
    )


# PyTorch's CPU allocator refusing 40 GB (what data.image_size=100000 asks for)
_OOM = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
    "memory: you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)"
)


def test_out_of_memory_is_one_line(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """An allocation the machine cannot serve (``data.image_size=100000``, ``eval --test-size
    100000``) ends in one line naming the size and the fix, without touching the run."""

    def too_big(*args: object, **kwargs: object) -> None:
        raise RuntimeError(_OOM)

    run = _copy(tiny_run, tmp_path)
    before = (run / "last.pt").read_bytes()
    monkeypatch.setattr(sys.modules["normfree.train.evaluate"], "evaluate", too_big)
    assert main(["eval", str(run), "--test-size", "100000"]) == 1
    _one_line_error(capsys.readouterr().err, "out of memory (37.3 GiB asked for)", "--test-size")
    monkeypatch.setattr("normfree.train.loop.train", too_big)
    assert main(["train", "--out", str(tmp_path / "big"), *TINY, "data.image_size=100000"]) == 1
    _one_line_error(capsys.readouterr().err, "out of memory (37.3 GiB", "data.image_size")
    assert (run / "last.pt").read_bytes() == before


# ------------------------------------------------------------- files from elsewhere
@pytest.mark.parametrize("name", [LOCK_FILE, "config_history.jsonl", "tensorboard", "finetune"])
def test_a_symlink_in_a_run_folder_is_not_written_through(
    name: str, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lock and the config history are written in place: a run folder from elsewhere
    whose entries link to another file gets them refused, the file untouched."""
    run = _copy(tiny_run, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n" * 10)
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(victim)
    if name in (LOCK_FILE, "tensorboard", "finetune"):  # checked by every run, finished or not
        assert main(["train", "--resume", str(run)]) == 2
        _one_line_error(capsys.readouterr().err, name, "symbolic link")
    else:  # appended to when a resume changes the config
        from normfree.train.run_folder import record_config_change

        with pytest.raises(RunFolderError, match="symbolic link"):
            record_config_change(run, "resume", 2, {"optim.lr": (0.1, 0.05)})
    assert victim.read_text() == "keep me\n" * 10


def test_stored_model_options_may_not_name_other_files(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = torch.load(tiny_run / "last.pt", weights_only=True)
    state["model_args"]["kwargs"]["checkpoint_path"] = str(tmp_path / "private.pt")
    forged = tmp_path / "forged.pt"
    torch.save(state, forged)
    for argv in (["eval", str(forged)], ["export", str(forged), "--out", str(tmp_path / "m.pt2")]):
        assert main(argv) == 2
        _one_line_error(capsys.readouterr().err, "['checkpoint_path']", "init_from=FILE")


def test_model_options_naming_a_file_are_refused_before_the_size_probe_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An image folder with no size set builds a throw-away model for its sizes: that probe
    must not load the weights the options name (it used to read the file first)."""
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / label / "0.png")
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not read")
    options = f"{{pretrained: true, pretrained_cfg_overlay: {{file: '{weights}'}}}}"
    argv = ["train", f"data.spec=imagefolder:{tmp_path / 'images'}", f"model_kwargs={options}",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2  # before: the probe read the file ("corrupt") and this was never said
    _one_line_error(capsys.readouterr().err, "'pretrained', 'pretrained_cfg_overlay'",
                    "init_from=FILE")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_config_naming_a_callable_teacher_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """distill.teacher from a config file (or a resumed checkpoint's config) is a file's
    choice: a package.module:factory there needs --trust-code."""
    marker = tmp_path / "code_ran"
    config = tmp_path / "evil.yaml"
    config.write_text(
        "distill:\n  teacher: 'builtins:open'\n  teacher_weights: x.pt\n"
        f"  teacher_kwargs: {{file: '{marker}', mode: w}}\n"
    )
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), *TINY]) == 2
    _one_line_error(capsys.readouterr().err, "distill.teacher", "'builtins:open'", "--trust-code")
    assert not marker.exists()


def test_export_takes_no_size_from_a_checkpoint_on_trust(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint's recorded test size sets the export's input: an absurd one is refused
    (--image-size overrides it), and its model is checked against its tensors first."""
    state = torch.load(tiny_run / "last.pt", weights_only=True)
    state["data_info"]["test_size"] = 20000
    forged = tmp_path / "forged.pt"
    torch.save(state, forged)
    out = tmp_path / "m.pt2"
    assert main(["export", str(forged), "--out", str(out)]) == 2
    _one_line_error(capsys.readouterr().err, "input size of 20000", "--image-size")
    assert main(["export", str(forged), "--out", str(out), "--image-size", "8"]) == 0
    state["model_args"]["num_classes"] = 3_000_000
    torch.save(state, forged)
    assert main(["export", str(forged), "--out", str(out), "--image-size", "8"]) == 2
    _one_line_error(capsys.readouterr().err, "does not hold the weights")


def test_a_new_run_refuses_a_dangling_link_and_a_fifo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A link whose target does not exist yet still counts as an earlier run's file (it would
    be appended through), and a FIFO in place of a file the run appends to fails at once."""
    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "outside.txt"
    (run / "metrics.jsonl").symlink_to(outside)
    assert main(["train", "--out", str(run), *TINY]) == 2
    _one_line_error(capsys.readouterr().err, "already holds an earlier run", "metrics.jsonl")
    assert not outside.exists()
    if hasattr(os, "mkfifo"):
        from normfree.train.run_folder import record_config_change

        os.mkfifo(run / "config_history.jsonl")
        with pytest.raises(RunFolderError, match="not a regular file"):
            record_config_change(run, "resume", 1, {"optim.lr": (0.1, 0.05)})
