"""Data sets, loaded whole: the EoM describes full-batch gradient descent.

``digits`` (scikit-learn's 1,797 handwritten 8x8 digits) ships inside a package and
is the default. ``mnist`` and ``cifar10`` come through torchvision and need a network
the first time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eomlib._checks import check_choice, check_int, resolve_device, resolve_dtype


@dataclass(frozen=True)
class Dataset:
    """Inputs ``X`` (one flattened example a row) and integer labels ``y``."""

    name: str
    X: torch.Tensor
    y: torch.Tensor
    num_classes: int

    @property
    def in_features(self) -> int:
        return self.X.shape[1]

    def __len__(self) -> int:
        return self.X.shape[0]


def _digits(root: Path) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data / 16.0, digits.target


def check_available(name: str) -> str:
    """A known data set whose loader can run here (torchvision for the larger ones)."""
    check_choice(name, "dataset", DATASETS)
    if name in NEEDS_TORCHVISION and importlib.util.find_spec("torchvision") is None:
        raise ImportError(
            f"dataset {name!r} needs torchvision, which is not installed; install it "
            "with `pip install torchvision` or use dataset='digits'"
        )
    return name


def _torchvision(name: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}
    try:
        data = cls[name](root=str(root), train=True, download=True)
    except Exception as error:
        raise RuntimeError(
            f"could not load {name!r} into {root} (it downloads on first use and needs "
            f"a network): {error}; dataset='digits' needs no download"
        ) from error
    X = np.asarray(data.data, dtype=np.float64).reshape(len(data.targets), -1) / 255.0
    return X, np.asarray(data.targets)


NEEDS_TORCHVISION = ("mnist", "cifar10")

DATASETS = {
    "digits": _digits,
    "mnist": lambda root: _torchvision("mnist", root),
    "cifar10": lambda root: _torchvision("cifar10", root),
}


def load_dataset(
    name: str = "digits",
    *,
    num_samples: int | None = None,
    dtype="float64",
    device="cpu",
    root: str | Path = "~/.cache/eomlib",
) -> Dataset:
    """Load a data set whole onto ``device``.

    Args:
        name: one of ``DATASETS``: ``"digits"`` (default, no download), ``"mnist"``,
            ``"cifar10"``.
        num_samples: keep the first ``num_samples`` examples; ``None`` keeps all.
        dtype: floating type of the inputs, ``"float32"`` or ``"float64"``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        root: where downloaded data sets are kept.
    """
    check_available(name)
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    if num_samples is not None:
        check_int(num_samples, "num_samples", minimum=1)

    X, y = DATASETS[name](Path(root).expanduser())
    X, y = X[:num_samples], y[:num_samples]
    return Dataset(
        name=name,
        X=torch.as_tensor(X, dtype=dtype, device=device),
        y=torch.as_tensor(y, dtype=torch.long, device=device),
        num_classes=int(y.max()) + 1,
    )
