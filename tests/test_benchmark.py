"""scripts/benchmark_data.py and project.feed.benchmark: every figure lands in the table, JSON, TensorBoard, chart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from project.feed.benchmark import format_table
from project.feed.monitor import classify
from project.feed.throughput import choose_workers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchmark_data  # noqa: E402


@pytest.fixture
def one_thread():
    # two intra-op threads on a busy 2-core machine spin against each other; one is steadier
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_run_writes_consistent_figures(tmp_path, capsys, one_thread):
    code = benchmark_data.main(
        [
            "--quick",
            "--accelerator",
            "cpu",
            "--workers",
            "0,1",
            "--out_dir",
            str(tmp_path / "out"),
            "--default_root_dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    for word in ("img/s", "loader", "model", "num_workers"):
        assert word in out

    results = json.loads((tmp_path / "out" / "benchmark.json").read_text())["results"]
    assert set(results) == {"workers", "sources", "model", "end_to_end", "pipelines", "overhead", "model_variants"}
    loader = {r["num_workers"]: r["loader_img_per_s"] for r in results["workers"]}
    assert sorted(loader) == [0, 1] and min(loader.values()) > 0
    model = results["model"][0]["model_img_per_s"]
    e2e = results["end_to_end"][0]
    # the recommendation is the choice rule applied to the measured rates, and the verdict the monitor's reading
    assert e2e["recommended_num_workers"] == choose_workers(loader, model)
    verdict = {"data-bound": "loader-bound", "model-bound": "model-bound"}.get(
        classify(e2e["data_wait_fraction"]), "balanced"
    )
    assert e2e["verdict"].startswith(verdict)
    # training cannot outrun its slower side (2x: timing noise of a few short measurements)
    assert 0 < e2e["end_to_end_img_per_s"] <= 2 * min(loader[e2e["num_workers"]], model)

    # rotating a 256 px source costs several times a 64 px one (16x the pixels)
    alone = {r["source_px"]: r["ms_per_img"] for r in results["sources"] if r["pipeline"].startswith("rotation")}
    assert alone[256] > 2 * alone[64]
    for row in results["sources"]:
        assert row["img_per_s"] == pytest.approx(1000 / row["ms_per_img"], rel=0.02)

    # the naive pipeline is the yardstick row; every other pipeline is read against it
    pipelines = {r["pipeline"]: r for r in results["pipelines"]}
    assert pipelines["naive"]["vs_naive"] == 1.0 and {"fast", "fast_device_aug", "cache"} <= set(pipelines)
    for row in pipelines.values():
        assert row["vs_naive"] == pytest.approx(row["images_per_s"] / pipelines["naive"]["images_per_s"], rel=0.02)
    overhead = {r["loop"]: r for r in results["overhead"]}
    assert overhead["raw PyTorch loop"]["vs_raw"] == 1.0 and len(overhead) == 3
    assert [r["variant"] for r in results["model_variants"]] == ["eager", "channels_last", "bf16"]

    png = tmp_path / "out" / "data_feed.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 150_000

    runs = list((tmp_path / "lightning_logs" / "benchmark").glob("version_*"))
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    scalars = events.Scalars("feed/loader_img_per_s")
    assert [s.step for s in scalars] == [0, 1]  # num_workers on the x axis
    assert [round(s.value, 1) for s in scalars] == [loader[0], loader[1]]
    assert events.Scalars("feed/model_img_per_s")[0].value == pytest.approx(model)


def test_bad_flags_exit_2(capsys):
    for argv in (["--sections", "nope"], ["--workers", "0,-1"], ["--batch_size", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            benchmark_data.main(argv)
        assert exit_info.value.code == 2
        assert "error" in capsys.readouterr().err


def test_table_lines_up_columns():
    table = format_table([{"num_workers": 0, "loader_img_per_s": 812.5}, {"num_workers": 12, "verdict": "ok"}])
    lines = table.splitlines()
    assert lines[0].split() == ["num_workers", "loader_img_per_s", "verdict"]
    assert lines[1].index("812.5") == lines[0].index("loader_img_per_s")
    assert lines[2].index("ok") == lines[0].index("verdict")  # a missing cell keeps the columns in place
