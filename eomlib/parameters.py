"""Checks of the notebook parameters that the book's chapters share.

The runner applies them to every parameter set before papermill starts, and each
notebook applies them again in its first cell, so a bad value stops the run at once
with a message naming the parameter, the value and what is allowed.
"""

from __future__ import annotations

from eomlib import _checks, distributed
from eomlib.data import check_available
from eomlib.flows import check_tolerances
from eomlib.models import ACTIVATIONS, MODELS
from eomlib.optimizers.minibatch import check_batch_size, check_confidence

PROFILES = ("quick", "full")

CHECKS = {
    "lr": _checks.check_lr,
    "lrs": _checks.check_lrs,
    "num_steps": lambda v: _checks.check_int(v, "num_steps", minimum=1),
    "num_samples": lambda v: v if v is None else _checks.check_int(v, "num_samples", 1),
    "seed": lambda v: _checks.check_int(v, "seed"),
    "device": _checks.resolve_device,
    "dtype": _checks.resolve_dtype,
    "dataset": check_available,
    "orders": lambda v: [_checks.check_int(k, "order") for k in v],
    "rtol": lambda v: _checks.check_lr(v, "rtol"),
    "model": lambda v: _checks.check_choice(v, "model", MODELS),
    "activation": lambda v: _checks.check_choice(v, "activation", ACTIVATIONS),
    "hidden": lambda v: [_checks.check_int(w, "hidden width", 1) for w in v],
    "profile": lambda v: _checks.check_choice(v, "profile", PROFILES),
    "channels": lambda v: _checks.check_int(v, "channels", minimum=1),
    "blocks": lambda v: _checks.check_int(v, "blocks", minimum=1),
    "table_steps": lambda v: [_checks.check_int(k, "table step") for k in v],
    "decay_steps": lambda v: _checks.check_int(v, "decay_steps", minimum=1),
    "weight_decay": lambda v: _checks.check_lr(v, "weight_decay"),
    # The optimizers beyond plain GD.
    "momentum": lambda v: _checks.check_fraction(v, "momentum"),
    "momenta": lambda v: [_checks.check_fraction(b, "momentum") for b in v],
    "dampening": lambda v: _checks.check_fraction(v, "dampening"),
    "betas": lambda v: [
        _checks.check_fraction(b, f"betas[{i}]") for i, b in enumerate(v)
    ],
    "eps": lambda v: _checks.check_lr(v, "eps"),
    "batch_size": lambda v: _checks.check_int(v, "batch_size", minimum=1),
    "num_shuffles": lambda v: _checks.check_int(v, "num_shuffles", minimum=1),
    "num_epochs": lambda v: _checks.check_int(v, "num_epochs", minimum=1),
    "batch_sizes": lambda v: _check_batch_sizes(v),
    "sweep_shuffles": lambda v: _checks.check_int(v, "sweep_shuffles", minimum=1),
    "confidence": check_confidence,
    "tiny_samples": lambda v: _checks.check_int(v, "tiny_samples", minimum=1),
    "tiny_batch_size": lambda v: _checks.check_int(v, "tiny_batch_size", minimum=1),
    "tiny_hidden": lambda v: [_checks.check_int(w, "hidden width", 1) for w in v],
    "lrs_exact": lambda v: _checks.check_lrs(v, "lrs_exact"),
    "lr_fractions": lambda v: [
        _checks.check_open_fraction(f, f"lr_fractions[{i}]") for i, f in enumerate(v)
    ],
    "transient_fraction": lambda v: _checks.check_open_fraction(
        v, "transient_fraction"
    ),
    "penalty_fraction": lambda v: _checks.check_open_fraction(v, "penalty_fraction"),
    "settle_tolerance": lambda v: _checks.check_lr(v, "settle_tolerance"),
    "horizon": lambda v: _checks.check_lr(v, "horizon"),
    "buffer_order": lambda v: _checks.check_int(v, "buffer_order"),
    "eps_small": lambda v: _checks.check_lr(v, "eps_small"),
    "lr_transient": lambda v: _checks.check_lr(v, "lr_transient"),
    "transient_tol": lambda v: _checks.check_open_fraction(v, "transient_tol"),
    # Where the EoM stops.
    "fractions": lambda v: _check_fractions_of_the_edge(v),
    "start_step": lambda v: _checks.check_int(v, "start_step"),
    "hvps_per_step": lambda v: _checks.check_int(v, "hvps_per_step", minimum=1),
    "max_evaluations": lambda v: _checks.check_int(v, "max_evaluations", minimum=1),
    # Ranks that shard the data; the runner sets it from --world-size.
    "world_size": lambda v: _checks.check_int(v, "world_size", minimum=1),
}


def _check_batch_sizes(values) -> list[int]:
    """A non-empty list of batch sizes, each an integer >= 1."""
    if isinstance(values, (str, bytes)) or not isinstance(values, list) or not values:
        raise TypeError(
            f"batch_sizes must be a non-empty list of integers; got {values!r}"
        )
    return [
        _checks.check_int(b, f"batch_sizes[{i}]", minimum=1)
        for i, b in enumerate(values)
    ]


def _check_fractions_of_the_edge(values) -> list[float]:
    """Values of ``lr * lambda_max``, each in (0, 2): GD's stable range."""
    if isinstance(values, (str, bytes)) or not isinstance(values, list) or not values:
        raise TypeError(
            f"fractions must be a non-empty list of numbers; got {values!r}"
        )
    for i, value in enumerate(values):
        _checks.check_lr(value, f"fractions[{i}]")
        if not value < 2:
            raise ValueError(
                f"fractions[{i}] must be below 2, GD's stability edge for "
                f"lr * lambda_max; got fractions[{i}]={value!r}"
            )
    return [float(v) for v in values]


def check_parameters(**parameters) -> dict:
    """Check each named parameter that has a rule; return them unchanged.

    Example:
        >>> check_parameters(lrs=[0.1, -0.2])
        Traceback (most recent call last):
        ...
        ValueError: lrs[1] must be positive and finite; got lrs[1]=-0.2
    """
    for name, value in parameters.items():
        if name in CHECKS:
            CHECKS[name](value)
    if "rtol" in parameters and "dtype" in parameters:
        check_tolerances(_checks.resolve_dtype(parameters["dtype"]), parameters["rtol"])
    if parameters.get("num_samples") is not None and "world_size" in parameters:
        distributed.shard_bounds(parameters["num_samples"], parameters["world_size"])
    if parameters.get("num_samples") is not None:
        for name in ("batch_size", "batch_sizes"):
            sizes = parameters.get(name)
            for size in [sizes] if isinstance(sizes, int) else sizes or []:
                check_batch_size(size, parameters["num_samples"])
    return parameters
