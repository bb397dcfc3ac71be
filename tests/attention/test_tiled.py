"""The pure-PyTorch tiled kernel (vision_attn/attention/tiled.py) beyond what test_neighborhood.py covers:
the log-sum-exp gradient through the chunked (recomputing) backward."""
from __future__ import annotations

import pytest
import torch
from reference import random_bias, random_qkv

from vision_attn.attention.neighborhood import neighborhood_patterns

pytestmark = pytest.mark.usefixtures("one_thread")
qkv, bias = random_qkv, random_bias


def test_tiled_log_sum_exp_gradcheck_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked (recomputing) backward of the tiled kernel carries the log-sum-exp gradient too."""
    import vision_attn.attention.tiled as tiled

    monkeypatch.setattr(tiled, "STASH_SCORES", 64)
    monkeypatch.setattr(tiled, "CHUNK_SCORES", 32)
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, 5, 6, D=2, seed=12))
    grid = bias(1, 3).requires_grad_()
    py, px = neighborhood_patterns(5, 6, 3, 2)
    fn = lambda q, k, v, b: tiled.tiled_attention(q, k, v, py, px, b, return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, grid))
