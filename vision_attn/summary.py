"""Model summary: parameter count and GFLOPs at a given resolution."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelSummary:
    params: int
    gflops: float  # multiply-adds / 1e9 for one image, the convention of the Swin / NAT papers
    img_size: tuple[int, int]

    def __str__(self) -> str:
        h, w = self.img_size
        return f"{self.params / 1e6:.2f} M params, {self.gflops:.3f} GFLOPs at {h}x{w}"


def summarize(model: nn.Module, img_size: int | tuple[int, int], in_chans: int = 3) -> ModelSummary:
    """Count parameters and forward FLOPs for one image (torch's flop counter, eval mode)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, h, w, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    # The math SDPA backend decomposes into matmuls the counter sees on every device.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return ModelSummary(params, counter.get_total_flops() / 2e9, (h, w))
