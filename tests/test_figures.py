"""The figure helper: stable names, three files, provenance, reproducible bytes,
and the manifest the Figures page lists, executed after every other notebook."""

import hashlib
import json
import math
from pathlib import Path

import pytest
from matplotlib import pyplot as plt

import eomlib
from eomlib import runner

ROOT = Path(__file__).resolve().parents[1]


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
        "manifest.json",
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


def _save(directory, name, chapter, seed=0):
    fig = _figure()
    try:
        return eomlib.savefig(
            fig,
            name,
            parameters={"lrs": [0.1, 0.2]},
            seed=seed,
            device="cpu",
            directory=directory,
            chapter=chapter,
        )
    finally:
        plt.close(fig)


def test_the_manifest_lists_each_figure_with_hashes_that_match_its_files(tmp_path):
    _save(tmp_path, "first", "chapter_a")
    _save(tmp_path, "second", "chapter_b", seed=5)

    manifest = eomlib.figures.load_manifest(tmp_path)
    assert sorted(manifest) == ["first", "second"]
    for name, entry in manifest.items():
        for kind in ("pdf", "png", "json"):
            file = entry["files"][kind]
            assert file["path"] == f"{name}.{kind}"
            digest = hashlib.sha256((tmp_path / file["path"]).read_bytes())
            assert file["sha256"] == digest.hexdigest()
        provenance = json.loads((tmp_path / f"{name}.json").read_text())
        assert entry["provenance"] == provenance
    assert manifest["second"]["chapter"] == "chapter_b"
    assert manifest["second"]["provenance"]["seed"] == 5
    assert eomlib.figures.verify_manifest(tmp_path) == {}


def test_verify_manifest_names_a_file_changed_after_it_was_saved(tmp_path):
    _save(tmp_path, "changed", "chapter_a")
    (tmp_path / "changed.png").write_bytes(b"not the figure")
    assert eomlib.figures.verify_manifest(tmp_path) == {"changed": ["changed.png"]}


def test_the_same_figures_saved_twice_give_a_byte_identical_manifest(tmp_path):
    for directory in (tmp_path / "a", tmp_path / "b"):
        _save(directory, "zeta", "chapter_b")
        _save(directory, "alpha", "chapter_a")
    first = (tmp_path / "a" / "manifest.json").read_bytes()
    assert first == (tmp_path / "b" / "manifest.json").read_bytes()

    _save(tmp_path / "a", "zeta", "chapter_b")  # saving again changes nothing
    assert (tmp_path / "a" / "manifest.json").read_bytes() == first
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "alpha.json",
        "alpha.pdf",
        "alpha.png",
        "manifest.json",
        "zeta.json",
        "zeta.pdf",
        "zeta.png",
    ]  # no temporary file is left behind


def test_an_identifier_another_chapter_owns_is_refused_before_anything_is_written(
    tmp_path,
):
    paths = _save(tmp_path, "shared-name", "chapter_a", seed=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    with pytest.raises(
        eomlib.figures.DuplicateFigureError,
        match="'shared-name' already belongs to chapter 'chapter_a'",
    ):
        _save(tmp_path, "shared-name", "chapter_b", seed=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert json.loads(paths["json"].read_text())["seed"] == 1


def test_the_chapter_comes_from_the_runner_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(eomlib.figures.CHAPTER_VARIABLE, "from_the_runner")
    paths = _save(tmp_path, "from-env", None)
    assert eomlib.figures.load_manifest(tmp_path)["from-env"]["chapter"] == (
        "from_the_runner"
    )
    assert json.loads(paths["json"].read_text())["chapter"] == "from_the_runner"


def test_a_chapter_run_drops_the_figures_the_chapter_no_longer_makes(tmp_path):
    _save(tmp_path, "kept", "chapter_a")
    _save(tmp_path, "dropped", "chapter_a")
    _save(tmp_path, "other", "chapter_b")

    with eomlib.figures.chapter_run(tmp_path, "chapter_a"):
        _save(tmp_path, "kept", None)
    assert sorted(eomlib.figures.load_manifest(tmp_path)) == ["kept", "other"]


def test_a_failed_chapter_run_keeps_its_previous_figures(tmp_path):
    _save(tmp_path, "kept", "chapter_a")
    before = (tmp_path / "manifest.json").read_bytes()
    with pytest.raises(RuntimeError), eomlib.figures.chapter_run(tmp_path, "chapter_a"):
        raise RuntimeError("the notebook failed")
    assert (tmp_path / "manifest.json").read_bytes() == before


def test_no_manifest_reads_as_no_figures(tmp_path):
    assert eomlib.figures.load_manifest(tmp_path / "nowhere") == {}


TOC = """\
format: jb-book
root: book/intro
parts:
  - caption: First
    chapters:
      - file: executed/zebra
      - file: book/prose
  - caption: Last
    chapters:
      - file: executed/alpha
        sections:
          - file: executed/middle
      - file: executed/figures
"""


def _book(root, names):
    (root / "_toc.yml").write_text(TOC)
    (root / "notebooks").mkdir()
    for name in names:
        (root / "notebooks" / f"{name}.md").write_text(f"({name}-label)=\n# {name}\n")
    return root


def test_the_runner_executes_notebooks_in_the_order_of_the_table_of_contents(
    tmp_path,
):
    root = _book(tmp_path, ["alpha", "figures", "middle", "zebra", "untoc"])
    assert runner.toc_order(root) == ["zebra", "alpha", "middle", "figures"]
    assert runner.notebook_names(root) == [
        "zebra",
        "alpha",
        "middle",
        "figures",
        "untoc",
    ]  # a notebook the toc does not list comes last
    assert runner.in_toc_order(root, ["figures", "zebra"]) == ["zebra", "figures"]


def test_the_book_runs_its_figures_page_after_every_other_notebook():
    names = runner.notebook_names(ROOT)
    assert names[-1] == "figures"
    assert "executed/figures" in (ROOT / "_toc.yml").read_text()


def test_chapter_labels_are_read_from_the_top_of_each_notebook(tmp_path):
    root = _book(tmp_path, ["alpha", "zebra"])
    assert runner.chapter_labels(root) == {
        "alpha": "alpha-label",
        "zebra": "zebra-label",
    }
