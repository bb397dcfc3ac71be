"""The fused CPU kernel for neighborhood / dilated attention (vision_attn/attention/fused.py):
exactness against brute force and the pure-PyTorch tiled kernel on its vectorised band paths,
gradcheck, whole models, the route switch, the per-CPU build cache and its fallbacks."""
from __future__ import annotations

import logging
from unittest import mock

import pytest
import torch
from reference import neighborhood_reference, random_bias, random_qkv

import vision_attn.attention.neighborhood as nb
from vision_attn import create_model
from vision_attn.attention import backends, fused
from vision_attn.errors import ConfigError

pytestmark = pytest.mark.skipif(fused.library() is None, reason="no C++ compiler: the fused kernel cannot build")


def _run(route: str, monkeypatch, q, k, v, grid, kernel: int, dilation: int, gout, lse: bool = False):
    """Output (and log-sum-exp) and the gradients of q, k, v and the bias through ``route``."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, grid)]
    py, px = nb.neighborhood_patterns(q.shape[2], q.shape[3], kernel, dilation)
    with backends.force(route):
        res = nb.neighborhood_kernel(*leaves[:3], py, px, leaves[3], return_lse=lse)
    outs = list(res) if lse else [res]
    loss = (outs[0] * gout).sum() + (outs[1].sin().sum() if lse else 0)
    return outs + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("H,W", [(13, 21), (5, 64)])
@pytest.mark.parametrize("dilation", [1, 2, 3, 4])
@pytest.mark.parametrize("kernel", [3, 5, 7, 9, 11, 13])
def test_band_paths_match_brute_force_and_the_tiled_kernel(kernel: int, dilation: int, H: int, W: int,
                                                           monkeypatch) -> None:
    """Head dim 16, float64 (bands of 8 queries), 13 x 21 and 5 x 64: forward and every gradient."""
    q, k, v = random_qkv(2, 2, H, W, D=16, seed=kernel * 10 + dilation)
    grid = random_bias(2, kernel)
    gout = random_qkv(2, 2, H, W, D=16, seed=99)[0]
    fused_res = _run("fused", monkeypatch, q, k, v, grid, kernel, dilation, gout)
    tiled_res = _run("tiled", monkeypatch, q, k, v, grid, kernel, dilation, gout)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dbias"), fused_res, tiled_res):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(fused_res[0], neighborhood_reference(q, k, v, kernel, dilation, grid),
                               rtol=1e-10, atol=1e-12)


def test_the_sweep_reaches_the_band_paths() -> None:
    """The shapes above run the vectorised bands, not only the per-column border path."""
    cases = [(k, d) for k in (3, 5, 7, 9, 11, 13) for d in (1, 2, 3, 4)]
    assert all(fused.banded_columns(64, k, d, torch.float64) > 0 for k, d in cases)
    keys = [fused.banded_columns(64, k, d, torch.float64, keys=True) for k, d in cases]
    assert [c for c, n in zip(cases, keys) if n == 0] == [(9, 4), (11, 3), (11, 4), (13, 3), (13, 4)]  # k*d >= 33
    assert all(fused.banded_columns(21, k, d, torch.float64) > 0 for k, d in [(3, 1), (5, 2), (3, 4), (13, 1)])
    assert fused.banded_columns(56, 7, 1, torch.float32) == 48  # interior columns 3..52: 3 bands, 2 left
    # keys 7..48 (6 and 49 also seen by border queries)
    assert fused.banded_columns(56, 7, 1, torch.float32, keys=True) == 42
    assert fused.banded_columns(14, 7, 1, torch.float32) == 0  # too short for a band of 16
    # Borders of at least half a band (d * r >= 8 floats, >= 4 doubles) take clamped bands.
    assert fused.banded_columns(56, 7, 1, torch.float32, clamped=True) == 0  # 3 columns each side: one by one
    assert fused.banded_columns(56, 7, 4, torch.float32, clamped=True) == 24  # 12 each side
    assert all(fused.banded_columns(64, k, d, torch.float64, clamped=True) > 0 for k, d in [(3, 4), (5, 2), (7, 3)])


@pytest.mark.parametrize("H,W,kernel,dilation,D", [(3, 12, 3, 1, 16), (4, 18, 3, 2, 16), (5, 7, 5, 1, 3)])
def test_gradcheck_q_k_v_and_bias(H: int, W: int, kernel: int, dilation: int, D: int) -> None:
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 1, H, W, D=D, seed=3))
    grid = random_bias(1, kernel).requires_grad_()
    fn = lambda q, k, v, g: nb.neighborhood_attention(q, k, v, kernel, dilation, bias=g)  # noqa: E731
    with mock.patch.object(nb, "tiled_attention", side_effect=AssertionError("tiled kernel called")), \
            backends.force("fused"):
        assert torch.autograd.gradcheck(fn, (q, k, v, grid))


def test_log_sum_exp_and_its_gradient_match_the_tiled_kernel(monkeypatch) -> None:
    """Global tokens merge through the log-sum-exp: the fused kernel returns it and takes its gradient."""
    q, k, v = random_qkv(2, 3, 9, 24, D=16, seed=5)
    grid, gout = random_bias(3, 5), random_qkv(2, 3, 9, 24, D=16, seed=6)[0]
    for dilation in (1, 2):
        a = _run("fused", monkeypatch, q, k, v, grid, 5, dilation, gout, lse=True)
        b = _run("tiled", monkeypatch, q, k, v, grid, 5, dilation, gout, lse=True)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_float32_with_two_threads_matches_and_is_deterministic(monkeypatch) -> None:
    """A 30 x 56 map, head dim 32: float32 bands of 16, rows split over two threads."""
    torch.manual_seed(0)
    q, k, v, gout = (torch.randn(2, 3, 30, 56, 32) for _ in range(4))
    grid = torch.randn(3, 13, 13)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = _run("fused", monkeypatch, q, k, v, grid, 7, 2, gout)
        again = _run("fused", monkeypatch, q, k, v, grid, 7, 2, gout)
        b = _run("tiled", monkeypatch, q, k, v, grid, 7, 2, gout)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    for x, y in zip(a, b):
        assert ((x - y).abs().max() / y.abs().max()) < 1e-5


@pytest.mark.parametrize("variant", ["swin_local", "swin_dilated"])
def test_whole_model_fused_equals_fallback(variant: str, monkeypatch) -> None:
    """Forward and backward of a pico model at 128 px (stage 1 is 32 x 32: bands), both routes."""
    torch.manual_seed(0)
    model = create_model(variant, size="pico", num_classes=10)
    x = torch.randn(2, 3, 128, 128)
    results = {}
    for route in ("fused", "tiled"):
        model.zero_grad()
        torch.manual_seed(1)  # the same stochastic depth draws on both routes
        with backends.force(route):
            out = model(x)
        out.square().sum().backward()
        results[route] = [out.detach()] + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(results["fused"], results["tiled"]):
        assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) < 1e-5


@backends.force("fused")
def test_autocast_bf16_computes_in_float32_and_returns_bf16() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 40, 32, requires_grad=True) for _ in range(3))
    grid = torch.randn(2, 9, 9, requires_grad=True)
    ref = nb.neighborhood_attention(q, k, v, 5, 1, bias=grid)
    for inputs in ((q, k, v), tuple(t.bfloat16() for t in (q, k, v))):  # fp32 or bf16 inputs under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = nb.neighborhood_attention(*inputs, 5, 1, bias=grid)
        assert out.dtype == torch.bfloat16
        assert ((out.float() - ref).abs().max() / ref.abs().max()) < 2e-2
        grads = torch.autograd.grad(out.float().sum(), (q, k, v, grid))
        assert all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- route


def test_the_route_decides_which_kernel_runs(monkeypatch) -> None:
    """auto, a forced route and the older $VISION_ATTN_NA_KERNEL all pick the kernel that runs."""
    q, k, v = random_qkv(1, 2, 8, 9)
    calls = {}

    def count(key: str) -> None:
        f.reset_mock(), t.reset_mock()
        nb.neighborhood_attention(q, k, v, 3, 1)
        calls[key] = (f.call_count, t.call_count)

    with mock.patch.object(fused, "_forward", wraps=fused._forward) as f, \
            mock.patch.object(nb, "tiled_attention", wraps=nb.tiled_attention) as t:
        count("auto")
        for route in ("fused", "tiled"):
            with backends.force(route):
                count(route)
        for value in ("fused", "torch"):
            monkeypatch.setenv(backends.LEGACY_NA_ENV, value)
            count(f"${value}")
        monkeypatch.setenv(backends.LEGACY_NA_ENV, "fused")
        t.reset_mock()
        py, px = nb.neighborhood_patterns(8, 9, 3)
        nb.neighborhood_kernel(q, k, v, py, px, dropout_p=0.1)  # attention dropout: always the tiled kernel
        assert t.call_count == 1
    assert calls == {"auto": (1, 0), "fused": (1, 0), "tiled": (0, 1), "$fused": (1, 0), "$torch": (0, 1)}
    cuda = backends.Call("neighborhood", "cuda", torch.float32, bias=True)
    assert backends.choose(cuda) != "fused"  # not CPU: never the fused kernel
    with pytest.raises(ConfigError, match=r"model\.attn_backend=fused: route 'fused' cannot serve .* CPU only"):
        backends.choose(cuda, "fused")


def test_a_bad_route_value_names_the_variable(monkeypatch) -> None:
    call = backends.Call("neighborhood", "cpu", torch.float32)
    monkeypatch.setenv(backends.LEGACY_NA_ENV, "fast")
    with pytest.raises(ConfigError, match=r"VISION_ATTN_NA_KERNEL='fast': expected one of auto, fused, torch"):
        backends.choose(call)
    monkeypatch.delenv(backends.LEGACY_NA_ENV)
    monkeypatch.setenv(backends.ENV, "fastest")
    with pytest.raises(ConfigError, match=r"VISION_ATTN_BACKEND='fastest': unknown route 'fastest'.*neighborhood: "
                                          r"fused, tiled, flex, natten"):
        backends.choose(call)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """An empty kernel cache; library() forgets what it loaded (and is reset after the test)."""
    monkeypatch.setenv(fused.CACHE_ENV, str(tmp_path))
    fused.library.cache_clear()
    yield tmp_path
    fused.library.cache_clear()


def test_without_a_compiler_auto_falls_back_with_one_line_and_fused_is_an_error(fresh_library, monkeypatch,
                                                                                 caplog) -> None:
    monkeypatch.setattr(fused, "compiler", lambda: None)
    q, k, v = random_qkv(1, 1, 6, 7)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        out = nb.neighborhood_attention(q, k, v, 3, 1)
        nb.neighborhood_attention(q, k, v, 3, 1)
    torch.testing.assert_close(out, neighborhood_reference(q, k, v, 3, 1))
    lines = [r.getMessage() for r in caplog.records if r.name == fused.__name__]
    assert lines == ["fused neighborhood kernel: no C++ compiler (set $CXX or install g++); "
                     "using the pure-PyTorch tiled kernel"]
    monkeypatch.setenv(backends.LEGACY_NA_ENV, "fused")
    with pytest.raises(ConfigError, match="VISION_ATTN_NA_KERNEL=fused, but the fused kernel cannot serve this call: "
                                          "it could not be built"):
        nb.neighborhood_attention(q, k, v, 3, 1)
    monkeypatch.delenv(backends.LEGACY_NA_ENV)
    with pytest.raises(ConfigError, match=r"model\.attn_backend=fused: route 'fused' .* could not be built"):
        nb.neighborhood_attention(q, k, v, 3, 1, backend="fused")


def test_a_failed_build_falls_back_and_says_why(fresh_library, monkeypatch, caplog) -> None:
    monkeypatch.setattr(fused, "CXX_FLAGS", [*fused.CXX_FLAGS, "-fno-such-flag"])
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        assert fused.library() is None
    (line,) = [r.getMessage() for r in caplog.records if r.name == fused.__name__]
    assert line.startswith("fused neighborhood kernel: build failed (") and "no-such-flag" in line
    assert list(fresh_library.iterdir()) == []  # no half-written object left in the cache


def test_the_build_is_cached_per_cpu(fresh_library, monkeypatch, caplog) -> None:
    """Built once, then loaded; a host with other CPU flags (AVX2-only, say) gets its own build."""
    cxx = fused.compiler()
    avx512 = fused._build_key(cxx)
    monkeypatch.setattr(fused, "cpu_signature", lambda: "Some CPU | fpu sse4_2 avx avx2 fma")
    assert fused._build_key(cxx) != avx512
    monkeypatch.undo()
    monkeypatch.setenv(fused.CACHE_ENV, str(fresh_library))
    with caplog.at_level(logging.INFO, logger=fused.__name__):
        assert fused.library() is not None
        fused.library.cache_clear()
        with mock.patch.object(fused, "_compile", side_effect=AssertionError("rebuilt")):
            assert fused.library() is not None
    lines = [r.getMessage() for r in caplog.records if r.name == fused.__name__]
    assert len(lines) == 2 and "built in" in lines[0] and "loaded" in lines[1]
    assert [p.name for p in fresh_library.iterdir()] == [f"neighborhood_cpu_{avx512}.so"]
