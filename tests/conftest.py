"""Shared fixtures: run dirs, a clean environment for subprocess runs of train.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def train_env(tmp_path: Path, env: dict | None = None) -> dict[str, str]:
    """The environment for a train.py subprocess: no W&B settings or key, its dirs under ``tmp_path``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    clean.update({"HOME": str(tmp_path / "home"), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache")})
    clean.update({"WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_DATA_DIR": str(tmp_path / "wandb_data")})
    clean.update(env or {})
    return clean


def run_train(args: list[str], tmp_path: Path, env: dict | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python train.py <args>`` in a subprocess with W&B forced offline-capable and no key."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=train_env(tmp_path, env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_train(args: list[str], tmp_path: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``python train.py <args>`` (as :func:`run_train`) without waiting; stdout and stderr go to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                                env=train_env(tmp_path, env), stdout=out, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def train_runner(tmp_path):
    def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return run_train(list(args), tmp_path, env)

    return run


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on a shared 2-core box: one intra-op thread avoids OpenMP stalls."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["fused", "tiled"])
def na_route(request):
    """Run a neighborhood / dilated test through both CPU training routes: the fused C++ kernel and
    the pure-PyTorch tiled kernel (forced through ``backends.force``)."""
    from vision_attn.attention import backends

    with backends.force(request.param):
        yield request.param


@pytest.fixture
def tiled_route():
    """Pin the pure-PyTorch tiled kernel (tests of its tiles, chunks and dropout)."""
    from vision_attn.attention import backends

    with backends.force("tiled"):
        yield
