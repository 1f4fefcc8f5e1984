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
