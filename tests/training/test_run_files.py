"""What a run leaves behind, under failure: W&B when logged in but offline, the job-wide
throughput under DDP, and results.json / the run-id file written atomically."""
from __future__ import annotations

import json
import logging
import socket
import types
from pathlib import Path

import pytest
import torch
from helpers import cfg_with
from hydra.core.hydra_config import HydraConfig

from vision_attn import callbacks, loggers
from vision_attn.files import atomic_write, atomic_write_json
from vision_attn.loggers import read_run_id, write_run_id


@pytest.fixture
def logged_in(monkeypatch, tmp_path):
    """A W&B API key, no WANDB_MODE: what a compute node with a shared ~/.netrc looks like."""
    for key in ("WANDB_MODE", "WANDB_BASE_URL", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))


def test_logged_in_without_a_route_to_wandb_logs_offline_and_says_why(logged_in, monkeypatch, caplog):
    asked = []

    def no_route(address, timeout=None):
        asked.append((address, timeout))
        raise OSError(113, "No route to host")

    monkeypatch.setattr(socket, "create_connection", no_route)
    with caplog.at_level(logging.WARNING):
        assert loggers.wandb_mode() == "offline"
    assert asked == [(("api.wandb.ai", 443), 5.0)]  # a 5 s probe, not wandb.init's 60 s wait
    assert "logged in, but api.wandb.ai:443 unreachable" in caplog.text and "wandb sync" in caplog.text
    monkeypatch.setattr(socket, "create_connection",
                        lambda address, timeout=None: types.SimpleNamespace(close=lambda: None))
    assert loggers.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert loggers.wandb_mode() == "disabled"  # the user's explicit choice is never probed or changed


def test_behind_a_proxy_there_is_no_direct_probe(logged_in, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.cluster:3128")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed past the proxy"))
    assert loggers.wandb_mode() == "online"  # a failed start still falls back (next test)


def test_failed_online_wandb_init_falls_back_to_an_offline_run_in_the_run_dir(logged_in, monkeypatch, tmp_path, caplog):
    import wandb

    real_init, modes = wandb.init, []

    def init(**kwargs):
        modes.append(kwargs.get("mode"))
        if kwargs.get("mode") == "online":
            raise wandb.errors.CommError("Run initialization has timed out after 60.0 sec.")
        return real_init(**kwargs)

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "init", init)
    logger = loggers.wandb_logger(save_dir=str(tmp_path / "run"), project="p", name="n")
    try:
        with caplog.at_level(logging.WARNING):
            run = logger.experiment
        assert modes == ["online", "offline"] and run.offline
        assert "online start failed (CommError" in caplog.text
        assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    finally:
        wandb.finish()


class _Strategy:
    root_device = torch.device("cpu")

    def reduce(self, value, reduce_op):
        assert reduce_op == "sum"
        return value * 2  # a second rank that saw as many images


def test_throughput_is_the_whole_jobs_rate_under_ddp(monkeypatch):
    clock = iter([100.0, 104.0])  # first batch starts at 100 s; the rate is read at 104 s
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    meter = callbacks.Throughput(log_every_n_steps=1)
    trainer = types.SimpleNamespace(world_size=2, strategy=_Strategy())
    logged = {}
    module = types.SimpleNamespace(log=lambda key, value, **kw: logged.__setitem__(key, value))
    meter.on_train_epoch_start(trainer, module)
    meter.on_train_batch_start(trainer, module, None, 0)
    meter._images = 40
    meter._log(trainer, module, on_step=False)
    assert logged == {"train/images_per_sec": 20.0, "train/images_per_sec_per_device": 10.0}  # 2 x 40 / 4 s


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(str(path), {"best_val_acc1": 0.5})
    with pytest.raises(TypeError):
        atomic_write_json(str(path), {"best_val_acc1": object()})  # fails while serialising

    def half_then_crash(f):
        f.write(b'{"best_val_')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), half_then_crash)
    assert json.loads(path.read_text()) == {"best_val_acc1": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left


def test_results_json_is_never_left_half_written(tmp_path, monkeypatch):
    from vision_attn import run as train

    cfg = cfg_with(f"hydra.runtime.output_dir={tmp_path}", hydra=True)
    HydraConfig.instance().set_config(cfg)
    trainer = types.SimpleNamespace(checkpoint_callback=None, current_epoch=3, world_size=1)
    module = types.SimpleNamespace(summary=None, hparams={"num_classes": 8})
    train.write_results(cfg, trainer, module, {"val/acc1": 0.75, "train/images_per_sec": 10.0}, 12.0)
    first = json.loads((tmp_path / "results.json").read_text())
    assert first["best_val_acc1"] == 0.75 and first["images_per_sec"] == 10.0 and first["devices"] == 1
    with pytest.raises(TypeError):  # a value JSON cannot hold: the old file must survive
        train.write_results(cfg, trainer, module, {"val/acc1": torch.tensor(0.9), "train/images_per_sec": 10.0}, 13.0)
    assert json.loads((tmp_path / "results.json").read_text()) == first


def test_run_id_file_is_replaced_atomically(tmp_path, monkeypatch):
    write_run_id(str(tmp_path), "abc123")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        write_run_id(str(tmp_path), "zzz999")
    assert (read_run_id(str(tmp_path)) == "abc123"
            and sorted(p.name for p in Path(tmp_path).iterdir()) == ["wandb_run_id"])
