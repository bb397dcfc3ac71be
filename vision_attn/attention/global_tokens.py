"""Global tokens (Longformer / BigBird-style global attention) for any local kind.

A stage owns ``G`` learned tokens. In every block of the stage:

* each map query attends to its local keys (the kind's pattern, bias included) **plus** the
  ``G`` global tokens, under ONE softmax. The local kernel returns its log-sum-exp, so the two
  parts merge exactly: ``out = e^(lse_l - lse) out_l + softmax-part of the global keys``,
  ``lse = logaddexp(lse_l, logsumexp(q . g_k))``;
* each global token attends to all ``H * W`` map tokens and to the ``G`` global tokens
  (``O(N * G)``); for spatial_reduction, to the reduced map's cells (what its queries see);
* global tokens go through the block's norms, attention, MLP and residuals like map tokens.

No relative position bias involves a global token (they have no position). Attention dropout
(``attn_drop_rate``) is applied only inside the tiled (neighborhood, dilated, grid), lsh and routed
kernels; the global-token terms, and the window / global / spatial_reduction log-sum-exp paths,
run without it. With ``G = 0`` none of this code runs: the blocks take their usual path.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LocalLSE = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def global_token_attention(
    local: LocalLSE,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gq: Tensor,
    gk: Tensor,
    gv: Tensor,
    scale: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Local attention merged with ``G`` global tokens.

    ``local(q, k, v) -> (out, lse)`` is a kind's kernel on ``(B, heads, H, W, D)`` with its
    per-query log-sum-exp ``(B, heads, H, W)``; ``gq, gk, gv`` are ``(B, heads, G, D)``. ``k, v``
    are the map keys the global tokens attend to: the same map, or a reduced one ``(B, heads, H', W', D)``.
    Returns the map output ``(B, heads, H, W, D)`` and the global tokens' ``(B, heads, G, D)``.
    """
    B, nh, H, W, D = q.shape
    scale = D**-0.5 if scale is None else scale
    out_l, lse_l = local(q, k, v)
    qf = q.reshape(B, nh, H * W, D)
    s_g = (qf @ gk.transpose(-1, -2)) * scale  # (B, heads, N, G)
    lse = torch.logaddexp(lse_l.reshape(B, nh, H * W), s_g.logsumexp(-1))
    out = torch.exp(lse_l.reshape(B, nh, H * W) - lse)[..., None] * out_l.reshape(B, nh, H * W, -1)
    out = out + torch.exp(s_g - lse[..., None]) @ gv
    keys = torch.cat([k.reshape(B, nh, -1, D), gk], 2)  # k, v may be a reduced map (spatial_reduction)
    values = torch.cat([v.reshape(B, nh, -1, v.shape[-1]), gv], 2)
    g_out = F.scaled_dot_product_attention(gq, keys, values, scale=scale)
    return out.view(B, nh, H, W, -1), g_out
