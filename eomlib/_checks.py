"""Input checks shared by the public functions and the notebook runner.

Each check raises before any long computation starts, and its message names the
parameter, the value given and what is allowed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("auto", "cpu", "cuda")


def check_lr(lr, name: str = "lr") -> float:
    """A learning rate: a finite real number greater than zero."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{name} must be a positive real number; got {lr!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{name} must be positive and finite; got {name}={lr!r}")
    return float(lr)


def check_nonnegative(value, name: str) -> float:
    """A finite real number, zero or more (a weight decay, say)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0; got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0; got {name}={value!r}")
    return float(value)


def check_fraction(value, name: str) -> float:
    """A real number in ``[0, 1)``: a momentum, an averaging coefficient."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1); got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1); got {name}={value!r}")
    return float(value)


def check_open_fraction(value, name: str) -> float:
    """A real number strictly between 0 and 1: a share of a bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in (0, 1); got {value!r}")
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1); got {name}={value!r}")
    return float(value)


def check_optimizer_keywords(
    name: str, hyper: dict, modelled, *, fixed: dict, ignored=()
) -> dict:
    """An optimizer's keyword arguments for its modified field: names outside
    ``modelled``, ``fixed`` and ``ignored`` and a missing ``lr`` are refused with what
    is allowed, and an option of ``fixed`` only at its value there. Returns the
    ``modelled`` ones.
    """
    allowed = [*modelled, *fixed, *ignored]
    unknown = sorted(set(hyper) - set(allowed))
    if unknown:
        raise TypeError(
            f"{name} has no hyper-parameter {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}"
        )
    if "lr" not in hyper:
        raise TypeError(f"the {name} field needs lr=...; got {sorted(hyper)}")
    for option, value in fixed.items():
        if option in hyper and hyper[option] != value:
            raise ValueError(
                f"{option}={hyper[option]!r} is not modelled by the {name} field; "
                f"allowed: {option}={value!r}"
            )
    return {key: value for key, value in hyper.items() if key in modelled}


def check_lrs(lrs, name: str = "lrs") -> list[float]:
    """A non-empty list of learning rates."""
    if isinstance(lrs, (str, bytes)) or not isinstance(lrs, Iterable):
        raise TypeError(f"{name} must be a list of positive numbers; got {lrs!r}")
    lrs = list(lrs)
    if not lrs:
        raise ValueError(f"{name} must hold at least one learning rate; got []")
    return [check_lr(lr, f"{name}[{i}]") for i, lr in enumerate(lrs)]


def check_int(value, name: str, minimum: int = 0) -> int:
    """An integer no smaller than ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {name}={value}")
    return int(value)


def check_choice(value, name: str, allowed: Iterable[str]) -> str:
    """One of a fixed set of names."""
    allowed = sorted(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    return value


def resolve_dtype(dtype) -> torch.dtype:
    """``'float32'``/``'float64'`` or a floating torch dtype, as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point; got dtype={dtype}")
        return dtype
    return DTYPES[check_choice(dtype, "dtype", DTYPES)]


def resolve_device(device) -> torch.device:
    """``'auto'`` (CUDA when present, else CPU), ``'cpu'`` or ``'cuda'``."""
    if isinstance(device, torch.device):
        device = device.type
    check_choice(device, "device", DEVICES)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' was asked for but this machine has no CUDA GPU visible to "
            "torch; allowed here: 'auto' or 'cpu'"
        )
    return torch.device(device)
