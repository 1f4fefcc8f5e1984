"""The derivative benchmark: what it measures, and that it runs end to end.

No test here asserts a speed: timings belong to the benchmark's own output.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eomlib import benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_peak_memory_sees_an_intermediate_that_is_freed():
    x = torch.randn(500, 500, dtype=torch.float64)  # 2 MB

    def two_products():
        return (x @ x) @ x  # the first product lives until the second is made

    peak = benchmark.peak_memory_mb(two_products, torch.device("cpu"))
    assert 2 * x.numel() * 8 / 2**20 <= peak < 3 * x.numel() * 8 / 2**20


def test_rounds_alternate_with_the_gradient_and_respect_the_bounds():
    calls = []
    setting = benchmark.Setting(min_rounds=3, max_rounds=4, budget_s=0.0, warmup=1)
    ms, ratios = benchmark.time_against_gradient(
        lambda: calls.append("f"),
        lambda: calls.append("g"),
        setting,
        torch.device("cpu"),
    )
    assert len(ratios) == 3
    assert calls == ["f", "g"] + ["g", "f"] * 3


def _results(ratios, peers):
    rows = [dict(name=name, group="x", ratio=r) for name, r in ratios.items()]
    rows += [dict(name=name, group="peer hvp", ratio=r) for name, r in peers.items()]
    return {"cases": {"mlp-float32": {"rows": rows}}}


def test_targets_compare_with_their_limits_and_the_fastest_peer():
    results = _results(
        {"hvp, reverse over reverse": 2.5, "counter terms, orders 1-4": 120.0},
        {"slow peer": 5.0, "fast peer": 2.4, "broken peer": float("nan")},
    )
    checks = {c["target"]: c for c in benchmark.check_targets(results)}
    assert checks["hvp, reverse over reverse <= 3"]["met"]
    assert not checks["counter terms, orders 1-4 <= 100"]["met"]
    (peer,) = [c for t, c in checks.items() if "fastest peer" in t]
    assert "fast peer, 2.40" in peer["target"] and not peer["met"]


def test_side_by_side_timings_decide_the_peer_target_by_the_hardest_peer():
    results = _results(
        {"hvp, reverse over reverse": 2.5},
        {"slow peer": 5.0, "fast peer": 2.4},
    )
    results["cases"]["mlp-float32"]["head_to_head"] = {
        "slow peer": dict(ratio=0.5),
        "fast peer": dict(ratio=0.97),
    }
    (peer,) = [c for c in benchmark.check_targets(results) if "peer" in c["target"]]
    assert peer["target"] == "hvp / fast peer <= 1, side by side"
    assert peer["measured"] == 0.97 and peer["met"]


def test_sharpness_tracking_is_counted_in_hvps_of_the_same_case():
    results = _results(
        {"hvp, reverse over reverse": 2.5, "sharpness tracking, per GD step": 7.0},
        {},
    )
    checks = {c["target"]: c for c in benchmark.check_targets(results)}
    check = checks["sharpness tracking, per GD step <= 3 x hvp, reverse over reverse"]
    assert check["measured"] == 7.0 / 2.5 and check["met"]


def test_the_latest_results_are_the_newest_by_date(tmp_path):
    for date in ("2026-01-02", "2026-11-30", "2025-12-31"):
        (tmp_path / f"benchmark-cpu-{date}.json").write_text(json.dumps({"d": date}))
    assert benchmark.load_latest(tmp_path)["d"] == "2026-11-30"
    assert benchmark.load_latest(tmp_path / "nothing") is None


def test_an_unknown_case_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="unknown case 'resnet'"):
        benchmark.run(["mlp-float64", "resnet"])


@pytest.mark.slow
def test_the_command_writes_every_row_and_the_products_agree(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "derivatives.py"),
        "--profile",
        "quick",
        "--cases",
        "mlp-float64",
        "--orders",
        "1",
        "2",
        "--no-compile",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("benchmark-cpu-*.json")
    results = json.loads(path.read_text())
    rows = {row["name"]: row for row in results["cases"]["mlp-float64"]["rows"]}
    for name in [
        "gradient, torch.autograd",
        "hvp, reverse over reverse",
        "hvp, forward over reverse",
        "counter terms, orders 1-2",
        "EoM field from optimizer steps, order 2",
        "GD, 100 steps",
        "sharpness tracking, per GD step",
        "EoM₁ integrated over 100 GD steps",
    ]:
        assert rows[name]["ratio"] > 0, name
    failed = [row["note"] for row in rows.values() if row["note"].startswith("failed")]
    assert not failed
    products = [row for row in rows.values() if row["max_rel_diff"] is not None]
    assert len(products) >= 2
    assert all(row["max_rel_diff"] < 1e-12 for row in products)
    installed = [peer for peer, version in results["meta"]["peers"].items() if version]
    assert len([r for r in rows.values() if r["group"] == "peer hvp"]) == len(installed)
    assert "targets:" in done.stdout and results["targets"]


def _sharding_run():
    """A small synthetic result of benchmarks/distributed.py: one case, two world
    sizes, round numbers."""
    worlds = [
        dict(
            world_size=1,
            threads_per_rank=2,
            grad_ms=2.0,
            hvp_ms=5.0,
            all_reduce_ms=0.05,
            grad_all_reduces=[1, 10, 3, 3],
            hvp_all_reduces=[1, 10, 10, 3, 3, 3, 3],
        ),
        dict(
            world_size=2, threads_per_rank=1, grad_ms=4.0, hvp_ms=2.5, all_reduce_ms=1.0
        ),
    ]
    case = dict(
        num_params=10,
        num_samples=20,
        baseline=dict(threads=2, grad_ms=1.0, hvp_ms=4.0),
        worlds=worlds,
    )
    meta = dict(cpu_count=2, repetitions=30, warmup=5)
    return {"meta": meta, "cases": {"mlp-float32": case}}


def test_sharding_ratios_are_one_rank_over_w_ranks_and_over_the_unsharded_loss():
    ratios = benchmark.scaling(_sharding_run()["cases"]["mlp-float32"])
    assert ratios["speedup"] == {
        1: {"grad": 1.0, "hvp": 1.0},
        2: {"grad": 0.5, "hvp": 2.0},
    }
    assert ratios["overhead"] == {"grad": 2.0, "hvp": 1.25}


def test_the_facts_of_a_sharding_run_are_read_off_its_counts_and_times():
    facts = benchmark.sharding_facts(_sharding_run(), "mlp-float32")
    assert facts["grad"] == {"params": 1, "scalar": 1, "other": 2}
    assert facts["hvp"] == {"params": 2, "scalar": 1, "other": 4}
    assert facts["threads"] == (2, 1) and facts["all_reduce_ms"] == {1: 0.05, 2: 1.0}
    assert facts["extra_grad_ms"] == 1.0
    assert facts["best"] == (2.0, "mlp-float32", "hvp", 2)


def test_a_sharding_run_formats_as_a_table_and_as_text():
    results = _sharding_run()
    rows = benchmark.distributed_rows(results, "mlp-float32")
    assert [row["ranks"] for row in rows] == ["unsharded", "1", "2"]
    assert rows[0]["gradient ms"] == "1" and rows[0]["gradient speed-up"] == ""
    assert rows[2]["threads a rank"] == "1"
    assert (rows[2]["gradient speed-up"], rows[2]["HVP speed-up"]) == ("0.50", "2.00")
    assert rows[2]["all-reduce ms"] == "1"
    text = benchmark.distributed_report(results)
    assert text.startswith("2 CPU cores; median of 30 repetitions")
    assert "overhead of sharding at one rank: gradient 2.00, HVP 1.25" in text
    assert "unsharded" in text and "0.50" in text and "2.00" in text


def test_a_sharding_run_plots_one_panel_an_operation():
    import matplotlib

    matplotlib.use("Agg")
    fig = benchmark.plot_scaling(_sharding_run())
    assert [ax.get_title() for ax in fig.axes] == ["gradient", "HVP"]
    (line,) = fig.axes[1].get_lines()[:1]
    assert list(line.get_ydata()) == [1.0, 2.0]


def test_sharding_runs_are_saved_and_read_beside_the_derivative_benchmark(tmp_path):
    results = _sharding_run()
    results["meta"].update(device="cpu", device_name="x86_64", date="2026-12-04")
    path = benchmark.save(results, tmp_path, prefix="distributed")
    assert path.name == "distributed-cpu-2026-12-04.json"
    (tmp_path / "benchmark-cpu-2026-12-05.json").write_text(json.dumps({"d": 1}))
    assert benchmark.load_latest(tmp_path, prefix="distributed")["path"] == str(path)
    assert benchmark.load_latest(tmp_path)["d"] == 1
