"""The end-to-end benchmark on a tiny preset: configs fastmerge accepts, figures, JSON and chart."""

from __future__ import annotations

import json
import sys

import pytest

from bench import e2e
from bench.checkpoints import GeneratorSpec, generate
from fastmerge.demo import LlamaShape
from fastmerge.engine import prepare_plan
from fastmerge.methods import method_names

SMALL = "64,160,2,4,2,96"


@pytest.fixture
def models(tmp_path):
    shape = LlamaShape(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96)
    return generate(tmp_path / "models", GeneratorSpec(shape, fine_tunes=3))


@pytest.mark.parametrize("method", sorted(set(e2e.METHODS) & set(method_names())))
def test_every_registered_method_config_plans(models, method):
    config = e2e.METHODS[method](models)
    assert config["dtype"] == "bfloat16"
    plan = prepare_plan(config)
    try:
        assert plan.tensors
    finally:
        for checkpoint in plan.checkpoints:
            checkpoint.close()


def test_config_inputs_include_the_base_once(models):
    assert e2e.config_inputs(e2e.METHODS["task_arithmetic"](models)) == sorted(models.all_models)
    assert e2e.config_inputs(e2e.METHODS["linear"](models)) == sorted(models.fine_tunes)
    assert e2e.config_inputs(e2e.METHODS["slerp"](models)) == sorted([models.base, models.fine_tunes[0]])


def test_roofline_reads_every_input_byte_and_writes_the_output_size(models, tmp_path):
    roofline = e2e.measure_roofline(models.all_models, 12345, tmp_path)
    assert roofline.read_bytes == sum(p.stat().st_size for p in models.files)
    assert roofline.write_bytes == 12345 and roofline.seconds > 0 and roofline.direct_seconds > 0
    assert not (tmp_path / "roofline.bin").exists()


def test_child_runs_report_their_own_peak_rss():
    grow = "b = bytearray(300_000_000); b[::4096] = b'x' * len(b[::4096])"
    big = e2e.run_child("python", "grow", [sys.executable, "-c", grow])
    small = e2e.run_child("python", "noop", [sys.executable, "-c", "pass"])
    assert big.returncode == 0 and big.peak_rss_bytes > 300_000_000
    assert small.peak_rss_bytes < big.peak_rss_bytes - 200_000_000
    assert e2e.run_child("python", "fail", [sys.executable, "-c", "raise SystemExit(3)"]).returncode == 3


def test_without_gnu_time_fastmerge_runs_report_their_own_peak_rss(models, tmp_path, monkeypatch):
    """Where /usr/bin/time is missing, fastmerge's summary line gives the figure; GNU time's
    measure of the same merge is the check (within 5%: both are the child's own peak)."""
    config = tmp_path / "linear.yml"
    config.write_text(json.dumps(e2e.METHODS["linear"](models)))
    timed = e2e.run_child("fastmerge", "linear", e2e.fastmerge_command(config, tmp_path / "a"))
    monkeypatch.setattr(e2e, "TIME", tmp_path / "no-time")
    reported = e2e.run_child("fastmerge", "linear", e2e.fastmerge_command(config, tmp_path / "b"))
    assert timed.returncode == reported.returncode == 0
    assert abs(reported.peak_rss_bytes - timed.peak_rss_bytes) <= 0.05 * timed.peak_rss_bytes
    with pytest.raises(FileNotFoundError, match="GNU time"):
        e2e.run_child("mergekit", "linear", [sys.executable, "-c", "pass"])
    assert e2e.reported_peak_rss("merged 3 tensors ... peak RSS 1.50 GiB, device cpu") == 1.5 * 2**30
    assert e2e.reported_peak_rss("fastmerge: error: no such file") == 0


def test_repeated_runs_report_the_median_wall_and_the_highest_rss():
    run = lambda wall, rss, rc=0: e2e.MergeRun("fastmerge", "ties", wall, rss, rc)  # noqa: E731
    assert e2e.median_run([run(3.0, 10), run(1.0, 30), run(2.0, 20)]) == run(2.0, 30)
    assert e2e.median_run([run(1.0, 10), run(4.0, 5)]) == run(4.0, 10)  # even count: the upper middle
    assert e2e.median_run([run(1.0, 10), run(9.0, 5, rc=3)]).returncode == 3


def test_repeated_roofline_reports_each_parts_median(models, tmp_path, monkeypatch):
    # Each timed read follows an untimed warm-up read (99 s here, which must not count).
    reads, writes = iter([99.0, 5.0, 99.0, 1.0, 99.0, 3.0]), iter([1.0, 10.0, 2.0, 20.0, 3.0, 30.0])  # plain, direct, ...
    monkeypatch.setattr(e2e, "read_files", lambda files: (7, next(reads)))
    monkeypatch.setattr(e2e, "write_bytes", lambda path, n, direct=False: next(writes))
    roofline = e2e.measure_roofline(models.all_models, 12345, tmp_path, repeat=3)
    assert (roofline.read_s, roofline.write_s, roofline.direct_write_s) == (3.0, 2.0, 20.0)


def test_rooflines_are_measured_before_mergekit_runs(models, tmp_path, monkeypatch):
    # mergekit's minutes let the VM page the inputs out (DAMON), so the rooflines must come
    # right after fastmerge's runs, where they find the cache as fastmerge did.
    events = []

    def fake_child(tool, method, command):
        events.append(tool if method != "start-up" else "start-up")
        if tool == "fastmerge" and method != "start-up":
            out = e2e.Path(command[command.index("run") + 2])
            out.mkdir(parents=True)
            (out / "model.safetensors").write_bytes(b"x" * 64)
        return e2e.MergeRun(tool, method, 1.0, 10, 0)

    monkeypatch.setattr(e2e, "run_child", fake_child)
    monkeypatch.setattr(e2e, "measure_roofline",
                        lambda inputs, n, scratch, repeat=1: events.append("roofline") or e2e.Roofline(1, n, 1.0, 1.0, 1.0))
    result = e2e.bench_method("ties", models, tmp_path, with_mergekit=True, repeat=2)
    assert events == ["fastmerge", "fastmerge", "start-up", "start-up", "roofline", "mergekit"]
    assert result.mergekit is not None and result.fastmerge.wall_s == 1.0


def test_benchmark_run_writes_results_and_chart(tmp_path):
    out_json, chart = tmp_path / "r.json", tmp_path / "r.png"
    e2e.main(["--custom", SMALL, "--work", str(tmp_path), "--methods", "linear,task_arithmetic", "--no-mergekit",
              "--repeat", "2", "--json", str(out_json), "--chart", str(chart)])
    report = json.loads(out_json.read_text())
    assert [r["method"] for r in report["results"]] == ["linear", "task_arithmetic"]
    for row in report["results"]:
        assert row["fastmerge_ok"] and row["fastmerge_s"] > 0 and row["efficiency"] > 0
        assert row["output_gb"] > 0 and "mergekit_s" not in row
        assert row["startup_s"] > 0
        assert len(row["fastmerge_runs_s"]) == 2 and row["fastmerge_s"] == max(row["fastmerge_runs_s"])
        assert row["efficiency_direct"] == pytest.approx(row["roofline_direct_s"] / row["fastmerge_s"])
        assert row["efficiency_read"] == pytest.approx(row["roofline_read_s"] / row["fastmerge_s"])
        after = row["efficiency_after_startup"]
        assert after is None or after == pytest.approx(row["roofline_s"] / (row["fastmerge_s"] - row["startup_s"]))
    startups = [run for run in report["runs"] if run["method"] == "start-up"]
    assert len(startups) == 4 and all(run["returncode"] == 0 for run in startups)
    assert report["repeat"] == 2 and report["device"] == "cpu"
    assert chart.stat().st_size > 1000
    assert not list(tmp_path.glob("out-*"))


def test_the_device_reaches_both_tools_commands(tmp_path):
    fastmerge = e2e.fastmerge_command(tmp_path / "c.yml", tmp_path / "out", "cuda")
    assert fastmerge[fastmerge.index("--device") + 1] == "cuda"
    assert "--cuda" in e2e.mergekit_command(tmp_path / "c.yml", tmp_path / "out", "cuda")
    assert "--cuda" not in e2e.mergekit_command(tmp_path / "c.yml", tmp_path / "out")
