"""The same parameters and seed give bit-identical numbers and figures on a CPU.

Each check runs the same experiment twice, in fresh processes with the cache off,
and compares tensors with ``torch.equal`` and files byte for byte.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
import torch

from eomlib import runner

ROOT = Path(__file__).resolve().parents[1]

EXPERIMENT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    import eomlib
    from eomlib.figures import plot_distance_to_gd

    out = Path(sys.argv[1])
    problem = eomlib.make_problem(
        "mlp", "digits", seed=0, num_samples=50, hidden=[4], dtype="float64"
    )
    comparisons = [
        eomlib.compare_with_gd(problem.loss, problem.params, lr, 10, orders=(0, 1))
        for lr in (0.05, 0.1)
    ]
    eom = eomlib.eom_trajectory(
        problem.loss, problem.params, 0.1, 10, 2, solver="dopri8", rtol=1e-12
    )
    eomlib.use_style()
    eomlib.savefig(
        plot_distance_to_gd(comparisons),
        "distance",
        parameters={"lrs": [0.05, 0.1]},
        seed=0,
        device="cpu",
        directory=out,
    )
    torch.save(
        {
            "params": problem.params,
            "gd": [c.gd for c in comparisons],
            "distances": [c.distances for c in comparisons],
            "eom": eom,
            "sharpness": eomlib.top_eigenvalue(problem.loss, problem.params),
        },
        out / "numbers.pt",
    )
    """
)


def _run_experiment(folder: Path) -> None:
    folder.mkdir()
    env = os.environ | {"EOMLIB_CACHE": "off", "MPLBACKEND": "Agg"}
    env.pop("EOMLIB_CHAPTER", None)
    subprocess.run(
        [sys.executable, "-c", EXPERIMENT, str(folder)],
        check=True,
        env=env,
        cwd=folder,
        timeout=300,
    )


def _assert_equal_bit_for_bit(a, b, where="numbers"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal_bit_for_bit(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_bit_for_bit(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_an_experiment_run_twice_gives_the_same_bits_and_figure_files(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    _run_experiment(first)
    _run_experiment(second)

    _assert_equal_bit_for_bit(
        torch.load(first / "numbers.pt", weights_only=False),
        torch.load(second / "numbers.pt", weights_only=False),
    )
    for name in ("distance.png", "distance.pdf", "distance.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def _copy_book(destination: Path) -> Path:
    destination.mkdir()
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, destination / name)
    for name in ("book", "notebooks", "results"):
        shutil.copytree(ROOT / name, destination / name)
    return destination


# A small run of the digits chapter: every cell, its table, text and figure.
SMALL = {"lrs": [0.05, 0.1], "num_steps": 10, "hidden": [4]}


def _execute(root: Path, monkeypatch, cache: str) -> nbformat.NotebookNode:
    monkeypatch.setenv("EOMLIB_CACHE", cache)
    monkeypatch.setenv("EOMLIB_CACHE_DIR", str(root / ".cache" / "eomlib"))
    name = "gd_gf_eom_digits"
    notebook = runner.read_notebook(root, name)
    parameters = runner.resolve_parameters(notebook, name, "quick", SMALL)
    return nbformat.read(runner.execute(root, name, parameters), as_version=4)


def _shown(notebook: nbformat.NotebookNode) -> list:
    """What a reader sees: every code cell's outputs, without timings."""
    shown = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.outputs:
            output = dict(output)
            output.pop("execution_count", None)
            output.pop("metadata", None)
            shown.append(json.dumps(output, sort_keys=True))
    return shown


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_a_chapter_shows_the_same_outputs_and_figures_uncached_cold_and_warm(
    tmp_path, monkeypatch
):
    runs = {}
    for state in ("off", "cold", "warm"):
        root = _copy_book(tmp_path / state) if state != "warm" else runs["cold"][2]
        notebook = _execute(root, monkeypatch, "off" if state == "off" else "on")
        runs[state] = (_shown(notebook), _files(root / "figures"), root)
        if state == "cold":
            entries = sorted((root / ".cache").rglob("*.pt"))
            assert len(entries) == len(SMALL["lrs"]) + 2
        if state == "warm":
            assert sorted((root / ".cache").rglob("*.pt")) == entries

    assert runs["off"][0] == runs["cold"][0] == runs["warm"][0]
    assert runs["off"][1] == runs["cold"][1] == runs["warm"][1]
    assert not (tmp_path / "off" / ".cache").exists()
