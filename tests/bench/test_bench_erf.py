"""``python -m vision_attn.bench erf`` (vision_attn/bench/erf.py) on tiny models: its values on pico, a
Lightning checkpoint as input, the entry point, flag errors."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_values_on_pico(tmp_path):
    from vision_attn.bench import erf as bench

    args = ["--variants", "swin_window", "swin", "swin_global", "--sizes", "48", "--images", "2",
            "--out", str(tmp_path)]
    assert bench.main(args) == 0
    specs = [bench.ModelSpec(v, "pico") for v in ("swin_window", "swin", "swin_global")]
    rows = {(r.variant, r.stage): r for r in bench.run(specs, [48], 2, 1, 0, log=False)}
    win = rows[("swin_window", 1)]
    assert win.reach == "window 4 (16 px)" and win.grid == bench.StageMap(12, 12, 4)
    assert win.support == (16, 16, 32, 32) and win.support_px == "16x16"
    # The window is centred on the image: every square side is within the theoretical 16 px reach.
    assert 4 <= win.sides[0.2] <= win.sides[0.5] <= win.sides[0.99] <= 16
    assert rows[("swin", 1)].support == (16, 16, 48, 48)  # the shifted block widens it to 32 px
    assert rows[("swin", 1)].sides[0.99] > 16
    glob = rows[("swin_global", 1)]
    assert glob.support_px == "whole image" and glob.sides[0.99] > win.sides[0.99]
    text = (tmp_path / "erf.md").read_text()
    assert "avx512 flags:" in text and "| swin_window | init | 1 | 12x12 /4 | window 4 (16 px) | 16x16 |" in text
    assert (tmp_path / "erf_48.png").stat().st_size > 10_000


def lightning_checkpoint(path, scale: float) -> None:
    """A train.py-style checkpoint (Lightning's own writer) of swin_window pico, its stage-1
    attention output projections scaled by ``scale`` (so its ERF differs from the initialisation's)."""
    import lightning as L

    from vision_attn.module import ClassificationModule

    torch.manual_seed(1)
    module = ClassificationModule(model=dict(variant="swin_window", size="pico"), num_classes=3, img_size=48,
                                  optim=dict(opt="adamw", lr=1e-3, weight_decay=0.05))
    with torch.no_grad():
        for blk in module.model.layers[0].blocks:
            blk.attn.proj.weight.mul_(scale)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
                        devices=1)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)


def test_bench_from_a_lightning_checkpoint(tmp_path):
    from vision_attn.bench import erf as bench

    ckpt = tmp_path / "last.ckpt"
    lightning_checkpoint(ckpt, scale=50.0)
    init, trained = bench.checkpoint_specs(str(ckpt), None, "nano")  # variant and size come from the file
    assert (init.variant, init.size, init.num_classes, init.ckpt) == ("swin_window", "pico", 3, None)
    assert trained.weights == "ckpt last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    model = trained.build(48, seed=0)
    torch.testing.assert_close(model.layers[0].blocks[0].attn.proj.weight,
                               state["model.layers.0.blocks.0.attn.proj.weight"])
    rows = bench.run([init, trained], [48], 1, 1, 0, log=False)
    a, b = rows[0], rows[4]  # stage 1 of each
    assert (a.weights, b.weights) == ("init", "ckpt last.ckpt")
    assert a.support == b.support == (16, 16, 32, 32)  # the pattern is the architecture's
    assert b.sides[0.5] > a.sides[0.5]  # stronger attention spreads the mass over the window
    assert bench.main(["--ckpt", str(ckpt), "--sizes", "48", "--images", "1", "--out", str(tmp_path)]) == 0
    assert "| swin_window | ckpt last.ckpt | 1 |" in (tmp_path / "erf.md").read_text()


def test_bench_entry_point_lists_erf(capsys):
    from vision_attn.bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["erf", "--help"])
    assert "effective receptive field" in capsys.readouterr().out


def test_bench_flag_errors(tmp_path):
    from vision_attn.bench import erf as bench
    from vision_attn.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown variant"):
        bench.main(["--variants", "swin_nope"])
    with pytest.raises(ConfigError, match="no such file"):
        bench.main(["--ckpt", str(tmp_path / "missing.ckpt")])
    with pytest.raises(ConfigError, match="at least 32"):
        bench.main(["--sizes", "16"])
    with pytest.raises(ConfigError, match="--images"):
        bench.main(["--images", "0"])
    plain = tmp_path / "weights.pth"
    torch.save(bench.init_model("swin", "pico", 48, seed=0).state_dict(), plain)
    with pytest.raises(ConfigError, match="exactly one --variants"):
        bench.main(["--ckpt", str(plain)])
    ckpt = tmp_path / "last.ckpt"
    lightning_checkpoint(ckpt, scale=1.0)
    with pytest.raises(ConfigError, match="holds a 'swin_window' model"):
        bench.main(["--ckpt", str(ckpt), "--variants", "swin"])
    init, loaded = bench.checkpoint_specs(str(plain), ["swin"], "pico")  # a plain state dict: named variant
    assert loaded.build(48, seed=1).layers[0].blocks[0].attn.qkv.weight.equal(
        init.build(48, seed=0).layers[0].blocks[0].attn.qkv.weight)
