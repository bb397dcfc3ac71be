"""Speed knobs, once each on CPU: bf16-mixed, channels-last, gradient checkpointing, torch.compile
(the ``python -m vision_attn.bench knobs`` entry: tests/bench/test_bench_knobs.py)."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from data.datamodule import ShapesDataModule
from vision_attn.module import ClassificationModule

OPTIM = dict(opt="adamw", lr=1e-3, weight_decay=0.05)
TINY_MODEL = dict(variant="swin", size="pico", embed_dim=16, drop_path_rate=0.0)


def module(**knobs) -> ClassificationModule:
    torch.manual_seed(0)
    return ClassificationModule({**TINY_MODEL, **knobs}, num_classes=8, img_size=32, optim=OPTIM)


def grads(m: ClassificationModule, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m.zero_grad(set_to_none=True)
    logits = m(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_bf16_mixed_trains_in_bfloat16_with_fp32_weights(tmp_path):
    L.seed_everything(0)
    m = module()
    dtypes = []
    m.model.head.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    dm = ShapesDataModule(image_size=32, batch_size=8, train_size=32, val_size=8, test_size=8)
    trainer = L.Trainer(precision="bf16-mixed", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(m, datamodule=dm)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert dtypes[-3:] == [torch.bfloat16] * 3  # the 3 training steps (the first call: the fp32 model summary)
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_channels_last_gives_the_same_outputs_and_gradients_and_a_free_stem_permute():
    plain, cl = module(), module(channels_last=True)
    cl.load_state_dict(plain.state_dict())
    assert cl.model.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    cl.model.patch_embed.proj.register_forward_hook(lambda mod, inp, out: seen.append(
        (inp[0].is_contiguous(memory_format=torch.channels_last), out.permute(0, 2, 3, 1).is_contiguous())))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 8, (4,))
    (a, ga), (b, gb) = grads(plain, x, y), grads(cl, x, y)
    assert seen == [(True, True)]  # NHWC input, and the stem's NCHW -> NHWC permute is a view
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for name in ga:
        torch.testing.assert_close(gb[name].contiguous(), ga[name].contiguous(), atol=1e-5, rtol=1e-4, msg=name)
    assert "channels_last" not in dir(cl.model)  # a module knob, not a backbone argument


def test_grad_checkpointing_gives_the_same_gradients():
    plain, ckpt = module(), module(grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert all(layer.grad_checkpointing for layer in ckpt.model.layers)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 8, (4,))
    (a, ga), (b, gb) = grads(plain.train(), x, y), grads(ckpt.train(), x, y)
    torch.testing.assert_close(b, a)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], msg=name)


@pytest.mark.slow
def test_compile_matches_eager_and_keeps_checkpoint_keys():
    eager, compiled = module(), module(compile=True)
    compiled.load_state_dict(eager.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no "_orig_mod." prefixes
    assert "_compiled" not in dict(compiled.named_children())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 8, (4,))
    (a, ga), (b, gb) = grads(eager.train(), x, y), grads(compiled.train(), x, y)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-4, rtol=1e-3, msg=name)
