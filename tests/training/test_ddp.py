"""DDP on CPU (gloo): two processes match one process on the same data; one W&B run, from rank 0."""
from __future__ import annotations

import glob

import pytest
import torch
from conftest import run_train
from helpers import final_metrics

# 64 training images, 2 epochs. One process: batches of 16. Two processes: 8 each, and rank r
# takes positions r, r+2, ... of the same seeded order, so every step averages gradients over
# the same 16 images. No drop path (per-rank RNG streams would differ from one process's).
# Validation/test: 32 images = 2 ranks x 2 batches x 8, no DistributedSampler padding.
COMMON = [
    "data.image_size=32", "data.train_size=64", "data.val_size=32", "data.test_size=32",
    "model.embed_dim=16", "model.drop_path_rate=0.0", "trainer.max_epochs=2", "trainer.deterministic=true",
    "trainer.log_every_n_steps=1", "callbacks.throughput.log_every_n_steps=1", "seed=1",
]


@pytest.mark.slow
def test_two_cpu_processes_match_one_process_and_log_one_wandb_run(tmp_path):
    ddp_dir, one_dir = tmp_path / "ddp", tmp_path / "one"
    ddp = run_train([*COMMON, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=8",
                     "logger=wandb", f"hydra.run.dir={ddp_dir}"], tmp_path, timeout=600)
    out = ddp.stdout + ddp.stderr
    assert ddp.returncode == 0, out[-4000:]
    assert ("distributed_backend=gloo" in out
            and "All distributed processes registered. Starting with 2 processes" in out)
    one = run_train([*COMMON, "trainer.accelerator=cpu", "trainer.devices=1", "data.batch_size=16", "logger=none",
                     f"hydra.run.dir={one_dir}"], tmp_path)
    assert one.returncode == 0, (one.stdout + one.stderr)[-4000:]

    m2, m1 = final_metrics(out), final_metrics(one.stdout + one.stderr)
    a = torch.load(one_dir / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(ddp_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    diff = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"])
    print(f"max |weight diff| {diff:.3g}; " + ", ".join(f"{k}: 1-proc {m1[k]:.6f} vs 2-proc {m2[k]:.6f}"
                                                       for k in ("val/loss", "val/acc1", "test/loss", "test/acc1")))
    assert diff < 1e-4
    for key in ("val/loss", "test/loss"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-4), key
    for key in ("val/acc1", "val/acc5", "test/acc1"):
        assert m2[key] == pytest.approx(m1[key], abs=1 / 32 + 1e-6), key  # at most one image flips

    runs = glob.glob(str(ddp_dir / "wandb" / "offline-run-*"))
    assert len(runs) == 1, runs  # rank 1 never starts a W&B run
    assert (ddp_dir / "results.json").exists()


def _rng_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of two gloo processes: save every rank's RNG states through FaultTolerance, scramble
    them, restore from the saved checkpoint state, and record what each rank draws next."""
    import os
    import random
    import types

    import numpy as np
    import torch.distributed as dist

    from vision_attn.fault import FaultTolerance

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # each rank its own stream (dropout / drop path differ per rank)
        np.random.seed(100 + rank)
        random.seed(100 + rank)
        torch.rand(3)  # somewhere into the stream
        state = FaultTolerance(out).state_dict()  # all ranks together, as in trainer.save_checkpoint
        if rank == 0:
            torch.save(state, os.path.join(out, "state.pt"))
        expected = (torch.rand(5), float(np.random.rand()), random.random())
        dist.barrier()
        torch.manual_seed(999), np.random.seed(999), random.seed(999)  # a fresh process's streams
        loaded = torch.load(os.path.join(out, "state.pt"), weights_only=True)
        ft = FaultTolerance(out)
        ft.load_state_dict(loaded)
        fit_loop = types.SimpleNamespace(_combined_loader_states_to_load=None, restarting=False)
        ft.on_train_start(types.SimpleNamespace(global_rank=rank, global_step=0, fit_loop=fit_loop), None)
        got = (torch.rand(5), float(np.random.rand()), random.random())
        torch.save({"expected": expected, "got": got}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_each_ddp_rank_resumes_its_own_rng_streams(tmp_path):
    """Two gloo processes with different RNG streams: the checkpoint holds both ranks' states and
    each rank continues its own stream (rank 1 used to be given rank 0's)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rng_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert sorted(state["rng"]) == [0, 1] and state["world_size"] == 2
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for r in (r0, r1):
        assert torch.equal(r["got"][0], r["expected"][0]) and r["got"][1:] == r["expected"][1:]
    assert not torch.equal(r1["got"][0], r0["expected"][0])  # rank 1 is not on rank 0's stream
