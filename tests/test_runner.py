"""The runner: parameter checks before anything runs, execution, and the book."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
import torch

from eomlib import runner

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = runner.notebook_names(ROOT)


def _copy_book(destination: Path) -> Path:
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, destination / name)
    for name in ("book", "notebooks", "results"):
        shutil.copytree(ROOT / name, destination / name)
    return destination


def test_there_are_notebooks():
    assert "gd_gf_eom_digits" in NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_notebook_keeps_one_parameters_cell_and_both_profiles(name):
    notebook = runner.read_notebook(ROOT, name)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    assert "profile" in runner.declared_parameters(notebook, name)
    for profile in ("quick", "full"):
        assert profile in notebook.metadata["eomlib"]["profiles"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_notebook_is_in_the_table_of_contents(name):
    assert f"executed/{name}" in (ROOT / "_toc.yml").read_text()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_quick_profile_of_every_notebook_passes_the_checks(name):
    notebook = runner.read_notebook(ROOT, name)
    parameters = runner.resolve_parameters(notebook, name, "quick", {})
    assert parameters["profile"] == "quick"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_full_profile_with_device_cpu_passes_the_checks_on_any_machine(name):
    notebook = runner.read_notebook(ROOT, name)
    if "device" not in runner.declared_parameters(notebook, name):
        pytest.skip(f"{name} has no device parameter")
    parameters = runner.resolve_parameters(notebook, name, "full", {"device": "cpu"})
    assert parameters["device"] == "cpu"


BAD_OVERRIDES = [
    (
        {"lrs": [0.1, -0.05]},
        "lrs\\[1\\] must be positive and finite; got lrs\\[1\\]=-0.05",
    ),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'; allowed: cifar10, digits"),
    (
        {"model": "transformer"},
        "unknown model 'transformer'; allowed: bn_cnn, bn_mlp, cnn, mlp",
    ),
    ({"dtype": "float16"}, "unknown dtype 'float16'; allowed: float32, float64"),
    ({"num_steps": 0}, "num_steps must be an integer >= 1; got num_steps=0"),
    ({"num_steps": 2.5}, "parameter 'num_steps' .* must be of type int"),
    ({"lrs": "0.1"}, "parameter 'lrs' .* must be of type list"),
    ({"num_steps": True}, "parameter 'num_steps' .* must be of type int"),
    ({"learning_rate": 0.1}, "no notebook here has a parameter 'learning_rate'"),
    ({"rtol": -1.0}, "rtol must be positive and finite; got rtol=-1.0"),
    ({"rtol": 0.0}, "rtol must be positive and finite; got rtol=0.0"),
    ({"dtype": "float32"}, r"rtol=1e-1\d is below what float32 resolves"),
    ({"profile": "full"}, "the profile is chosen with --profile"),
]
if importlib.util.find_spec("torchvision") is None:
    BAD_OVERRIDES.append(({"dataset": "mnist"}, "'mnist' needs torchvision"))
if not torch.cuda.is_available():
    BAD_OVERRIDES.append(({"device": "cuda"}, "device='cuda' .* no CUDA GPU"))


@pytest.mark.parametrize(("overrides", "message"), BAD_OVERRIDES)
def test_a_bad_parameter_stops_the_run_before_any_notebook_starts(
    tmp_path, overrides, message
):
    root = _copy_book(tmp_path)
    with pytest.raises(runner.RunError, match=message):
        runner.run(root, overrides=overrides, build=False)
    assert not (root / "executed").exists()


def test_an_override_goes_to_the_notebooks_that_declare_it():
    plans = runner.plan(ROOT, "quick", None, {"num_steps": 7})
    with_it = [name for name, p in plans.items() if "num_steps" in p]
    assert with_it and all(plans[name]["num_steps"] == 7 for name in with_it)
    assert len(with_it) < len(plans)


def test_an_integer_is_accepted_where_a_float_is_expected():
    plans = runner.plan(ROOT, "quick", ["gd_gf_eom_digits"], {"rtol": 1})
    assert plans["gd_gf_eom_digits"]["rtol"] == 1


def test_an_unknown_profile_or_notebook_is_refused(tmp_path):
    root = _copy_book(tmp_path)
    with pytest.raises(runner.RunError, match="unknown profile 'medium'; allowed"):
        runner.run(root, profile="medium", build=False)
    with pytest.raises(
        runner.RunError, match="unknown notebook 'nope'; notebooks here"
    ):
        runner.run(root, notebooks=["nope"], build=False)


def test_the_command_line_names_the_bad_parameter_and_exits_non_zero(tmp_path):
    root = _copy_book(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eomlib.runner",
            "--root",
            str(root),
            "--no-build",
            "-p",
            "lrs",
            "[-0.1]",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "lrs[0] must be positive and finite; got lrs[0]=-0.1" in result.stderr


def test_values_on_the_command_line_are_python_literals_or_strings():
    assert runner.parse_value("[0.1, 0.2]") == [0.1, 0.2]
    assert runner.parse_value("1e-3") == 1e-3
    assert runner.parse_value("100") == 100
    assert runner.parse_value("cuda") == "cuda"


# The front matter of a notebook with both profiles and nothing in them.
FRONT_MATTER = """\
---
jupytext:
  text_representation: {extension: .md, format_name: myst}
kernelspec: {display_name: Python 3, language: python, name: python3}
eomlib:
  profiles: {quick: {}, full: {}}
---
"""

BROKEN = (
    FRONT_MATTER
    + """
# Broken

```{code-cell} ipython3
:tags: [parameters]

profile = "quick"
```

```{code-cell} ipython3
x = 1
```

```{code-cell} ipython3
raise ValueError("this cell fails on purpose")
```
"""
)


@pytest.mark.slow
def test_a_failing_cell_names_the_notebook_and_the_cell(tmp_path):
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: executed/broken\n")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "broken.md").write_text(BROKEN)
    with pytest.raises(runner.RunError) as failure:
        runner.run(tmp_path, build=False)
    message = str(failure.value)
    assert "notebook 'broken' failed in cell" in message
    assert "ValueError: this cell fails on purpose" in message
    assert (tmp_path / "_build" / "failed" / "broken.ipynb").exists()


@pytest.mark.slow
def test_a_failed_run_keeps_the_last_good_execution(tmp_path):
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: executed/broken\n")
    (tmp_path / "notebooks").mkdir()
    good = BROKEN.replace('raise ValueError("this cell fails on purpose")', "y = 2")
    (tmp_path / "notebooks" / "broken.md").write_text(good)
    runner.run(tmp_path, build=False)
    executed = tmp_path / "executed" / "broken.ipynb"
    before = executed.read_bytes()

    (tmp_path / "notebooks" / "broken.md").write_text(BROKEN)
    with pytest.raises(runner.RunError):
        runner.run(tmp_path, build=False)
    assert executed.read_bytes() == before


def _mathjax_scripts(page: str) -> list[str]:
    """Where a built page loads MathJax from."""
    return re.findall(r'<script[^>]*\ssrc="([^"]*mathjax[^"]*)"', page, re.IGNORECASE)


@pytest.mark.slow
def test_the_quick_profile_executes_every_notebook_and_builds_the_book(built_book):
    root = built_book
    for name in NOTEBOOKS:
        executed = nbformat.read(root / "executed" / f"{name}.ipynb", as_version=4)
        outputs = [o for c in executed.cells for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.output_type == "error"]
        assert not [o for o in outputs if o.get("name") == "stderr"]
        assert any("image/png" in o.get("data", {}) for o in outputs)
        page = (root / "_build" / "html" / "executed" / f"{name}.html").read_text()
        assert "<img" in page and "Traceback" not in page
        assert all("_static/mathjax/" in src for src in _mathjax_scripts(page))

    assert (root / "_build" / "html" / "index.html").exists()
    intro = (root / "_build" / "html" / "book" / "intro.html").read_text()
    assert _mathjax_scripts(intro) == ["../_static/mathjax/tex-chtml.js"]
    assert (root / "_build" / "html" / "_static" / "mathjax" / "tex-chtml.js").exists()
    digits = (
        root / "_build" / "html" / "executed" / "gd_gf_eom_digits.html"
    ).read_text()
    assert "Measured in this run" in digits and "EoM₁ to GD" in digits
    assert (root / "figures" / "digits-distance-to-gd.pdf").exists()


def test_notebooks_are_myst_markdown_that_jupytext_reads():
    for name in NOTEBOOKS:
        path = ROOT / "notebooks" / f"{name}.md"
        assert (
            jupytext.read(path).metadata["jupytext"]["text_representation"][
                "format_name"
            ]
            == "myst"
        )


@pytest.mark.slow
def test_a_learning_rate_past_the_series_radius_is_reported_not_fatal(tmp_path):
    # lr * lambda_max is about 4 at lr = 4 on the digits MLP: the chapter says why
    # that learning rate stopped and goes on with the other two.
    root = _copy_book(tmp_path)
    runner.run(
        root,
        notebooks=["gd_gf_eom_digits"],
        overrides={"lrs": [0.05, 0.1, 4.0], "num_steps": 5},
        build=False,
    )
    executed = nbformat.read(root / "executed" / "gd_gf_eom_digits.ipynb", 4)
    outputs = [o for c in executed.cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(
        "".join(o.get("data", {}).get("text/markdown", "")) for o in outputs
    )
    assert "Stopped early, and left out of what follows" in text
    assert re.search(
        r"lr = 4: the EoM's counter-term series diverges at GD step 0", text
    )
    assert re.search(r"lr \* \|lambda\|_max = [3-5]\.\d+ >= 1", text)


def test_the_world_size_goes_to_the_notebooks_that_shard_their_data():
    plans = runner.plan(ROOT, "quick", None, {}, world_size=3)
    sharded = {name for name, p in plans.items() if "world_size" in p}
    assert {"gd_gf_eom_digits", "discretization_error", "invariant_layers"} <= sharded
    assert "figures" not in sharded and "performance" not in sharded
    assert all(plans[name]["world_size"] == 3 for name in sharded)
    assert runner.plan(ROOT, "quick", ["momentum"], {})["momentum"]["world_size"] == 1


def test_the_world_size_is_chosen_with_its_own_option():
    with pytest.raises(runner.RunError, match="--world-size"):
        runner.plan(ROOT, "quick", None, {"world_size": 2})
    with pytest.raises(runner.RunError, match="world_size must be an integer >= 1"):
        runner.run(ROOT, world_size=0, build=False)


def test_more_ranks_than_examples_stop_the_run_before_it_starts(tmp_path):
    root = _copy_book(tmp_path)
    with pytest.raises(runner.RunError, match="shard would be empty"):
        runner.run(
            root,
            notebooks=["momentum"],
            overrides={"num_samples": 3},
            world_size=4,
            build=False,
        )
    assert not (root / "executed").exists()


SHARDED = (
    FRONT_MATTER
    + """
# Sharded

```{code-cell} ipython3
:tags: [parameters]

world_size = 1
fail_on_rank = -1
profile = "quick"
```

```{code-cell} ipython3
import matplotlib.pyplot as plt
import eomlib

distributed = eomlib.distributed.init(world_size)
problem = eomlib.make_problem("mlp", num_samples=30, hidden=[3],
                              distributed=distributed)
if eomlib.distributed.rank() == fail_on_rank:
    raise ValueError(f"rank {fail_on_rank} fails on purpose")
loss = eomlib.cached("sharded-loss", {"n": 30},
                     lambda: problem.loss(problem.params).item())
fig = plt.figure()
eomlib.savefig(fig, "sharded-loss", parameters={"world_size": world_size})
print(f"ranks {eomlib.distributed.world_size()}, loss {loss!r}")
```
"""
)


def _sharded_book(root: Path) -> Path:
    (root / "_toc.yml").write_text("format: jb-book\nroot: executed/sharded\n")
    (root / "notebooks").mkdir()
    (root / "notebooks" / "sharded.md").write_text(SHARDED)
    return root


def _printed(executed: Path) -> str:
    notebook = nbformat.read(executed, as_version=4)
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


@pytest.mark.slow
def test_a_notebook_runs_on_two_ranks_through_torchrun(tmp_path, monkeypatch):
    root = _sharded_book(tmp_path)
    monkeypatch.setenv("EOMLIB_CACHE_DIR", str(tmp_path / "cache"))
    runner.run(root, build=False)
    alone = _printed(root / "executed" / "sharded.ipynb")
    runner.run(root, build=False, world_size=2)
    printed = _printed(root / "executed" / "sharded.ipynb")
    assert alone.startswith("ranks 1, loss ") and printed.startswith("ranks 2, loss ")
    loss_alone, loss_sharded = (
        float(text.split("loss ")[1]) for text in (alone, printed)
    )
    assert abs(loss_sharded - loss_alone) <= 1e-15 * loss_alone
    # rank 0 alone keeps the figure, and the cache holds one entry a world size
    manifest = json.loads((root / "figures" / "manifest.json").read_text())
    assert manifest["figures"]["sharded-loss"]["provenance"]["world_size"] == 2
    assert len(list((tmp_path / "cache" / "sharded-loss").glob("*.pt"))) == 2


@pytest.mark.slow
def test_a_rank_that_fails_fails_the_run_and_keeps_its_notebook(tmp_path):
    root = _sharded_book(tmp_path)
    with pytest.raises(runner.RunError, match="'sharded' failed on 2 ranks"):
        runner.run(root, build=False, world_size=2, overrides={"fail_on_rank": 1})
    assert (root / "_build" / "failed" / "sharded.rank1.ipynb").exists()
    # rank 0 waited for rank 1 in the loss's all-reduce, and stopped too
    assert not (root / "executed" / "sharded.ipynb").exists()
