"""Config composition and bad-config errors (named keys, before training starts)."""
from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
import textwrap

import lightning as L
import numpy as np
import pytest
from conftest import ROOT
from helpers import cfg_with, objects, stage_px
from hydra.utils import instantiate
from omegaconf import OmegaConf

from data.fakes import make_imagefolder
from vision_attn.callbacks import PlainProgressBar, progress_bar
from vision_attn.errors import ConfigError, config_error_in
from vision_attn.variants import VARIANTS


def test_defaults_compose_to_swin_on_shapes_with_wandb():
    cfg = cfg_with()
    assert cfg.model.variant == "swin" and cfg.model.size == "pico"
    assert cfg.data._target_.endswith("ShapesDataModule")
    assert list(cfg.logger) == ["wandb"]
    module = instantiate(cfg.module)
    assert module.model.num_classes == cfg.data.num_classes == 8
    assert type(module.model.layers[0].blocks[1].attn).__name__ == "ShiftedWindowAttention"
    assert isinstance(module.hparams["model"], dict)  # plain containers in checkpoints


def test_shapes_match_and_tiles_compose_into_a_four_class_tiled_memory_model():
    cfg = cfg_with("data=shapes_match", "data.image_size=128", "model=swin_local", "model.tile_size=64",
                   "model.memory_tokens=4")
    dm = instantiate(cfg.data)
    assert dm.task == "match" and dm.num_classes == cfg.data.num_classes == 4
    module = instantiate(cfg.module)
    assert module.model.num_classes == 4 and module.model.tile_size == 64
    assert module.model.layers[3].memory_tokens.shape == (1, 4, 256)
    with pytest.raises(Exception, match=r"data.num_classes=8: .* exactly 4 classes; set data.num_classes=4 or "
                                          r"null \(data=shapes_match sets both\)"):
        instantiate(cfg_with("data.task=match").data)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_has_a_config(variant):
    cfg = cfg_with(f"model={variant}")
    assert cfg.model.variant == variant


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.num_heads=[1,3,4,8]", "model.num_heads"),
        ("model.window_size=0", "model.window_size"),
        ("model.embed_dim=-8", "model.embed_dim"),
        ("model.depths=[1,1,2]", "model.depths"),
        ("model.size=huge", "model.size"),
        ("model.drop_path_rate=1.5", "model.drop_path_rate"),
        ("data.batch_size=0", "data.batch_size"),
        ("model.window_size=[4,4]", "model.window_size"),
        ("model.kernel_size=[5,5,5]", "model.kernel_size"),
        ("model.dilations=[[1,2]]", "model.dilations"),
        ("model.dilations=[[1,0],[1],[1],[1]]", "model.dilations"),
        ("model.stem=foo", "model.stem"),
        ("model.downsample=foo", "model.downsample"),
        ("model.mlp_ratio=0", "model.mlp_ratio"),
        ("model.attn_backend=fastest", "model.attn_backend"),
        ("model.attn_backend=flex", "model.attn_backend"),  # swin has no neighborhood attention
    ],
)
def test_invalid_values_raise_config_error_naming_the_key(override, key):
    cfg = cfg_with(override)
    with pytest.raises(Exception) as info:
        instantiate(cfg.data)
        instantiate(cfg.module)
    error = config_error_in(info.value)
    assert isinstance(error, ConfigError) and key in str(error)


def test_bad_value_fails_cleanly_before_training(train_runner):
    proc = train_runner("model.num_heads=[1,3,4,8]", "logger=none", "hydra.run.dir=${oc.env:TMPDIR,/tmp}/va-bad")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "config error: model.num_heads[1]=3 does not divide" in out
    assert "Traceback" not in out and "Epoch" not in out and "epoch 0" not in out


def test_unknown_model_name_lists_the_choices(train_runner):
    proc = train_runner("model=nope")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Could not find 'model/nope'" in out and "swin_local" in out


def test_progress_bar_is_rich_on_terminals_and_plain_in_logs(monkeypatch):
    import sys

    from lightning.pytorch.callbacks import RichProgressBar

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert isinstance(progress_bar(), RichProgressBar)
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    assert isinstance(progress_bar(), PlainProgressBar)
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert isinstance(progress_bar(), PlainProgressBar)


def test_resolved_config_is_plain_yaml():
    cfg = cfg_with("model=swin_local", "seed=3")
    assert OmegaConf.to_container(cfg.module, resolve=True)["model"]["variant"] == "swin_local"
    assert cfg.run_name == "swin_local-pico-seed3"


def test_optuna_and_slurm_presets_compose_to_their_plugins():
    from hydra.utils import get_class

    optuna = cfg_with("hparams_search=optuna", hydra=True)
    slurm = cfg_with("launcher=slurm", hydra=True)
    sweeper = optuna.hydra.sweeper
    assert get_class(sweeper._target_).__name__ == "OptunaSweeper" and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"optim.lr", "optim.weight_decay", "model.drop_path_rate"}
    launcher = slurm.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    # Lightning owns requeueing (SIGUSR1 -> hpc checkpoint + scontrol requeue); submitit's is off.
    assert launcher.max_num_timeout == 0 and launcher.tasks_per_node == launcher.gpus_per_node
    assert launcher.additional_parameters.signal == f"USR1@{launcher.signal_delay_s}"
    assert slurm.trainer.accelerator == "gpu"


def test_attention_ablation_sweeps_every_variant_at_comparable_size():
    cfg = cfg_with("experiment=attention_ablation", hydra=True)
    params = cfg.hydra.sweeper.params
    variants = params.model.split(",")
    assert set(variants) == set(VARIANTS) and params.seed == "0,1,2"
    assert set(params.data.split(",")) == {"shapes", "photos"}
    counts = {}
    for variant in variants:
        c = cfg_with("experiment=attention_ablation", f"model={variant}")
        counts[variant] = sum(p.numel() for p in instantiate(c.module).model.parameters())
    assert max(counts.values()) <= 1.1 * min(counts.values()), counts


def test_high_resolution_ablation_needs_reach_beyond_the_first_two_stages():
    """experiment=attention_ablation_hires: the issue's seven variants, 3 seeds, >= 192 px, on a task whose
    two objects lie farther apart than every local kind's stage-1 and stage-2 reach."""
    from data.shapes import render

    cfg = cfg_with("experiment=attention_ablation_hires", hydra=True)
    params = cfg.hydra.sweeper.params
    assert set(params.model.split(",")) == {"swin", "swin_window", "swin_local", "swin_dilated", "maxvit_like",
                                            "swin_global_tokens", "swin_global"}
    assert params.seed == "0,1,2" and list(params)[0] == "seed"  # seeds slowest: a cut-short sweep stays paired
    size = cfg.data.image_size
    assert size >= 192 and cfg.data.task == "side" and cfg.data.num_classes == 2 and cfg.model.size == "pico"
    gap = min(math.hypot(*(np.subtract(*objects(render(0, "val", i, size, task="side")[0]))))
              for i in range(20))
    for variant in params.model.split(","):
        c = cfg_with("experiment=attention_ablation_hires", f"model={variant}")
        reach = instantiate(c.module).model.stage_reach(size)
        assert reach[0].startswith(f"{size // 4}x{size // 4} tokens"), reach
        if variant in ("swin", "swin_window", "swin_local", "swin_dilated"):
            for stage in reach[:2]:
                assert stage_px(stage) < gap, (variant, stage, gap)
        if variant == "swin_global":
            assert all("global" in stage for stage in reach), reach


# A notebook or another project's test: plain Hydra, nothing of ours imported before compose.
FRESH_COMPOSE = textwrap.dedent("""
    import json, sys
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict

    conf, root, run_dir = sys.argv[1:]
    with initialize_config_dir(conf, version_base="1.3"):
        cfg = compose("config", overrides=["data=imagefolder", f"data.root={root}", "data.num_workers=0"])
    ours_before = sorted(m for m in ("data", "vision_attn") if m in sys.modules)
    partial = {k: OmegaConf.to_yaml(cfg[k], resolve=True) for k in ("data", "module", "model", "optim")}
    dm = instantiate(cfg.data)
    counted_before_setup = dm.num_classes
    dm.setup("fit")

    # The whole config resolved: its run-dir keys use ${hydra:...}, which needs Hydra's state
    # (what `python train.py --cfg job --resolve` does): compose it with the Hydra node once.
    with initialize_config_dir(conf, version_base="1.3"):
        full = compose("config", overrides=["data=imagefolder", f"data.root={root}",
                                            f"hydra.runtime.output_dir={run_dir}"], return_hydra_config=True)
    HydraConfig.instance().set_config(full)
    with open_dict(full):
        del full["hydra"]
    resolved = OmegaConf.to_yaml(full, resolve=True)
    print(json.dumps({"ours_before": ours_before, "counted_before_setup": counted_before_setup,
                      "num_classes": dm.num_classes, "classes": dm.classes, "partial": partial,
                      "resolved": OmegaConf.to_container(OmegaConf.create(resolved))}))
""")


def test_plain_hydra_compose_instantiates_an_image_folder_in_a_fresh_process(tmp_path):
    root = make_imagefolder(tmp_path / "photos", classes=("apple", "bird", "cat", "dog"))
    folders = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    elsewhere = tmp_path / "notebook"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # only the repo on sys.path, cwd outside it
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_COMPOSE, str(ROOT / "conf"), str(root), str(tmp_path / "run")],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ours_before"] == []  # nothing of ours was needed to compose
    assert out["counted_before_setup"] is None  # data.num_classes: null, counted by setup()
    assert out["num_classes"] == len(folders) == 4 and out["classes"] == folders
    assert "num_classes: null" in out["partial"]["data"] and "num_classes: null" in out["partial"]["module"]
    resolved = out["resolved"]
    assert resolved["data"]["root"] == str(root) and resolved["data"]["augment"]["label_smoothing"] == 0.1
    assert resolved["trainer"]["default_root_dir"] == str(tmp_path / "run")
    assert resolved["callbacks"]["checkpoint"]["dirpath"] == str(tmp_path / "run" / "checkpoints")


def test_no_custom_resolvers_are_left_in_the_configs():
    """Only OmegaConf's and Hydra's own resolvers: a plain compose must resolve every config."""
    import re

    names = set()
    for path in (ROOT / "conf").rglob("*.yaml"):
        names |= set(re.findall(r"\$\{([\w.]+):", path.read_text()))
    assert names <= {"hydra", "now", "oc.env", "oc.select", "oc.decode", "oc.create", "oc.dict.keys",
                     "oc.dict.values"}, names


TRAINER_OVERRIDES = {
    "max_steps": 5, "limit_train_batches": 2, "limit_val_batches": 1, "limit_test_batches": 0.5,
    "val_check_interval": 3, "check_val_every_n_epoch": 2, "accumulate_grad_batches": 4, "min_epochs": 1,
    "max_time": "00:00:10:00", "num_nodes": 1, "strategy": "auto", "sync_batchnorm": False,
}


@pytest.mark.parametrize("preset", ["default", "debug", "gpu", "ddp"])
def test_common_trainer_arguments_override_without_plus(preset, tmp_path):
    overrides = [f"trainer={preset}", f"trainer.default_root_dir={tmp_path}"]
    cfg = cfg_with(*overrides, *(f"trainer.{k}={v}" for k, v in TRAINER_OVERRIDES.items()))
    for key, value in TRAINER_OVERRIDES.items():
        assert cfg.trainer[key] == value, key
    if preset in ("default", "debug"):  # the others need GPUs or start processes
        trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False)
        assert trainer.max_steps == 5 and trainer.limit_train_batches == 2 and trainer.limit_val_batches == 1
        assert trainer.limit_test_batches == 0.5 and trainer.val_check_interval == 3
        assert trainer.check_val_every_n_epoch == 2 and trainer.accumulate_grad_batches == 4
        assert trainer.fit_loop.min_epochs == 1 and trainer.num_nodes == 1
        assert trainer.fit_loop.max_steps == 5


def test_trainer_keys_are_lightning_arguments_with_lightning_defaults():
    """Every key of conf/trainer/default.yaml is a Trainer argument; values are Lightning's
    defaults except the ones we chose on purpose (listed here)."""
    ours = {"precision": "32-true", "max_epochs": 3, "num_sanity_val_steps": 1, "deterministic": False,
            "log_every_n_steps": 20, "enable_model_summary": True}
    trainer = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "trainer" / "default.yaml"))
    params = inspect.signature(L.Trainer.__init__).parameters
    for key, value in trainer.items():
        if key in ("_target_", "default_root_dir"):
            continue
        assert key in params, f"trainer.{key} is not a Lightning Trainer argument"
        assert value == ours.get(key, params[key].default), f"trainer.{key}={value}"
    for key in ("max_steps", "limit_train_batches", "limit_val_batches", "limit_test_batches", "val_check_interval",
                "check_val_every_n_epoch", "accumulate_grad_batches", "min_epochs", "max_time", "fast_dev_run",
                "num_nodes", "strategy", "sync_batchnorm"):
        assert key in trainer, key
