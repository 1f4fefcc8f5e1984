"""The figure helper: stable names, three files, provenance, reproducible bytes."""

import json
import math

import pytest
from matplotlib import pyplot as plt

import eomlib


def _figure():
    eomlib.use_style()
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [1, 0, 1], label="a line")
    ax.set(xlabel="step k", ylabel="distance")
    ax.legend()
    return fig


def test_savefig_writes_pdf_png_and_provenance(tmp_path):
    paths = eomlib.savefig(
        _figure(),
        "a-test_figure",
        parameters={"lrs": [0.1]},
        seed=3,
        device="cpu",
        directory=tmp_path,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a-test_figure.json",
        "a-test_figure.pdf",
        "a-test_figure.png",
    ]
    record = json.loads(paths["json"].read_text())
    assert record["parameters"] == {"lrs": [0.1]}
    assert record["seed"] == 3 and record["device"] == "cpu"
    assert {"torch", "numpy", "matplotlib", "eomlib"} <= set(record["libraries"])


def test_pdf_fonts_are_embedded_as_truetype(tmp_path):
    paths = eomlib.savefig(_figure(), "fonts", parameters={}, directory=tmp_path)
    pdf = paths["pdf"].read_bytes()
    assert b"/FontFile2" in pdf  # an embedded TrueType font program
    assert b"/Type3" not in pdf


def test_the_same_figure_saves_to_the_same_bytes(tmp_path):
    first = eomlib.savefig(_figure(), "same", parameters={}, directory=tmp_path / "a")
    second = eomlib.savefig(_figure(), "same", parameters={}, directory=tmp_path / "b")
    for kind in ("pdf", "png", "json"):
        assert first[kind].read_bytes() == second[kind].read_bytes()


@pytest.mark.parametrize("name", ["Has Space", "UPPER", "../escape", ""])
def test_an_unstable_name_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match="figure name must be lower-case"):
        eomlib.savefig(_figure(), name, parameters={}, directory=tmp_path)


def test_fit_slope_recovers_a_power_law_and_skips_points_below_the_floor():
    x = [0.1, 0.2, 0.4, 0.8]
    y = [1e-16, 0.2**3, 0.4**3, 0.8**3]  # the first point sits at round-off
    assert eomlib.figures.fit_slope(x[1:], y[1:]) == pytest.approx(3.0)
    assert eomlib.figures.fit_slope(x, y, floor=1e-12) == pytest.approx(3.0)
    assert math.isnan(eomlib.figures.fit_slope(x, y, floor=1.0))  # no points left


def test_markdown_table_writes_one_row_per_dict():
    table = eomlib.figures.markdown_table(
        [{"lr": 0.1, "ratio": 2.5}, {"lr": 0.2, "ratio": 3.0}]
    )
    assert table.splitlines() == [
        "| lr | ratio |",
        "|---:|---:|",
        "| 0.1 | 2.5 |",
        "| 0.2 | 3 |",
    ]


def test_markdown_table_escapes_bars_inside_cells():
    table = eomlib.figures.markdown_table([{"|w|²": "|g|", "x": 1.0}])
    assert table.splitlines()[0] == "| \\|w\\|² | x |"
    assert table.splitlines()[2] == "| \\|g\\| | 1 |"
