"""Continuous-time models of ``torch.optim``'s optimizers, beyond plain GD.

The paper builds the EoM of gradient descent. Its method carries over to any
optimizer whose step is near the identity once its state has settled: the
parameters then follow a *modified flow*, ``d params/dt = F(params)``, which
:func:`modified_field` builds from a ``torch.optim`` class and its
hyper-parameters, and which :func:`eomlib.flows.field_from_iterates` reads off
the optimizer's own iterates without any derivation, for comparison.

* :mod:`eomlib.optimizers.heavy_ball`: ``torch.optim.SGD`` with ``momentum``
  (with or without dampening and Nesterov), and plain SGD as GD's EoM.
* :mod:`eomlib.optimizers.adaptive`: ``torch.optim.Adam`` and ``RMSprop``.
* :mod:`eomlib.optimizers.minibatch`: SGD on shuffled minibatches, whose mean
  iterate over an epoch follows a modified loss.
"""

from __future__ import annotations

import torch

from eomlib._checks import check_optimizer_keywords
from eomlib.derivatives import Loss
from eomlib.flows import Field
from eomlib.models import Problem
from eomlib.optimizers import adaptive, heavy_ball, minibatch

# The modified field of each optimizer class: ``builder(loss, order=K, **hyper)``.
FIELDS = {
    torch.optim.SGD: heavy_ball.sgd_field,
    torch.optim.Adam: adaptive.adam_field,
    torch.optim.RMSprop: adaptive.rmsprop_field,
}


def modified_field(
    loss: Loss | Problem,
    optimizer: type[torch.optim.Optimizer],
    *,
    order: int = 1,
    **hyper,
) -> Field:
    """The modified field of ``optimizer`` with ``hyper`` on ``loss``, truncated
    at ``order`` in the learning rate; every argument is checked here.

    ``hyper`` takes ``torch.optim``'s own names (``lr``, ``momentum``, ``betas``,
    ...). One more, ``batch_size``, asks for SGD on shuffled minibatches: its field
    is that of the mean iterate over an epoch
    (:func:`eomlib.optimizers.minibatch.shuffled_sgd_field`), and it needs the data,
    so ``loss`` is then an :class:`eomlib.Problem`.

    Example:
        >>> import torch
        >>> field = modified_field(lambda x: (x**2).sum(), torch.optim.SGD, lr=0.1)
        >>> field(torch.ones(2, dtype=torch.float64))  # GD's EoM_1: -g - lr/2 H g
        tensor([-2.2000, -2.2000], dtype=torch.float64)
    """
    if optimizer not in FIELDS:
        known = ", ".join(f"torch.optim.{cls.__name__}" for cls in FIELDS)
        raise ValueError(f"no modified field for {optimizer!r}; known: {known}")
    if "batch_size" in hyper:
        if optimizer is not torch.optim.SGD:
            raise ValueError(
                "batch_size=... has a derived field only for torch.optim.SGD; "
                f"got {optimizer!r}"
            )
        return minibatch.shuffled_sgd_field(loss, order=order, **_sgd_hyper(hyper))
    if isinstance(loss, Problem):
        raise TypeError(
            "loss must be a function of params; got an eomlib.Problem: pass "
            "problem.loss, or batch_size=... (torch.optim.SGD only) for the field of "
            "shuffled minibatches, which needs the data"
        )
    if optimizer is torch.optim.SGD:
        hyper = _sgd_hyper(hyper)
    return FIELDS[optimizer](loss, order=order, **hyper)


# torch.optim.SGD's keywords: those its fields model (batch_size is eomlib's own,
# for shuffled minibatches), one modelled at its default only, and the switches
# that choose torch's implementation rather than the update.
SGD_HYPER = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "batch_size")
SGD_FIXED = {"maximize": False}
SGD_IMPLEMENTATION = ("foreach", "differentiable", "fused")


def _sgd_hyper(hyper: dict) -> dict:
    """``torch.optim.SGD``'s keywords, checked, without the ones that do not change
    the field."""
    return check_optimizer_keywords(
        "SGD", hyper, SGD_HYPER, fixed=SGD_FIXED, ignored=SGD_IMPLEMENTATION
    )
