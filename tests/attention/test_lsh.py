"""LSH attention (vision_attn/attention/lsh.py) against masked full attention: a query sees its sorted
chunk and the previous one only; the module and gradients."""
from __future__ import annotations

import pytest
import torch
from helpers import attention_module as module
from reference import lsh_pairs_reference, lsh_reference, random_bias, random_qkv

from vision_attn.attention import lsh_attention
from vision_attn.attention.lsh import lsh_rotations
from vision_attn.attention.rel_pos import bias_grid

TOL = dict(rtol=1e-10, atol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")
qkv, bias = random_qkv, random_bias


@pytest.mark.parametrize("H,W,chunk,hashes,buckets", [(5, 7, 8, 1, 6), (6, 6, 6, 2, 4), (3, 5, 16, 1, 2),
                                                      (4, 6, 12, 3, 8), (5, 5, 5, 2, 10)])
def test_lsh_equals_masked_full_attention(H: int, W: int, chunk: int, hashes: int, buckets: int) -> None:
    q, k, v = qkv(2, 2, H, W, seed=chunk + hashes)
    rot = lsh_rotations(hashes, 2, 4, buckets, seed=3, dtype=torch.float64)
    grid = bias(2, 3)
    expect = lsh_reference(q, k, v, rot, chunk, grid)
    torch.testing.assert_close(lsh_attention(q, k, v, rot, chunk, grid), expect, **TOL)
    torch.testing.assert_close(lsh_attention(q, q, v, rot, chunk), lsh_reference(q, q, v, rot, chunk), **TOL)


def test_lsh_sees_chunk_and_previous_chunk_only() -> None:
    """Each query sees at most 2 * chunk keys per round: the score matrix is never N x N."""
    q, k, _ = qkv(1, 1, 8, 8, seed=2)
    rot = lsh_rotations(1, 1, 4, 8, seed=0, dtype=torch.float64)
    counts = lsh_pairs_reference(k.reshape(1, 1, 64, 4), rot, 8)
    assert int((counts > 0).sum(-1).max()) == 16


def test_lsh_module_equals_reference_and_gradcheck() -> None:
    m = module("lsh", lsh_chunk=6, lsh_hashes=2)
    x = torch.randn(2, 5, 4, 8, dtype=torch.float64)
    qk, _, v = m.qkv_heads(x)
    ref = lsh_reference(qk, qk, v, m.rotations(20, qk), 6, bias_grid(m.relative_position_bias_table), m.scale)
    torch.testing.assert_close(m(x), m.proj(ref.permute(0, 2, 3, 1, 4).reshape(2, 5, 4, 8)), **TOL)
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 3, 4, D=2, seed=5))
    rot = lsh_rotations(2, 2, 2, 4, seed=1, dtype=torch.float64)
    grid = bias(2, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, b: lsh_attention(q, k, v, rot, 4, b), (q, k, v, grid))
