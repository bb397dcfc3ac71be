"""Fault tolerance: atomic checkpoints, weights_only loading, resume resolution, the resumable
sampler, SIGTERM, NaN/Inf loss, SLURM requeue ownership, and kill -9 + resume == uninterrupted."""
from __future__ import annotations

import glob
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import ROOT, run_train
from fault_helpers import Crash, CrashAtStep, SigtermAt
from helpers import TINY, cfg_with, final_metrics
from lightning.pytorch.utilities.exceptions import SIGTERMException

from data.datamodule import ShapesDataModule
from data.resumable import ResumableDataLoader, ResumableSampler, resumable_train_loader
from vision_attn.callbacks import ImageLogger
from vision_attn.errors import ConfigError, TrainingDiverged
from vision_attn.fault import (
    AtomicCheckpointIO,
    FaultTolerance,
    atomic_torch_save,
    resolve_ckpt_path,
)
from vision_attn.module import ClassificationModule

OPTIM = dict(opt="adamw", lr=2e-3, weight_decay=0.05, warmup_epochs=0.5, warmup_lr=1e-5, min_lr=1e-5)


# --- atomic writes -------------------------------------------------------------------------------


def test_crash_during_save_leaves_previous_last_ckpt_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    good = path.read_bytes()

    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # bytes reach the file, then the process "dies"
        raise OSError("simulated crash during torch.save")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="simulated crash"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)

    assert path.read_bytes() == good
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert os.listdir(path.parent) == ["last.ckpt"]  # the temp file is gone too


def test_stale_temp_file_from_a_killed_writer_is_cleaned_but_live_and_remote_writers_are_left(tmp_path):
    import socket

    host = socket.gethostname().replace(".", "_").replace("-", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / "last.ckpt"
    killed = tmp_path / f".last.ckpt.{host}-{int(dead.stdout)}.tmp"  # a writer killed mid-write
    live = tmp_path / f".last.ckpt.{host}-{os.getppid()}.tmp"  # a writer still writing
    remote = tmp_path / ".last.ckpt.othernode-1.tmp"  # another host of a shared file system
    for temp in (killed, live, remote):
        temp.write_bytes(b"truncated")
    atomic_torch_save({"global_step": 3}, str(path))
    assert torch.load(path, weights_only=True) == {"global_step": 3}
    assert sorted(os.listdir(tmp_path)) == sorted(["last.ckpt", live.name, remote.name])


def test_a_checkpoint_written_on_a_gpu_loads_onto_the_cpu(tmp_path, monkeypatch):
    """Tensors saved from cuda:0 come back on the CPU (a CPU-only machine, DDP ranks not all on cuda:0)."""
    path = str(tmp_path / "gpu.ckpt")
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 5}, path)
    monkeypatch.undo()
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded["state_dict"]["w"].device.type == "cpu" and loaded["global_step"] == 5


# --- checkpoint contents --------------------------------------------------------------------------


def test_checkpoints_load_weights_only_and_hold_scheduler_loader_and_rng_state(tmp_path):
    L.seed_everything(0, workers=True)
    dm = ShapesDataModule(image_size=32, batch_size=8, train_size=48, val_size=8, test_size=8)
    module = ClassificationModule(dict(variant="swin", size="pico", embed_dim=16), 8, 32, OPTIM)
    ft = FaultTolerance(str(tmp_path / "checkpoints"), every_n_train_steps=4)
    trainer = L.Trainer(max_steps=4, logger=False, callbacks=[ft], plugins=[AtomicCheckpointIO()],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)  # plain containers only
    assert ckpt["global_step"] == 4
    assert isinstance(ckpt["hyper_parameters"]["model"], dict) and ckpt["hyper_parameters"]["optim"]["lr"] == 2e-3
    (sched,) = ckpt["lr_schedulers"]  # timm's CosineLRScheduler state, saved by Lightning
    assert sched["t_initial"] == 4 and sched["base_values"] == [2e-3, 2e-3]  # decay, no-decay groups
    (loader,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader == {"epoch": 0, "batches": 4, "batch_size": 8, "num_replicas": 1, "seed": 0}
    assert set(ckpt["callbacks"]["FaultTolerance"]["rng"][0]) >= {"torch", "numpy", "python"}  # {rank: states}


def _fit(tmp_path, crash_at=None, resume=False, every_n=None, val_size=16, extra=(), image_size=32, **model):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(3, workers=True)
    dm = ShapesDataModule(image_size=image_size, batch_size=16, train_size=64, val_size=val_size, test_size=16)
    module = ClassificationModule(dict(variant="swin", size="pico", embed_dim=16, **model), 8, image_size, OPTIM)
    ckpt_dir = tmp_path / "checkpoints"
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, monitor="val/acc1", mode="max", save_top_k=1),
                 FaultTolerance(str(ckpt_dir), every_n_train_steps=every_n)]
    trainer = L.Trainer(max_epochs=2, deterministic=True, logger=False, plugins=[AtomicCheckpointIO()],
                        callbacks=callbacks + ([CrashAtStep(crash_at)] if crash_at else []) + list(extra),
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_dir / "last.ckpt") if resume else None)
    except Crash:
        return None
    return module, trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("ref"))  # checkpoint writes do not change training


@pytest.mark.parametrize("every_n,crash_at,saved_at",
                         [pytest.param(None, 6, 4, marks=pytest.mark.slow), (3, 7, 6), (4, 5, 4)],
                         ids=["epoch-end", "mid-epoch", "every-n-at-epoch-end"])
def test_resume_in_process_is_bit_identical(tmp_path, uninterrupted, every_n, crash_at, saved_at):
    """4 steps an epoch, 2 epochs; crash, resume from last.ckpt (written at the end of epoch 0, or
    mid-epoch at step 6), compare with an uninterrupted run: same weights, same validation."""
    ref, ref_trainer = uninterrupted
    assert _fit(tmp_path / "cut", crash_at=crash_at, every_n=every_n) is None
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == saved_at
    resumed, trainer = _fit(tmp_path / "cut", resume=True, every_n=every_n)
    assert trainer.global_step == ref_trainer.global_step == 8
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for key in ("val/loss", "val/acc1"):
        assert float(trainer.callback_metrics[key]) == float(ref_trainer.callback_metrics[key]), key
    # the same best checkpoint: last.ckpt written at an epoch's end holds that epoch's best-k state
    # (ModelCheckpoint saves at train epoch end, after FaultTolerance's hook: it used to be missing)
    assert trainer.checkpoint_callback.best_model_score == ref_trainer.checkpoint_callback.best_model_score


def test_tiled_memory_model_resumes_mid_epoch_bit_identically(tmp_path):
    """Tiles with a recurrent memory (4 tiles an image): the memory lives in each forward, not in
    the module, so a crash after step 7 and a resume from step 6 equal the uninterrupted run."""
    tiles = dict(image_size=64, tile_size=32, memory_tokens=2)
    ref, ref_trainer = _fit(tmp_path / "ref", **tiles)
    assert _fit(tmp_path / "cut", crash_at=7, every_n=3, **tiles) is None
    resumed, trainer = _fit(tmp_path / "cut", resume=True, every_n=3, **tiles)
    assert trainer.global_step == ref_trainer.global_step == 8
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert float(trainer.callback_metrics["val/loss"]) == float(ref_trainer.callback_metrics["val/loss"])


class ValRecorder(L.Callback):
    """The fit's validation metrics per epoch, as ModelCheckpoint sees them."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.by_epoch[trainer.current_epoch] = {k: float(trainer.callback_metrics[k])
                                                    for k in ("val/loss", "val/acc1")}


def test_sigterm_mid_validation_reruns_that_validation_in_full_on_resume(tmp_path, one_thread):
    """3 validation batches; SIGTERM at validation batch 1 of epoch 0 saves last.ckpt; the resumed
    run validates epoch 0 again from its first batch: the same score (and best checkpoint) as an
    uninterrupted run, not a score over the batches left."""
    ref_rec = ValRecorder()
    ref, ref_trainer = _fit(tmp_path / "ref", val_size=48, extra=[ref_rec])
    with pytest.raises(SIGTERMException):
        _fit(tmp_path / "cut", val_size=48, extra=[SigtermAt("validation", batch=1, epoch=0)])
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    rec = ValRecorder()
    resumed, trainer = _fit(tmp_path / "cut", resume=True, val_size=48, extra=[rec])
    assert rec.by_epoch == ref_rec.by_epoch and set(rec.by_epoch) == {0, 1}
    assert (float(trainer.checkpoint_callback.best_model_score)
            == float(ref_trainer.checkpoint_callback.best_model_score))
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _rng_states() -> tuple:
    """The global torch, numpy and python RNG states, comparable with ``==``."""
    np_state = np.random.get_state()
    return torch.get_rng_state().numpy().tobytes(), np_state[1].tobytes(), np_state[2], random.getstate()


class DrawsInValidation(L.Callback):
    """Draws from every global RNG at each validation's end (a user's callback, say)."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        torch.rand(1), np.random.rand(), random.random()


class RngAcrossValidation(L.Callback):
    """For each of the fit's validations: whether the global RNG states at its end equal those
    after the training batch before it (loader iterators, the model, other callbacks in between)."""

    def __init__(self) -> None:
        self.before, self.unchanged = None, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.before = _rng_states()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.unchanged.append(_rng_states() == self.before)


def test_validation_with_the_image_logger_draws_nothing_from_the_global_rngs(tmp_path):
    """No FaultTolerance here: the val loader (0 workers: a new iterator every epoch), the eval
    forward and ImageLogger (fresh attention modules each epoch) leave training's streams alone."""
    L.seed_everything(0, workers=True)
    dm = ShapesDataModule(image_size=32, batch_size=8, train_size=16, val_size=8, test_size=8)
    module = ClassificationModule(dict(variant="swin", size="pico", embed_dim=16), 8, 32, OPTIM)
    watch = RngAcrossValidation()
    trainer = L.Trainer(max_epochs=2, logger=False, callbacks=[ImageLogger(str(tmp_path / "images")), watch],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert watch.unchanged == [True, True]
    assert (tmp_path / "images" / "attention_patterns.png").is_file()


def test_the_fits_validation_leaves_the_training_rng_streams_alone(tmp_path):
    """A callback drawing from every global RNG in validation: FaultTolerance puts the states from
    before the validation back, so training continues on the streams it left."""
    watch = RngAcrossValidation()
    _fit(tmp_path, extra=[DrawsInValidation(), watch])  # FaultTolerance's on_validation_end runs before watch's
    assert watch.unchanged == [True, True]


# --- resumable sampler -----------------------------------------------------------------------------


def _loader(n=40, bs=4, world=1, rank=0, seed=7):
    ds = torch.utils.data.TensorDataset(torch.arange(n))
    return ResumableDataLoader(ds, batch_size=bs, sampler=ResumableSampler(ds, world, rank, seed=seed), seed=seed)


def _ids(batches):
    return [int(i) for b in batches for i in b[0]]


def test_loader_resumes_mid_epoch_at_the_next_batch():
    full = _loader()
    full.sampler.set_epoch(2)
    reference = list(full)
    assert _ids(reference) != list(range(40))  # shuffled per epoch
    first = _loader()
    first.sampler.set_epoch(2)
    it = iter(first)
    seen = [next(it) for _ in range(3)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batches"] == 3

    resumed = _loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert _ids(seen + rest) == _ids(reference)
    assert resumed.state_dict()["batches"] == 10  # counts the skipped batches too
    resumed.sampler.set_epoch(3)
    assert len(list(resumed)) == 10  # the next epoch is whole again


def test_ranks_split_the_same_order_and_resume_across_a_different_world_size():
    order = _ids(_loader(bs=40))  # one process, one batch: the epoch's global order
    ranks = [_loader(bs=5, world=2, rank=r) for r in range(2)]
    for r, loader in enumerate(ranks):
        assert _ids(loader) == order[r::2]
    # 2 ranks x 2 batches of 5 consumed = the first 20 of the order; resume on 1 process
    single = _loader(bs=10)
    with pytest.warns(UserWarning, match="resuming with batch size x processes 10x1 .* instead of 5x2"):
        single.load_state_dict({"epoch": 0, "batches": 2, "batch_size": 5, "num_replicas": 2, "seed": 7})
    assert _ids(single) == order[20:]


def test_datamodule_train_loader_is_resumable_and_rank_aware():
    dm = ShapesDataModule(image_size=16, batch_size=4, train_size=16, val_size=4, test_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and loader.drop_last

    class FakeTrainer:
        world_size, global_rank = 4, 3

    ddp = resumable_train_loader(dm._loader("train", shuffle=True), FakeTrainer())
    assert (ddp.sampler.num_replicas, ddp.sampler.rank, len(ddp)) == (4, 3, 1)


# --- resume resolution -----------------------------------------------------------------------------


def _ckpt(path: Path, step: int, age_s: float = 0.0) -> str:
    """A minimal training checkpoint (the keys resolve_ckpt_path checks) at ``global_step`` ``step``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.ones(2)}, "optimizer_states": [], "loops": {}, "global_step": step,
                "epoch": 0}, path)
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return str(path)


def test_resume_and_ckpt_path_last_resolve_to_the_run_dirs_last_ckpt(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    for kwargs, key in (({"ckpt_path": None, "resume": True}, "resume=true"),
                        ({"ckpt_path": "last", "resume": False}, "ckpt_path=last")):
        with pytest.raises(ConfigError) as info:
            resolve_ckpt_path(run_dir=str(tmp_path), env={}, **kwargs)
        assert str(info.value).startswith(f"{key}: no checkpoint at {last}")
    _ckpt(last, 4)
    assert resolve_ckpt_path(None, True, str(tmp_path), env={}) == str(last)
    assert resolve_ckpt_path("last", False, str(tmp_path), env={}) == str(last)
    assert resolve_ckpt_path(None, False, str(tmp_path), env={}) is None
    with pytest.raises(ConfigError, match="ckpt_path=/nope.ckpt: no such checkpoint file"):
        resolve_ckpt_path("/nope.ckpt", False, str(tmp_path), env={})
    last.write_bytes(b"truncated")
    with pytest.raises(ConfigError, match=f"resume=true: no loadable checkpoint in .*{last}.* cannot be read"):
        resolve_ckpt_path(None, True, str(tmp_path), env={})


def test_requeued_slurm_job_resumes_from_the_newest_checkpoint(tmp_path):
    last = _ckpt(tmp_path / "checkpoints" / "last.ckpt", 8, age_s=60)
    hpc = _ckpt(tmp_path / "hpc_ckpt_2.ckpt", 10)
    assert resolve_ckpt_path(None, False, str(tmp_path), env={"SLURM_RESTART_COUNT": "1"}) == hpc
    assert resolve_ckpt_path(None, False, str(tmp_path), env={"SLURM_RESTART_COUNT": "0"}) is None
    assert resolve_ckpt_path(None, False, str(tmp_path / "empty"), env={"SLURM_RESTART_COUNT": "2"}) is None
    _ckpt(Path(last), 12)  # last.ckpt now the furthest along
    assert resolve_ckpt_path(None, False, str(tmp_path), env={"SLURM_RESTART_COUNT": "1"}) == last


def test_requeued_job_started_from_a_ckpt_path_continues_from_its_own_progress(tmp_path):
    """A job started with ckpt_path=<file> and requeued: the run's newer checkpoints win over that file."""
    initial = _ckpt(tmp_path / "pretrained" / "start.ckpt", 100, age_s=3600)
    run_dir = tmp_path / "run"
    requeued = {"SLURM_RESTART_COUNT": "1"}
    assert resolve_ckpt_path(initial, False, str(run_dir), env=requeued) == initial  # requeued before any save
    last = _ckpt(run_dir / "checkpoints" / "last.ckpt", 140, age_s=600)
    assert resolve_ckpt_path(initial, False, str(run_dir), env=requeued) == last
    hpc = _ckpt(run_dir / "hpc_ckpt_1.ckpt", 150)
    assert resolve_ckpt_path(initial, False, str(run_dir), env=requeued) == hpc
    assert resolve_ckpt_path(initial, False, str(run_dir), env={}) == initial  # not requeued: the file asked for


def test_resume_takes_an_hpc_checkpoint_newer_than_last_and_skips_a_corrupt_newest(tmp_path, caplog):
    _ckpt(tmp_path / "checkpoints" / "last.ckpt", 8, age_s=120)  # older than the hpc checkpoint
    hpc = _ckpt(tmp_path / "hpc_ckpt_1.ckpt", 10, age_s=60)
    assert resolve_ckpt_path(None, True, str(tmp_path), env={}) == hpc
    corrupt = tmp_path / "hpc_ckpt_2.ckpt"
    corrupt.write_bytes(Path(hpc).read_bytes()[:200])  # the newest file, cut short by a kill
    with caplog.at_level("WARNING", logger="vision_attn.fault"):
        assert resolve_ckpt_path(None, True, str(tmp_path), env={}) == hpc
    assert f"skipping {corrupt}: checkpoint {corrupt} cannot be read" in caplog.text
    weights_only_file = tmp_path / "hpc_ckpt_3.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 20}, weights_only_file)
    assert resolve_ckpt_path(None, True, str(tmp_path), env={}) == hpc
    assert "is not a training checkpoint (no optimizer_states, loops, epoch)" in caplog.text


class Evil:
    """Stands for a pickled object that could run code when loaded."""


def test_remote_ckpt_path_and_pickled_checkpoints_are_refused_naming_the_file(tmp_path):
    for url in ("https://example.com/model.ckpt", "s3://bucket/model.ckpt"):
        with pytest.raises(ConfigError, match=f"ckpt_path={url}: remote checkpoints are not loaded .* download it"):
            resolve_ckpt_path(url, False, str(tmp_path), env={})
        with pytest.raises(ConfigError, match="remote checkpoints are not loaded"):
            AtomicCheckpointIO().load_checkpoint(url)
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "optimizer_states": [], "loops": {}, "global_step": 1, "epoch": 0, "x": Evil()}, path)
    with pytest.raises(ConfigError,
                       match=f"ckpt_path={path}: checkpoint {path} cannot be loaded with weights_only=True"):
        resolve_ckpt_path(str(path), False, str(tmp_path), env={})
    with pytest.raises(ConfigError, match=f"checkpoint {path} cannot be loaded with weights_only=True"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # asked for False: still True


def test_slurm_preset_gives_requeueing_to_lightning_alone():
    """submitit: no requeue of its own (max_num_timeout 0) and its SIGUSR2 is never sent; SLURM
    signals USR1, which Lightning's SLURMEnvironment(auto_requeue=True) handles."""
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from submitit.slurm.slurm import _make_sbatch_string

    cfg = cfg_with("launcher=slurm", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher.max_num_timeout == 0
    sbatch = _make_sbatch_string(command="python x.py", folder="/tmp/sub", signal_delay_s=launcher.signal_delay_s,
                                 additional_parameters=dict(launcher.additional_parameters))
    assert "#SBATCH --signal=USR1@120" in sbatch and "USR2" not in sbatch
    env = SLURMEnvironment()
    assert env.auto_requeue and env.requeue_signal == signal.SIGUSR1


# --- end to end: SIGTERM, NaN, multirun + ddp ------------------------------------------------------


def _popen_train(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_saves_last_ckpt_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    proc = _popen_train([*TINY, "logger=none", "trainer.limit_train_batches=null", "data.train_size=1600",
                         "callbacks.progress.every_n_steps=1", f"hydra.run.dir={run_dir}"], tmp_path)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"epoch 0 batch 2/", line):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(120), "".join(lines)[-3000:]
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    reader.join(10)
    out = "".join(lines)
    assert proc.returncode == 143, out[-3000:]
    assert "Traceback" not in out
    match = re.search(r"SIGTERM: saved (\S+) at step (\d+)", out)
    assert match and match.group(1) == str(run_dir / "checkpoints" / "last.ckpt"), out[-3000:]
    ckpt = torch.load(match.group(1), weights_only=True)
    assert 2 <= ckpt["global_step"] == int(match.group(2)) < 100
    assert f"resume with: python train.py hydra.run.dir={run_dir} resume=true" in out


@pytest.mark.parametrize("knob,what", [("loss", "training loss (nan)"),
                                       ("grad", "gradient norm (inf)")], ids=["loss", "gradient"])
def test_nan_loss_or_gradient_stops_naming_the_step_and_checkpoints_stay_finite(train_runner, tmp_path, knob, what):
    """A NaN loss, or a finite loss with an Inf gradient (a bf16 overflow), at step 5: exit 3 before
    AdamW writes NaN weights; last.ckpt stays the step-4 one. Checkpoint saves set weights_only."""
    run_dir = tmp_path / "run"
    proc = train_runner(*TINY, "logger=none", "trainer.max_epochs=2", "checkpoint_every_n_steps=2",
                        "+callbacks.poison._target_=tests.poison.PoisonAt", "+callbacks.poison.step=5",
                        f"+callbacks.poison.what={knob}", f"hydra.run.dir={run_dir}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert f"training diverged: non-finite {what} at step 5 (epoch 1, batch 1)" in out
    assert "Traceback" not in out
    assert "`weights_only` was not set" not in out  # every save passes weights_only
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_non_finite_weights_are_never_saved_and_the_previous_file_stays(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.ones(3)}}, path)
    with pytest.raises(TrainingDiverged, match=f"non-finite weights at step 6: not saving {path}"):
        io.save_checkpoint({"global_step": 6, "state_dict": {"w": torch.tensor([1.0, float("nan"), 0.0])}}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 4

    class Stopped:  # what FaultTolerance.on_exception reads on SIGTERM
        state = type("S", (), {"fn": "fit"})()
        sanity_checking, global_step = False, 6

    module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        module.weight.fill_(float("inf"))
    ft = FaultTolerance(str(tmp_path))
    ft.on_exception(Stopped(), module, SIGTERMException())  # refuses before building a checkpoint
    assert ft.sigterm_checkpoint is None and torch.load(path, weights_only=True)["global_step"] == 4


def test_sigterm_during_the_test_phase_exits_143_without_results(train_runner, tmp_path):
    """Lightning's SIGTERMException is a SystemExit without a code (status 0): after fit it must be 143 too."""
    run_dir = tmp_path / "run"
    proc = train_runner(*TINY, "logger=none", f"hydra.run.dir={run_dir}",
                        "+callbacks.term._target_=fault_helpers.SigtermAt", "+callbacks.term.stage=test",
                        env={"PYTHONPATH": str(ROOT / "tests")})
    out = proc.stdout + proc.stderr
    assert "sending SIGTERM at test batch 0" in out, out[-3000:]
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM during test: stopped, exit 143 (no results.json)" in out
    assert "Traceback" not in out and "final metrics:" not in out
    assert not (run_dir / "results.json").exists()


def test_multirun_with_a_relaunching_ddp_strategy_is_refused_in_one_line(train_runner, tmp_path):
    no_preset = [a for a in TINY if a != "trainer=debug"]
    proc = train_runner("-m", *no_preset, "logger=none", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                        "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert ("config error: trainer.strategy=ddp starts 2 processes by re-running train.py, "
            "which Hydra multirun (-m) cannot do") in out
    assert "Traceback" not in out and "epoch 0" not in out


# --- kill -9 mid-epoch, resume, compare with an uninterrupted run ---------------------------------

RESUME_ARGS = [*TINY, "data.train_size=128", "trainer.max_epochs=2", "trainer.limit_train_batches=8",
               "trainer.deterministic=true", "checkpoint_every_n_steps=4", "seed=3"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    """8 steps an epoch, 2 epochs; last.ckpt every 4 steps; SIGKILL at step 14 (epoch 1, batch 5),
    two steps after the step-12 checkpoint; resume=true. Bit-identical to an uninterrupted run:
    same data order (stateful sampler), RNG streams (drop path), optimizer, LR schedule."""
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = run_train([*RESUME_ARGS, "logger=none", f"hydra.run.dir={full_dir}"], tmp_path)
    assert full.returncode == 0, (full.stdout + full.stderr)[-3000:]

    killed = run_train([*RESUME_ARGS, "logger=wandb", f"hydra.run.dir={cut_dir}",
                        "+callbacks.killer._target_=fault_helpers.KillAtStep", "+callbacks.killer.step=14"], tmp_path,
                       env={"PYTHONPATH": str(ROOT / "tests")})
    assert killed.returncode == -signal.SIGKILL, (killed.stdout + killed.stderr)[-3000:]
    assert torch.load(cut_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    run_id = (cut_dir / "wandb_run_id").read_text().strip()

    resumed = run_train([*RESUME_ARGS, "logger=wandb", f"hydra.run.dir={cut_dir}", "resume=true"], tmp_path)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert f"resuming from {cut_dir / 'checkpoints' / 'last.ckpt'} (W&B run {run_id})" in out
    assert "not resumable" not in out

    a = torch.load(full_dir / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(cut_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 16 and a["epoch"] == b["epoch"]
    diff = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"])
    ma, mb = final_metrics(full.stdout + full.stderr), final_metrics(out)
    print(f"max |weight diff| {diff:.3g}; " + ", ".join(f"{k}: {ma[k]:.6f} vs {mb[k]:.6f}"
                                                       for k in ("val/loss", "val/acc1", "test/loss", "test/acc1")))
    assert diff == 0.0
    for key in ("val/loss", "val/acc1", "val/acc5", "test/loss", "test/acc1"):
        assert mb[key] == pytest.approx(ma[key], abs=1e-6), key
    # Same W&B run: the resumed process logged to the run id the killed one created.
    runs = sorted(glob.glob(str(cut_dir / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs)
    assert (cut_dir / "wandb_run_id").read_text().strip() == run_id
