"""Model summary: parameter count and GFLOPs at a given resolution."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from .attention import backends

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_SDPA_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# torch's flop counter knows the CUDA fused SDPA kernels but not the CPU one, so every
# FlopCounterMode (ours, Lightning's summary table) would count CPU attention as free.
if _CPU_SDPA not in flop_registry:

    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)


if _CPU_SDPA_BACKWARD not in flop_registry:

    @register_flop_formula(_CPU_SDPA_BACKWARD)
    def _cpu_sdpa_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)


@dataclass(frozen=True)
class ModelSummary:
    params: int
    gflops: float  # multiply-adds / 1e9 for one image, the convention of the Swin / NAT papers
    img_size: tuple[int, int]
    reach: tuple[str, ...] = ()  # per stage: what one query sees (VisionAttnTransformer.stage_reach)
    routes: tuple[str, ...] = ()  # per stage: the kernel route of each kind in a training step (stage_routes)
    route_setting: str = ""  # what the routes are for, e.g. "training on cuda, torch.bfloat16, batch 64"

    def __str__(self) -> str:
        h, w = self.img_size
        stages = "".join(f"\n  stage {i + 1}: {r}" for i, r in enumerate(self.reach))
        if self.routes:
            stages += f"\n  kernel routes ({self.route_setting}):"
            stages += "".join(f"\n  stage {i + 1}: {r}" for i, r in enumerate(self.routes))
        return (f"{self.params / 1e6:.2f} M params, {self.gflops:.3f} GFLOPs at {h}x{w} "
                "(multiply-adds, the papers' convention; Lightning's table counts 2 FLOPs each)" + stages)


def zeros_image(in_chans: int, img_size: int | tuple[int, int], device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """A ``(1, C, H, W)`` zero image that takes no memory (one zero per channel, expanded with
    stride 0): tile streams then only materialise one tile of it."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return torch.zeros(1, in_chans, 1, 1, device=device, dtype=dtype).expand(1, in_chans, h, w)


def summarize(model: nn.Module, img_size: int | tuple[int, int], in_chans: int = 3, device: str = "cpu",
              dtype: torch.dtype = torch.float32, batch: int = 1) -> ModelSummary:
    """Count parameters and forward FLOPs for one image (torch's flop counter, eval mode), and the
    kernel route each stage takes in a training step on ``device`` in ``dtype`` at ``batch``."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    param = next(model.parameters())
    x = zeros_image(in_chans, (h, w), param.device, param.dtype)
    was_training = model.training
    model.eval()
    # Routed attention kernels count their exact work (k*k keys per query, the window), not what a
    # route computes (the tiled kernel's halos) or what the flop counter sees (nothing for custom ops).
    with torch.no_grad(), FlopCounterMode(display=False) as counter, backends.exact_work() as attention:
        model(x)
    model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    reach = tuple(model.stage_reach((h, w))) if hasattr(model, "stage_reach") else ()
    routes = tuple(model.stage_routes((h, w), device, dtype, batch)) if hasattr(model, "stage_routes") else ()
    setting = f"training on {device}, {str(dtype).removeprefix('torch.')}, batch {batch}"
    macs = counter.get_total_flops() / 2 + attention[0]
    return ModelSummary(params, macs / 1e9, (h, w), reach, routes, setting)
