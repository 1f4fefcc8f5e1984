"""The project's own files: conda and pip name the same dependencies, and the
notebooks' code is clean."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]

# conda-forge spells a few packages differently from PyPI.
CONDA_TO_PIP = {"pytorch": "torch"}
CONDA_ONLY = {"python", "pip"}


def _split(requirement: str) -> tuple[str, str]:
    name, spec = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", requirement.strip()).groups()
    return name.lower().replace("_", "-"), spec.replace(" ", "")


def _pyproject() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return dict(_split(r) for r in requirements)


def _environment() -> dict[str, str]:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    requirements = {}
    for entry in environment["dependencies"]:
        entries = entry["pip"] if isinstance(entry, dict) else [entry]
        for requirement in entries:
            if requirement.startswith("-e"):
                continue
            name, spec = _split(requirement)
            if name not in CONDA_ONLY:
                requirements[CONDA_TO_PIP.get(name, name)] = spec
    return requirements


def test_environment_yml_and_pyproject_name_the_same_dependencies():
    assert _environment() == _pyproject()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci


@pytest.mark.parametrize(
    "notebook", sorted(p.name for p in (ROOT / "notebooks").glob("*.md"))
)
def test_notebook_code_has_no_unused_or_undefined_names(notebook, tmp_path):
    jupytext = pytest.importorskip("jupytext")
    script = tmp_path / "notebook.py"
    jupytext.write(jupytext.read(ROOT / "notebooks" / notebook), script, fmt="py")
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run(
        [str(ruff), "check", "--isolated", "--select", "F", str(script)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout
