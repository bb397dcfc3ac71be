"""Config composition and bad-config errors (named keys, before training starts)."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import ROOT
from vision_attn.callbacks import PlainProgressBar, progress_bar
from vision_attn.errors import ConfigError, config_error_in
from vision_attn.variants import VARIANTS


def cfg_with(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_defaults_compose_to_swin_on_shapes_with_wandb():
    cfg = cfg_with()
    assert cfg.model.variant == "swin" and cfg.model.size == "pico"
    assert cfg.data._target_.endswith("ShapesDataModule")
    assert list(cfg.logger) == ["wandb"]
    module = instantiate(cfg.module)
    assert module.model.num_classes == cfg.data.num_classes == 8
    assert type(module.model.layers[0].blocks[1].attn).__name__ == "ShiftedWindowAttention"
    assert isinstance(module.hparams["model"], dict)  # plain containers in checkpoints


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

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        optuna = compose("config", overrides=["hparams_search=optuna"], return_hydra_config=True)
        slurm = compose("config", overrides=["launcher=slurm"], return_hydra_config=True)
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
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=attention_ablation"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    variants = params.model.split(",")
    assert set(variants) == set(VARIANTS) and params.seed == "0,1,2"
    assert set(params.data.split(",")) == {"shapes", "photos"}
    counts = {}
    for variant in variants:
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            c = compose("config", overrides=["experiment=attention_ablation", f"model={variant}"])
        counts[variant] = sum(p.numel() for p in instantiate(c.module).model.parameters())
    assert max(counts.values()) <= 1.1 * min(counts.values()), counts
