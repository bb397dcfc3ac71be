"""``python -m vision_attn.bench knobs`` (vision_attn/bench/knobs.py): the table against fp32, memory
measured in fresh processes."""
from __future__ import annotations

import pytest

from vision_attn.bench import knobs as bench_knobs


def test_bench_knobs_prints_a_table_against_fp32(capsys):
    assert bench_knobs.main(["--img", "32", "--batch", "2", "--reps", "1", "--warmup", "0", "--no-memory",
                             "--knobs", "bf16-mixed,channels_last,grad_ckpt"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| knob")]
    assert [r.split("|")[1].strip() for r in rows] == ["fp32", "bf16-mixed", "channels_last", "grad_ckpt"]
    assert rows[0].split("|")[3].strip() == "1.00x"


@pytest.mark.slow
def test_bench_knobs_measures_memory_in_fresh_processes():
    # 96 px x 8: activations dominate (at 64 px x 4 the two peaks were within 0.3 MB, i.e. noise)
    fp32 = bench_knobs.peak_memory_mb("fp32", "swin", "pico", 96, 8, "cpu")
    ckpt = bench_knobs.peak_memory_mb("grad_ckpt", "swin", "pico", 96, 8, "cpu")
    assert isinstance(fp32, float) and isinstance(ckpt, float), (fp32, ckpt)
    assert 0 < ckpt < 0.8 * fp32, (fp32, ckpt)  # measured 45.7 MB vs 23.3 MB
