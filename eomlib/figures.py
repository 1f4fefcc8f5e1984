"""One figure style for the whole book, one way to save a figure, and its plots.

:func:`savefig` writes ``NAME.pdf`` (fonts embedded as TrueType), ``NAME.png`` and
``NAME.json``, the record of what made the figure: its parameters, seed and device,
the library versions and the git commit. The files carry no time stamp, so the same
run writes the same bytes.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import matplotlib as mpl
import matplotlib.ticker
import numpy as np
from matplotlib import pyplot as plt

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
) -> dict[str, Path]:
    """Save ``fig`` as PDF and PNG under a stable ``name``, with its provenance.

    Args:
        fig: a matplotlib figure.
        name: lower-case letters, digits, ``_`` and ``-``; the same name overwrites.
        parameters: the parameters that made the figure (JSON-serialisable values).
        seed: the random seed, if any.
        device: the device the numbers were computed on.
        directory: where the three files go; created if missing.

    Returns:
        The paths written, by kind: ``{"pdf": ..., "png": ..., "json": ...}``.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"figure name must be lower-case letters, digits, '_' or '-'; got {name!r}"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {kind: directory / f"{name}.{kind}" for kind in ("pdf", "png", "json")}

    fig.savefig(paths["pdf"], metadata={"CreationDate": None, "Producer": None})
    fig.savefig(paths["png"], metadata={"Software": None})
    record = {
        "figure": name,
        "parameters": parameters,
        "seed": seed,
        "device": str(device) if device is not None else None,
        "python": platform.python_version(),
        "libraries": _versions(),
        "commit": _commit(),
    }
    paths["json"].write_text(json.dumps(record, indent=2, default=str) + "\n")
    return paths


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


def markdown_table(rows: list[dict], formats: dict[str, str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts with the same keys, in column order).

    Floats are written with three significant digits unless ``formats`` names a
    format for their column.
    """
    formats = formats or {}
    columns = list(rows[0])
    lines = [_table_row(columns), "|" + "---:|" * len(columns)]
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
