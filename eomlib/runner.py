"""Execute the book's notebooks with a parameter profile, then render the book.

    python -m eomlib.runner                      # every notebook, quick profile, HTML
    python -m eomlib.runner --profile full       # the GPU-sized parameters
    python -m eomlib.runner --notebook gd_gf_eom_digits -p lrs "[0.05, 0.1]" --no-build

Each notebook under ``notebooks/`` is a MyST markdown file (jupytext) with a cell
tagged ``parameters`` and, in its front matter, the named profiles::

    eomlib:
      profiles:
        quick: {num_steps: 100}
        full: {num_steps: 2000, device: cuda}

Notebooks run in the order of ``_toc.yml`` (any it does not list come last, by
name), so a page that reads what the chapters made, the Figures page, comes after
them. A run takes the parameters cell's defaults, then the profile, then ``-p``
overrides (each goes to the notebooks that declare that parameter); it checks every
name, type and value before any notebook starts. papermill executes each notebook
into ``executed/NAME.ipynb`` (where the book reads it), with ``$EOMLIB_CHAPTER``
naming it so that its figures enter ``figures/manifest.json`` under its name, and
Jupyter Book renders HTML into ``_build/html`` without executing anything again.

``--world-size N`` runs each notebook that declares a ``world_size`` parameter on N
ranks that shard its data (:mod:`eomlib.distributed`): the runner starts
``torchrun`` for that notebook, every rank executes it with papermill, and rank 0's
execution is the one kept, with its figures. A notebook without the parameter runs
in one process as before. Under a ``torchrun`` of the user's own, each rank's
runner executes the notebooks it is given, all of which must declare the parameter.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat
import papermill
import yaml
from papermill.exceptions import PapermillExecutionError

from eomlib import figures
from eomlib._checks import check_int
from eomlib.parameters import PROFILES, check_parameters

log = logging.getLogger("eomlib.runner")

KERNEL_NAME = "eomlib"

# The parameter through which a notebook takes the number of ranks; the runner sets
# it from --world-size.
WORLD_SIZE = "world_size"


class RunError(RuntimeError):
    """A run that cannot start, or a notebook that failed; the message says which."""


def notebook_names(root: Path) -> list[str]:
    """The notebooks under ``root/notebooks``, by file stem, in execution order.

    That is the order of ``_toc.yml``; a notebook it does not list comes after
    those it does, by name.
    """
    return in_toc_order(root, [p.stem for p in (root / "notebooks").glob("*.md")])


def toc_order(root: Path) -> list[str]:
    """The executed notebooks ``root/_toc.yml`` lists, by stem, in reading order."""
    path = Path(root) / "_toc.yml"
    if not path.exists():
        return []
    files = []

    def visit(node) -> None:
        if isinstance(node, dict):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    files.append(node[key])
            for value in node.values():
                if isinstance(value, (dict, list)):
                    visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(yaml.safe_load(path.read_text()))
    stems = [Path(f).with_suffix("").name for f in files if f.startswith("executed/")]
    return list(dict.fromkeys(stems))


def in_toc_order(root: Path, names: list[str]) -> list[str]:
    """``names`` in the order of ``_toc.yml``, the ones it does not list last."""
    order = {name: index for index, name in enumerate(toc_order(root))}
    return sorted(set(names), key=lambda name: (order.get(name, len(order)), name))


def chapter_labels(root: Path) -> dict[str, str]:
    """The label at the top of each notebook (``(digits)=``), by file stem.

    A page that names a chapter cross-references it with ``{ref}`` and this label;
    a notebook without one is left out.
    """
    labels = {}
    for path in sorted((Path(root) / "notebooks").glob("*.md")):
        for line in path.read_text().splitlines():
            label = re.fullmatch(r"\(([\w.:-]+)\)=", line.strip())
            if label:
                labels[path.stem] = label.group(1)
                break
    return labels


def read_notebook(root: Path, name: str) -> nbformat.NotebookNode:
    path = root / "notebooks" / f"{name}.md"
    if not path.exists():
        known = ", ".join(notebook_names(root)) or "none"
        raise RunError(f"unknown notebook {name!r}; notebooks here: {known}")
    return jupytext.read(path)


def declared_parameters(notebook: nbformat.NotebookNode, name: str) -> dict:
    """The defaults of the cell tagged ``parameters``, as Python values."""
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise RunError(
            f"notebook {name!r} must have exactly one cell tagged 'parameters'"
        )
    defaults = {}
    for statement in ast.parse(cells[0].source).body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            target = statement.target
        else:
            raise RunError(
                f"notebook {name!r}: its parameters cell may only assign values"
            )
        defaults[target.id] = ast.literal_eval(statement.value)
    return defaults


def resolve_parameters(
    notebook: nbformat.NotebookNode, name: str, profile: str, overrides: dict
) -> dict:
    """Defaults, then the profile, then ``overrides``; every value checked."""
    if profile not in PROFILES:
        raise RunError(f"unknown profile {profile!r}; allowed: {', '.join(PROFILES)}")
    defaults = declared_parameters(notebook, name)
    profiles = notebook.metadata.get("eomlib", {}).get("profiles", {})
    if profile not in profiles:
        raise RunError(f"notebook {name!r} declares no {profile!r} profile")

    parameters = dict(defaults)
    for source, values in (
        (f"profile {profile!r}", profiles[profile]),
        ("-p", overrides),
    ):
        if "profile" in values:
            raise RunError(
                f"the profile is chosen with --profile, not set from {source}"
            )
        for key, value in values.items():
            _check_type(name, source, key, value, defaults)
        # A profile value that -p replaces is never used, so it is not checked:
        # `--profile full -p device cpu` runs on a machine without a GPU.
        used = {
            key: value
            for key, value in values.items()
            if values is overrides or key not in overrides
        }
        _check_values(name, source, used)
        parameters.update(values)
    parameters["profile"] = profile
    _check_values(name, "the combined parameters", parameters)
    return parameters


def _check_values(name: str, source: str, values: dict) -> None:
    try:
        check_parameters(**values)
    except (TypeError, ValueError, ImportError) as error:
        raise RunError(
            f"notebook {name!r}: bad parameter from {source}: {error}"
        ) from error


def _check_type(name: str, source: str, key: str, value, defaults: dict) -> None:
    if key not in defaults:
        raise RunError(
            f"notebook {name!r} has no parameter {key!r} (from {source}); its "
            f"parameters are: {', '.join(defaults)}"
        )
    default = defaults[key]
    if default is None or value is None:
        return
    expected = type(default)
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))  # an int is a fine float
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise RunError(
            f"notebook {name!r}: parameter {key!r} (from {source}) must be of type "
            f"{expected.__name__} like its default {default!r}; got {value!r} "
            f"({type(value).__name__})"
        )


def parse_value(text: str):
    """A command-line value: a Python literal (``1e-3``, ``[0.1, 0.2]``, ``None``),
    or else the text itself as a string (``cuda``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def execute(
    root: Path,
    name: str,
    parameters: dict,
    *,
    progress: bool = False,
    rank: int = 0,
    rendezvous: str | None = None,
) -> Path | None:
    """Run one notebook with papermill into ``root/executed/NAME.ipynb``; that path.

    A rank other than 0 of a distributed run executes into a scratch folder, keeps
    nothing (None) and leaves the figures to rank 0; ``rendezvous`` names this
    execution's process group (see :func:`eomlib.distributed.init`).
    """
    notebook = read_notebook(root, name)
    notebook.metadata["kernelspec"] = {
        "name": KERNEL_NAME,
        "display_name": "Python 3 (eomlib)",
        "language": "python",
    }
    output = root / "executed" / f"{name}.ipynb"
    output.parent.mkdir(exist_ok=True)

    suffix = "" if rank == 0 else f".rank{rank}"
    start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory() as scratch,
        _kernelspec(),
        _environment(EOMLIB_RENDEZVOUS=rendezvous),
        figures.chapter_run(root / "figures", name)
        if rank == 0
        else _environment(**{figures.CHAPTER_VARIABLE: name}),
    ):
        source = Path(scratch) / f"{name}.ipynb"
        partial = Path(scratch) / f"{name}.executed.ipynb"
        nbformat.write(notebook, source)
        try:
            papermill.execute_notebook(
                str(source),
                str(partial),
                parameters=parameters,
                kernel_name=KERNEL_NAME,
                language="python",
                cwd=str(root),
                progress_bar=progress,
            )
        except PapermillExecutionError as error:
            # The last good execution stays where the book reads it.
            failed = root / "_build" / "failed" / f"{name}{suffix}.ipynb"
            failed.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(partial, failed)
            where = f" on rank {rank}" if rendezvous is not None else ""
            raise RunError(
                f"notebook {name!r} failed{where} in cell {error.cell_index} "
                f"(execution count {error.exec_count}): {error.ename}: {error.evalue}\n"
                f"the partly executed notebook is {failed}"
            ) from error
        if rank != 0:
            return None
        staged = output.with_suffix(".ipynb.partial")
        shutil.copyfile(partial, staged)
        os.replace(staged, output)
    log.info("executed %s in %.1f s", name, time.perf_counter() - start)
    return output


@contextlib.contextmanager
def _environment(**variables):
    """Set the environment variables that are not None, and restore them after."""
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update({k: v for k, v in variables.items() if v is not None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _kernelspec():
    """A kernelspec for this very interpreter, found first through JUPYTER_PATH.

    A kernel named ``python3`` may point at another environment; this one cannot.
    """
    previous = os.environ.get("JUPYTER_PATH")
    with tempfile.TemporaryDirectory() as directory:
        spec = Path(directory) / "kernels" / KERNEL_NAME
        spec.mkdir(parents=True)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        (spec / "kernel.json").write_text(
            json.dumps(
                {
                    "argv": argv,
                    "display_name": "Python 3 (eomlib)",
                    "language": "python",
                }
            )
        )
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            filter(None, [directory, previous])
        )
        try:
            yield
        finally:
            if previous is None:
                del os.environ["JUPYTER_PATH"]
            else:
                os.environ["JUPYTER_PATH"] = previous


def build_book(root: Path) -> Path:
    """Render the executed notebooks and the prose into ``root/_build/html``."""
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    command = [
        str(jupyter_book) if jupyter_book.exists() else "jupyter-book",
        "build",
        str(root),
        "--builder",
        "html",
        "--all",
        "-W",
        "--keep-going",
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=root)
    if result.returncode != 0:
        raise RunError(f"jupyter-book build failed (exit code {result.returncode})")
    log.info("built the book in %.1f s", time.perf_counter() - start)
    return root / "_build" / "html" / "index.html"


def run(
    root: Path,
    *,
    profile: str = "quick",
    notebooks: list[str] | None = None,
    overrides: dict | None = None,
    build: bool = True,
    progress: bool = False,
    world_size: int | None = None,
) -> None:
    """Check every notebook's parameters, execute them all, then build the book.

    ``world_size`` above 1 runs the notebooks that declare it on that many ranks;
    under ``torchrun`` it defaults to (and must equal) ``$WORLD_SIZE``.
    """
    root = Path(root).resolve()
    ranks = _ranks_of_this_run(world_size)
    plans = plan(root, profile, notebooks, overrides, world_size=ranks)
    if _under_torchrun():
        _run_as_rank(root, plans, build=build, progress=progress)
        return
    for name, parameters in plans.items():
        if ranks > 1 and WORLD_SIZE in parameters:
            log.info("executing %s on %d ranks with %s", name, ranks, parameters)
            _execute_on_ranks(root, name, profile, overrides or {}, ranks)
        else:
            log.info("executing %s with %s", name, parameters)
            execute(root, name, parameters, progress=progress)
    if build:
        index = build_book(root)
        log.info("the book is at %s", index)


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ


def _ranks_of_this_run(world_size: int | None) -> int:
    if _under_torchrun():
        started = int(os.environ["WORLD_SIZE"])
        if world_size not in (None, started):
            raise RunError(
                f"--world-size {world_size}, but torchrun started {started} ranks"
            )
        return started
    if world_size is None:
        return 1
    try:
        return check_int(world_size, "world_size", minimum=1)
    except (TypeError, ValueError) as error:
        raise RunError(str(error)) from error


def _run_as_rank(root: Path, plans: dict, *, build: bool, progress: bool) -> None:
    """One rank's part of a run that torchrun started: every notebook, in order,
    each with a process group of its own."""
    rank = int(os.environ["RANK"])
    alone = [name for name, parameters in plans.items() if WORLD_SIZE not in parameters]
    if alone:
        raise RunError(
            f"under torchrun every notebook runs on all ranks, and "
            f"{', '.join(alone)} {'declares' if len(alone) == 1 else 'declare'} no "
            f"{WORLD_SIZE!r} parameter; run {'it' if len(alone) == 1 else 'them'} "
            f"without torchrun"
        )
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    for index, (name, parameters) in enumerate(plans.items()):
        log.info("rank %d executing %s with %s", rank, name, parameters)
        execute(
            root,
            name,
            parameters,
            progress=progress and rank == 0,
            rank=rank,
            rendezvous=f"{run_id}-{index}-{name}",
        )
    if build and rank == 0:
        log.info("the book is at %s", build_book(root))


def _execute_on_ranks(
    root: Path, name: str, profile: str, overrides: dict, world_size: int
) -> None:
    """Execute one notebook on ``world_size`` ranks that torchrun starts."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={world_size}",
        "-m",
        "eomlib.runner",
        "--root",
        str(root),
        "--profile",
        profile,
        "--notebook",
        name,
        "--world-size",
        str(world_size),
        "--no-build",
    ]
    for key, value in overrides.items():
        command += ["-p", key, repr(value)]
    # The ranks share the machine's cores, unless told otherwise.
    threads = str(max(1, (os.cpu_count() or 1) // world_size))
    environment = {"OMP_NUM_THREADS": threads} | dict(os.environ)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=root, env=environment)
    if result.returncode != 0:
        raise RunError(
            f"notebook {name!r} failed on {world_size} ranks (torchrun exited with "
            f"{result.returncode}); the failing rank's error is printed above"
        )
    log.info(
        "executed %s on %d ranks in %.1f s",
        name,
        world_size,
        time.perf_counter() - start,
    )


def plan(
    root: Path,
    profile: str,
    notebooks: list[str] | None,
    overrides: dict | None,
    *,
    world_size: int = 1,
) -> dict[str, dict]:
    """The checked parameters of each notebook to run, before anything runs.

    A notebook that declares ``world_size`` gets the run's; the others run in one
    process.
    """
    if not (root / "_toc.yml").exists():
        raise RunError(f"{root} is not the book's root: it has no _toc.yml")
    names = in_toc_order(root, notebooks) if notebooks else notebook_names(root)
    notebooks_read = {name: read_notebook(root, name) for name in names}
    declared = {
        name: declared_parameters(nb, name) for name, nb in notebooks_read.items()
    }

    # An override goes to every notebook that declares it; one that none declares is
    # a typo.
    overrides = overrides or {}
    if WORLD_SIZE in overrides:
        raise RunError(
            f"the number of ranks is chosen with --world-size, not with -p "
            f"{WORLD_SIZE}: the runner starts the ranks"
        )
    known = sorted(set().union(*declared.values()))
    for key in overrides:
        if key not in known:
            raise RunError(
                f"no notebook here has a parameter {key!r} (from -p); the "
                f"parameters are: {', '.join(known)}"
            )
    plans = {
        name: resolve_parameters(
            notebook,
            name,
            profile,
            {k: v for k, v in overrides.items() if k in declared[name]}
            | ({WORLD_SIZE: world_size} if WORLD_SIZE in declared[name] else {}),
        )
        for name, notebook in notebooks_read.items()
    }
    return plans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eomlib.runner", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--profile", default="quick", help="quick (CPU) or full (GPU)")
    parser.add_argument(
        "--notebook", action="append", help="run only this notebook (repeatable)"
    )
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="override a parameter; VALUE is a Python literal or a string",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks for the notebooks that shard their data (default 1; under "
        "torchrun, its number of processes)",
    )
    parser.add_argument("--root", default=".", help="the book's root (has _toc.yml)")
    parser.add_argument("--no-build", action="store_true", help="execute only")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    overrides = {key: parse_value(value) for key, value in args.parameter}
    try:
        run(
            Path(args.root),
            profile=args.profile,
            notebooks=args.notebook,
            overrides=overrides,
            build=not args.no_build,
            progress=sys.stderr.isatty(),
            world_size=args.world_size,
        )
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
