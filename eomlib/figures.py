"""One figure style for the whole book, one way to save a figure, and its plots.

:func:`savefig` writes ``NAME.pdf`` (fonts embedded as TrueType), ``NAME.png`` and
``NAME.json``, the record of what made the figure: its parameters, seed and device,
the library versions and the git commit. The files carry no time stamp, so the same
run writes the same bytes.

Every save also updates ``manifest.json`` in the same folder: one entry per figure,
by its stable identifier (the name), with the chapter that made it, the SHA-256 of
each file and the provenance record. The book's Figures page lists it
(:func:`load_manifest`). A name is an identifier for the whole book: a second chapter
that saves a figure under a name the first one owns is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import matplotlib as mpl
import matplotlib.ticker
import numpy as np
from matplotlib import pyplot as plt

from eomlib import distributed

STYLE = {
    "figure.figsize": (6.4, 4.0),
    "figure.dpi": 110,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.6,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
}

LIBRARIES = ("eomlib", "torch", "torchdiffeq", "numpy", "matplotlib", "scikit-learn")

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")

MANIFEST = "manifest.json"

# The runner sets this to the notebook it executes, so that a figure records its
# chapter without every cell passing it.
CHAPTER_VARIABLE = "EOMLIB_CHAPTER"


class DuplicateFigureError(ValueError):
    """Two chapters save a figure under the same identifier."""


def use_style() -> None:
    """Apply the book's style to every figure made after this call."""
    mpl.rcParams.update(STYLE)


def savefig(
    fig,
    name: str,
    *,
    parameters: dict,
    seed: int | None = None,
    device: str | None = None,
    directory: str | Path = "figures",
    chapter: str | None = None,
) -> dict[str, Path]:
    """Save ``fig`` as PDF and PNG under a stable ``name``, with its provenance.

    Args:
        fig: a matplotlib figure.
        name: lower-case letters, digits, ``_`` and ``-``; the same name overwrites.
        parameters: the parameters that made the figure (JSON-serialisable values).
        seed: the random seed, if any.
        device: the device the numbers were computed on.
        directory: where the three files and the manifest go; created if missing.
        chapter: the notebook that made the figure, by file stem; by default the
            one the runner is executing (``$EOMLIB_CHAPTER``), else unknown.

    Returns:
        The paths written, by kind: ``{"pdf": ..., "png": ..., "json": ...}``. On a
        rank other than 0 of a distributed run nothing is written: rank 0 saves it.

    Raises:
        ValueError: the name is not a stable identifier.
        DuplicateFigureError: another chapter already owns ``name`` in the manifest;
            nothing is written.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"figure name must be lower-case letters, digits, '_' or '-'; got {name!r}"
        )
    chapter = chapter or os.environ.get(CHAPTER_VARIABLE) or None
    directory = Path(directory)
    if distributed.rank() != 0:
        # Every rank of a distributed run draws the figure; rank 0 keeps it.
        return {kind: directory / f"{name}.{kind}" for kind in ("pdf", "png", "json")}
    _check_unique(load_manifest(directory), name, chapter)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {kind: directory / f"{name}.{kind}" for kind in ("pdf", "png", "json")}

    fig.savefig(paths["pdf"], metadata={"CreationDate": None, "Producer": None})
    fig.savefig(paths["png"], metadata={"Software": None})
    record = {
        "figure": name,
        "chapter": chapter,
        "parameters": parameters,
        "seed": seed,
        "device": str(device) if device is not None else None,
        "world_size": distributed.world_size(),
        "python": platform.python_version(),
        "libraries": _versions(),
        "commit": _commit(),
    }
    paths["json"].write_text(json.dumps(record, indent=2, default=str) + "\n")
    _add_to_manifest(directory, name, chapter, paths)
    return paths


def load_manifest(directory: str | Path = "figures") -> dict[str, dict]:
    """The figures saved under ``directory``, by identifier; empty if none.

    Each entry has the ``chapter`` that made the figure (``None`` if unknown), its
    ``files`` (``{"pdf": {"path": "NAME.pdf", "sha256": ...}, ...}``, paths relative
    to ``directory``) and its ``provenance``, the record :func:`savefig` wrote to
    ``NAME.json``.
    """
    path = Path(directory) / MANIFEST
    if not path.exists():
        return {}
    return json.loads(path.read_text())["figures"]


def verify_manifest(directory: str | Path = "figures") -> dict[str, list[str]]:
    """The files of each figure that are missing or differ from their SHA-256.

    Returns:
        ``{name: ["NAME.png", ...]}`` for every figure with a bad file; empty when
        every file on disk is the one the manifest records.
    """
    directory = Path(directory)
    bad = {}
    for name, entry in load_manifest(directory).items():
        wrong = [
            file["path"]
            for file in entry["files"].values()
            if not (directory / file["path"]).is_file()
            or _sha256(directory / file["path"]) != file["sha256"]
        ]
        if wrong:
            bad[name] = wrong
    return bad


@contextlib.contextmanager
def chapter_run(directory: str | Path, chapter: str):
    """Execute ``chapter`` afresh: its figures leave the manifest while it runs.

    Inside the block ``$EOMLIB_CHAPTER`` names the chapter, and the manifest keeps
    only the figures the chapter saves again, so one it no longer makes is not
    listed. If the block raises, the chapter's previous entries come back.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    previous = {n: e for n, e in manifest.items() if e["chapter"] == chapter}
    if previous:
        _write_manifest(
            directory, {n: e for n, e in manifest.items() if n not in previous}
        )
    saved = os.environ.get(CHAPTER_VARIABLE)
    os.environ[CHAPTER_VARIABLE] = chapter
    try:
        yield
    except BaseException:
        if previous:
            current = load_manifest(directory)
            current.update({n: e for n, e in previous.items() if n not in current})
            _write_manifest(directory, current)
        raise
    finally:
        if saved is None:
            os.environ.pop(CHAPTER_VARIABLE, None)
        else:
            os.environ[CHAPTER_VARIABLE] = saved


def _check_unique(manifest: dict, name: str, chapter: str | None) -> None:
    owner = manifest.get(name, {}).get("chapter")
    if owner is not None and chapter is not None and owner != chapter:
        raise DuplicateFigureError(
            f"figure identifier {name!r} already belongs to chapter {owner!r}; "
            f"chapter {chapter!r} must save its figure under another name"
        )


def _add_to_manifest(
    directory: Path, name: str, chapter: str | None, paths: dict[str, Path]
) -> None:
    manifest = load_manifest(directory)
    _check_unique(manifest, name, chapter)
    manifest[name] = {
        "chapter": chapter,
        "files": {
            kind: {"path": path.name, "sha256": _sha256(path)}
            for kind, path in paths.items()
        },
        "provenance": json.loads(paths["json"].read_text()),
    }
    _write_manifest(directory, manifest)


def _write_manifest(directory: Path, figures: dict) -> None:
    # Sorted keys and no time stamp: the same figures give the same bytes. Written
    # beside the target and renamed over it, so a reader never sees half a file.
    text = json.dumps({"figures": figures}, indent=2, sort_keys=True) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=directory, prefix=f".{MANIFEST}.", suffix=".tmp"
    )
    try:
        os.fchmod(handle, 0o644)
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, directory / MANIFEST)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    versions = {}
    for library in LIBRARIES:
        try:
            versions[library] = metadata.version(library)
        except metadata.PackageNotFoundError:
            versions[library] = "not installed"
    return versions


def _commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def order_label(order: int) -> str:
    """``GF`` for order 0, ``EoM_K`` (as math text) for order K."""
    return "GF" if order == 0 else f"EoM$_{order}$"


def fit_slope(x, y, floor: float = 0.0) -> float:
    """The least-squares slope of ``log y`` against ``log x``, over the points with
    ``y > floor`` (pass a multiple of the round-off floor to keep noise out); ``nan``
    when fewer than two points remain."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = y > floor
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def plot_error_against_lr(ax, lrs, errors: dict, *, floor: float, title: str) -> None:
    """Log-log error against the learning rate, one line per order, with the
    round-off floor as a grey band."""
    markers = "osD^v<>"
    for order, values in sorted(errors.items()):
        ax.loglog(lrs, values, marker=markers[order % 7], label=order_label(order))
    ax.axhspan(floor / 10, floor, color="0.85", label="round-off")
    ax.set_xticks(lrs, labels=[f"{lr:g}" for lr in lrs])
    ax.xaxis.set_minor_locator(mpl.ticker.NullLocator())
    ax.set(xlabel="learning rate lr", ylabel="distance to GD", title=title)


def plot_distance_to_gd(comparisons) -> plt.Figure:
    """Two panels from a list of :class:`eomlib.flows.Comparison`.

    Left: the distance of each flow to the GD iterates against the step, one colour
    per learning rate, one line style per order. Right: the distance after one step
    (the local error) against the learning rate, with its fitted log-log slope.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(comparisons)))
    orders = sorted(comparisons[0].distances)
    styles = ["-", "--", ":", "-."]

    for colour, comparison in zip(colours, comparisons):
        for order in orders:
            steps = np.arange(len(comparison.distances[order]))
            left.semilogy(
                steps[1:],
                comparison.distances[order][1:].cpu(),
                styles[order % 4],
                color=colour,
                label=f"{order_label(order)}, lr={comparison.lr:g}",
            )
    left.set(xlabel="step k", ylabel="distance to GD at t = k lr")
    left.legend(ncol=len(orders), fontsize=7)

    lrs = [c.lr for c in comparisons]
    for order in orders:
        local = [c.distances[order][1].item() for c in comparisons]
        right.loglog(
            lrs,
            local,
            styles[order % 4],
            marker="o",
            color="k",
            label=f"{order_label(order)}: slope {fit_slope(lrs, local):.2f}",
        )
    right.set_xticks(lrs, labels=[f"{lr:g}" for lr in lrs])
    right.xaxis.set_minor_locator(mpl.ticker.NullLocator())
    right.set(xlabel="learning rate lr", ylabel="distance to GD after one step")
    right.legend()
    return fig


def markdown_table(
    rows: list[dict], formats: dict[str, str] | None = None, *, align: str = "right"
) -> str:
    """A Markdown table of ``rows`` (dicts with the same keys, in column order).

    Floats are written with three significant digits unless ``formats`` names a
    format for their column. Columns are aligned right (numbers) or, with
    ``align="left"``, left (text).
    """
    formats = formats or {}
    columns = list(rows[0])
    rule = {"right": "---:|", "left": ":---|"}[align]
    lines = [_table_row(columns), "|" + rule * len(columns)]
    for row in rows:
        cells = [
            format(row[c], formats.get(c, ".3g" if isinstance(row[c], float) else ""))
            for c in columns
        ]
        lines.append(_table_row(cells))
    return "\n".join(lines)


def _table_row(cells: list[str]) -> str:
    # A bar inside a cell (|w|², |diff|) would end the cell: escape it.
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
