"""``python -m vision_attn.bench ablation`` (vision_attn/bench/ablation.py): the sweep report and make gpu-ablation."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT

from vision_attn.bench import ablation


def write_run(root: Path, name: str, variant: str, seed: int, acc: float, bins: list, size: int = 448,
              overrides: tuple = ()) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    edges = [(0.0, 100.0), (100.0, 200.0)]
    (run / "results.json").write_text(json.dumps({
        "variant": variant, "size": "pico", "data": "shapes_far", "seed": seed, "image_size": size,
        "overrides": [f"model={variant}", f"seed={seed}", *overrides], "best_val_acc1": acc,
        "images_per_sec": 100.0 * (seed + 1), "wall_time_s": 10.0 * (seed + 1),
        "val_acc_by_distance": [{"lo": lo, "hi": hi, "n": n, "acc": a} for (lo, hi), (n, a) in zip(edges, bins)]}))


def test_report_tabulates_mean_and_std_over_seeds_per_distance_bin(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "0", "swin_global", 0, 0.8, [(40, 0.6), (60, 1.0)])
    write_run(runs, "1", "swin_global", 1, 0.9, [(40, 0.8), (60, 1.0)])
    write_run(runs, "2", "swin_window", 0, 0.5, [(40, 0.5), (60, None)])
    write_run(runs, "3", "swin_local", 0, 0.55, [(40, 0.5), (60, 0.6)], size=512, overrides=("model.memory_tokens=8",))
    write_run(runs, "4", "swin_local", 0, 0.52, [(40, 0.5), (60, 0.5)], size=512, overrides=("model.memory_tokens=0",))
    assert ablation.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "ablation.md").read_text()
    # stdev([0.8, 0.9]) = 0.0707; bins: stdev([0.6, 0.8]) = 0.1414, stdev([1, 1]) = 0; images/s (100 + 200) / 2
    assert "| swin_global | 2 | 85.0 ± 7.1 | 70.0 ± 14.1 | 100.0 ± 0.0 | 150 | 15 |" in md
    assert "| swin_window | 1 | 50.0 | 50.0 | n/a | 100 | 10 |" in md  # one seed: no ± ; an empty bin: n/a
    assert "0-100 px (n=40) | 100-200 px (n=60)" in md
    # the 512 px runs get their own table, one row per memory setting
    assert md.index("## 448 px") < md.index("| swin_global |") < md.index("## 512 px")
    assert "| swin_local [model.memory_tokens=8] | 1 | 55.0 | 50.0 | 60.0 |" in md
    assert "| swin_local [model.memory_tokens=0] | 1 | 52.0 | 50.0 | 50.0 |" in md
    for png in ("ablation.png", "ablation_512.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_refuses_runs_with_other_bins_and_empty_dirs(tmp_path):
    write_run(tmp_path / "a", "0", "swin", 0, 0.5, [(1, 0.5), (1, 0.5)])
    run = tmp_path / "a" / "1"
    (run / ".hydra").mkdir(parents=True)
    rec = {"variant": "swin", "seed": 1, "image_size": 448, "best_val_acc1": 0.5,
           "val_acc_by_distance": [{"lo": 0.0, "hi": 50.0, "n": 1, "acc": 0.5}]}
    (run / "results.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match=r"distance bins \[\(0.0, 50.0\)\] differ"):
        ablation.main([str(tmp_path / "a"), "--out", str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    assert ablation.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out2")]) == 1


def test_gpu_ablation_streams_run_both_presets_with_trainer_gpu_and_a_time_cap(tmp_path):
    cmds = ablation.streams(tmp_path, cuda=True, run_max_s=90, workers=3)
    assert len(cmds) == 4  # one stream per seed of the 448 px preset, one for the memory preset
    for seed, cmd in enumerate(cmds[:3]):
        assert cmd[1:3] == [str(ROOT / "train.py"), "-m"]
        assert {"experiment=attention_ablation_448", f"seed={seed}", "trainer=gpu", "logger=csv",
                "data.num_workers=3", "trainer.max_time=00:00:01:30",
                f"hydra.sweep.dir={tmp_path / 'runs' / f'448_seed{seed}'}"} <= set(cmd)
    assert {"experiment=attention_ablation_448_memory", "trainer=gpu"} <= set(cmds[3])
    assert not any(a.startswith("seed=") for a in cmds[3])  # the memory preset sweeps its own 3 seeds
    dry = ablation.streams(tmp_path, cuda=False, run_max_s=600, workers=0)
    assert len(dry) == 2 and "trainer=default" in dry[0] and "trainer=gpu" not in dry[0]
    assert set(ablation.DRY_RUN) <= set(dry[0]) and "model.tile_size=32" in dry[1]
    assert "trainer.max_time=00:00:10:00" in dry[0]


# A stream that ignores SIGTERM, with a child of its own (a sweep job's loader worker, say).
STUBBORN = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(60)")


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except FileNotFoundError:
        return True


def _stubborn_streams(monkeypatch, tmp_path) -> Path:
    pid_file = tmp_path / "child.pid"
    monkeypatch.setattr(ablation, "STOP_GRACE_S", 0.5)
    monkeypatch.setattr(ablation, "streams", lambda *a: [[sys.executable, "-c", STUBBORN, str(pid_file)],
                                                         [sys.executable, "-c", "print('finished')"]])
    return pid_file


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_gpu_ablation_run_stops_streams_over_budget_with_their_children(tmp_path, monkeypatch):
    pid_file = _stubborn_streams(monkeypatch, tmp_path)
    notes = ablation.run(tmp_path / "out", cuda=False, budget_s=3.0, run_max_s=60, workers=0)
    assert notes[:2] == ["stream 0 stopped at the 3 s budget (stream0.log)", "stream 0 exited -9 (stream0.log)"]
    assert _gone(int(pid_file.read_text()))  # SIGKILL to the whole group after the grace
    assert (tmp_path / "out" / "stream1.log").read_text() == "finished\n"


def test_gpu_ablation_run_interrupted_leaves_no_stream_running(tmp_path, monkeypatch):
    """The streams have sessions of their own (Ctrl-C does not reach them): the run stops them."""
    pid_file = _stubborn_streams(monkeypatch, tmp_path)
    started: list = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    timer = threading.Timer(0.0, lambda: (_wait_for(pid_file), os.kill(os.getpid(), signal.SIGINT)))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        ablation.run(tmp_path / "out", cuda=False, budget_s=120.0, run_max_s=60, workers=0)
    timer.join()
    assert len(started) == 2 and all(p.returncode is not None for p in started)
    assert _gone(int(pid_file.read_text()))


def test_report_says_when_the_top1_is_over_dense_cells(tmp_path):
    write_run(tmp_path / "runs", "0", "swin_global", 0, 0.99, [(40, 0.98), (60, 1.0)])
    record = json.loads((tmp_path / "runs" / "0" / "results.json").read_text())
    (tmp_path / "runs" / "0" / "results.json").write_text(json.dumps({**record, "data": "shapes_far_dense"}))
    assert ablation.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert "- dense label (data=shapes_far_dense): top-1 over the labelled last-stage cells" in md
    assert "| swin_global | 1 | 99.0 | 98.0 | 100.0 | 100 | 10 |" in md
    write_run(tmp_path / "runs", "1", "swin_global", 0, 0.5, [(40, 0.5), (60, 0.5)])  # data=shapes_far: its own row
    assert ablation.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert "| swin_global [data=shapes_far_dense] | 1 | 99.0 |" in md
    assert "| swin_global [data=shapes_far] | 1 | 50.0 |" in md
