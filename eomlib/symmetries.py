"""Symmetries of the loss, and what GD, GF and the EoM make of the norms they govern.

Two symmetries of almost every classifier fix how some weights move.

*Scale.* A weight ``w`` that feeds a normalisation (a linear or convolutional layer
without bias, followed by BatchNorm) can be multiplied by any ``c > 0`` without
changing the loss. Differentiating ``f(c w) = f(w)`` in ``c`` gives ``w . g = 0``;
differentiating that along ``g`` gives ``w . (H g) = -|g|^2``. So gradient flow keeps
``|w|^2`` (its rate is ``-2 w . g = 0``), while a GD step, orthogonal to ``w``, adds
exactly ``lr^2 |g|^2``. The first-order EoM has the rate ``-lr w . (H g) =
lr |g|^2``: over a time ``lr`` it recovers GD's growth to leading order.

*Translation.* The last linear layer ``(W, b)`` feeds a softmax, which ignores a
vector added to every row of ``W`` (a number added to every entry of ``b``). So the
class sum ``sum_c g_c`` vanishes, and so does ``sum_c (H v)_c`` for every ``v``: GD,
GF and the EoM of every order keep ``sum_c W_c``. With weight decay ``lambda`` GD
multiplies it by ``1 - lr lambda`` a step, GF by ``exp(-lambda t)``, and the EoM of
order K by ``exp(r_K t)``, where ``r_K`` is the sum of the first ``K + 1`` terms of
``log(1 - lr lambda) / lr = -lambda - lr lambda^2 / 2 - lr^2 lambda^3 / 3 - ...``.

Here these identities are measured on a network, and the norm dynamics that follow
from them are computed for GD, GF and the EoM of any order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.optimize import brentq
from torch import nn

from eomlib import _tree
from eomlib._checks import check_choice, check_lr, check_nonnegative
from eomlib._tree import Tree
from eomlib.counter_terms import check_order
from eomlib.derivatives import Loss, grad, hvp
from eomlib.flows import eom_trajectory, flow_fields

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Symmetries:
    """Names of the parameters that each symmetry acts on.

    Attributes:
        scale: weights that feed a normalisation, each scale-invariant on its own.
        translation: the weight and bias of the linear layer before the softmax.
    """

    scale: tuple[str, ...]
    translation: tuple[str, ...]


def find_symmetries(model: nn.Module) -> Symmetries:
    """The scale- and translation-invariant parameters of ``model``, found from its
    layers in the order they were defined (the order they run in an
    ``nn.Sequential``).

    A linear or convolutional layer without bias directly followed by a BatchNorm
    has a scale-invariant weight; the last layer, when it is linear, is
    translation-invariant under the softmax cross-entropy. The order of definition
    is only a proxy for the order of execution, so a model that is not a plain
    sequence of layers may get fewer symmetries than it has: :func:`identities`
    measures whether those named hold.

    Example:
        >>> from eomlib.models import make_model
        >>> find_symmetries(make_model("bn_mlp", 64, 10, hidden=(8, 8)))
        Symmetries(scale=('0.weight', '3.weight'), translation=('6.weight', '6.bias'))
    """
    leaves = [(n, m) for n, m in model.named_modules() if not any(m.children())]
    scale = tuple(
        f"{name}.weight"
        for (name, layer), (_, after) in zip(leaves, leaves[1:])
        if isinstance(layer, (nn.Linear, *_CONVOLUTIONS))
        and layer.bias is None
        and isinstance(after, nn.modules.batchnorm._BatchNorm)
    )
    translation: tuple[str, ...] = ()
    if leaves and isinstance(leaves[-1][1], nn.Linear):
        name, last = leaves[-1]
        translation = tuple(f"{name}.{p}" for p, _ in last.named_parameters())
    return Symmetries(scale=scale, translation=translation)


def with_weight_decay(loss: Loss, weight_decay: float) -> Loss:
    """``loss(params) + weight_decay / 2 * |params|^2``.

    GD on it is SGD with (coupled) weight decay: ``params - lr (g + weight_decay
    params)``. A ``weight_decay`` of zero returns ``loss`` itself. The faster
    ``second_order`` version of ``loss``, when it has one, is decayed alike.
    """
    weight_decay = check_nonnegative(weight_decay, "weight_decay")
    if weight_decay == 0:
        return loss

    def decayed(params: Tree) -> torch.Tensor:
        return loss(params) + 0.5 * weight_decay * _tree.dot(params, params)

    if hasattr(loss, "second_order"):
        decayed.second_order = with_weight_decay(loss.second_order, weight_decay)
    return decayed


def sq_norm(params: Tree, names: tuple[str, ...] | list[str]) -> float:
    """``sum |params[name]|^2`` over ``names``."""
    return sum(params[name].pow(2).sum().item() for name in names)


def class_sum(params: Tree, name: str) -> torch.Tensor:
    """``sum_c params[name][c]``: the sum over classes (rows) of a layer's weight or
    bias, which the softmax's translation symmetry governs."""
    return params[name].sum(dim=0)


def identities(loss: Loss, params: Tree, symmetries: Symmetries) -> list[dict]:
    """Each identity that ``symmetries`` implies, measured at ``params``.

    For a scale-invariant ``w``: ``w . g = 0`` and ``w . (H g) = -|g_w|^2``. For the
    translation-invariant layer: ``sum_c g_c = 0`` and ``sum_c (H g)_c = 0``. Each
    row gives both sides and their difference relative to the size of the terms
    involved, which is round-off when the symmetry holds.
    """
    g = grad(loss, params)
    Hg = hvp(loss, params, g)
    rows = []
    for name in symmetries.scale:
        w, gw, Hgw = params[name], g[name], Hg[name]
        g_sq = gw.pow(2).sum().item()
        w_dot_g = (w * gw).sum().item()
        w_dot_Hg = (w * Hgw).sum().item()
        rows.append(_row(name, "w·g = 0", w_dot_g, 0.0, w.norm() * gw.norm()))
        rows.append(
            _row(name, "w·Hg = −|g_w|²", w_dot_Hg, -g_sq, w.norm() * Hgw.norm())
        )
    for name in symmetries.translation:
        for label, value in (("Σ_c g_c = 0", g[name]), ("Σ_c (Hg)_c = 0", Hg[name])):
            total = value.sum(dim=0).abs().max().item()
            rows.append(_row(name, label, total, 0.0, value.abs().sum(dim=0).max()))
    return rows


def _row(name: str, identity: str, lhs: float, rhs: float, size) -> dict:
    size = float(size)
    return {
        "parameter": name,
        "identity": identity,
        "left side": lhs,
        "right side": rhs,
        "relative gap": abs(lhs - rhs) / size if size > 0 else abs(lhs - rhs),
    }


def norm_rates(
    loss: Loss, params: Tree, lr: float, orders, groups: dict[str, list[str]]
) -> dict[str, dict[int, float]]:
    """The instantaneous rate of each group's squared norm under each flow.

    For the field ``F_K`` of each order K in ``orders`` (0 is GF), the rate is
    ``d |w|^2 / dt = 2 w . F_K(params)``, summed over the parameters of a group
    (``groups`` as in :func:`one_step_changes`). The counter terms are evaluated
    once, for the highest order.
    """
    fields = flow_fields(loss, params, lr, orders)
    return {
        group: {
            order: sum(2 * (params[n] * field[n]).sum().item() for n in names)
            for order, field in fields.items()
        }
        for group, names in groups.items()
    }


def one_step(loss: Loss, params: Tree, lr: float, order: int | None, **solver) -> Tree:
    """Where one step of length ``lr`` leads from ``params``: GD's step when
    ``order`` is None, else the EoM of ``order`` (0 is GF) integrated over a time
    ``lr``. ``solver`` goes to :func:`eomlib.integrate`."""
    if order is None:
        return _tree.axpy(-check_lr(lr), grad(loss, params), params)
    trajectory = eom_trajectory(loss, params, lr, 1, order, **solver)
    return _tree.tree_map(lambda x: x[-1], trajectory)


def one_step_changes(
    loss: Loss, params: Tree, lr: float, orders, groups: dict[str, list[str]], **solver
) -> dict[str, dict[str | int, float]]:
    """How much one step from ``params`` changes each group's squared norm.

    Args:
        groups: named lists of parameter names, such as ``{"last layer":
            ["6.weight", "6.bias"]}``; a group's squared norm is the sum over its
            parameters.
        orders: the flows to integrate over a time ``lr`` (0 is GF).

    Returns:
        For each group, the change under GD (key ``"GD"``) and under the EoM of each
        order. Each flow is integrated once, whatever the number of groups.
    """
    after = {"GD": one_step(loss, params, lr, None)}
    for order in orders:
        after[order] = one_step(loss, params, lr, order, **solver)
    return {
        group: {
            model: sq_norm(moved, names) - sq_norm(params, names)
            for model, moved in after.items()
        }
        for group, names in groups.items()
    }


def class_sum_rates(
    loss: Loss, params: Tree, lr: float, orders, name: str
) -> dict[int, float]:
    """``S . (dS/dt) / |S|^2`` for the class sum ``S`` of ``params[name]``, under the
    EoM of each order (0 is GF): the exponential rate at which the flow shrinks
    ``S``. With weight decay it is :func:`class_sum_rate_series`."""
    S = class_sum(params, name)
    fields = flow_fields(loss, params, lr, orders)
    return {
        order: ((S * class_sum(field, name)).sum() / S.pow(2).sum()).item()
        for order, field in fields.items()
    }


def class_sum_rate_series(lr: float, weight_decay: float, order: int | None) -> float:
    """The exponential rate of the class sum under weight decay, in closed form.

    ``order=None`` is GD: ``log(1 - lr weight_decay) / lr``, the rate at which
    ``(1 - lr weight_decay)^k`` falls per unit time ``t = k lr``; it needs
    ``lr weight_decay < 1``, beyond which GD flips the sign of the class sum at
    every step. An integer order K gives the EoM's, the first ``K + 1`` terms of
    that logarithm's series (order 0, GF, is ``-weight_decay``).
    """
    lr, lam = check_lr(lr), check_nonnegative(weight_decay, "weight_decay")
    if order is None:
        if lr * lam >= 1:
            raise ValueError(
                f"GD multiplies the class sum by 1 - lr weight_decay = "
                f"{1 - lr * lam:g} a step, which has no real exponential rate; "
                "use lr * weight_decay < 1"
            )
        return math.log1p(-lr * lam) / lr
    order = check_order(order)
    return -sum(lr ** (j - 1) * lam**j / j for j in range(1, order + 2))


def scale_free_grad_sq(loss: Loss, params: Tree, name: str) -> float:
    """``|g_w|^2 |w|^2`` for a scale-invariant ``w = params[name]``: the squared
    gradient that ``w`` would have at unit norm (``g_w`` scales like ``1 / |w|``)."""
    gw = grad(loss, params)[name]
    return gw.pow(2).sum().item() * params[name].pow(2).sum().item()


EQUILIBRIA = ("gd", "eom1", "leading")


def equilibrium_sq_norm(
    g_hat_sq: float, lr: float, weight_decay: float, dynamics: str
) -> float:
    """The ``|w|^2`` at which weight decay ``lam`` balances the growth of a
    scale-invariant ``w``, for a fixed scale-free squared gradient ``g_hat_sq``
    (:func:`scale_free_grad_sq`), in closed form, for one of ``EQUILIBRIA``:

    * ``"gd"``: one step maps ``|w|^2`` to ``(1 - lr lam)^2 |w|^2 + lr^2 |g_w|^2``
      with ``|g_w|^2 = g_hat_sq / |w|^2``; it is fixed where
      ``|w|^4 = lr g_hat_sq / (lam (2 - lr lam))``, which needs ``lr lam < 2``.
    * ``"eom1"``: the first-order EoM's rate, ``-(2 lam + lr lam^2) |w|^2 +
      lr |g_w|^2``, vanishes where ``|w|^4 = lr g_hat_sq / (lam (2 + lr lam))``.
    * ``"leading"``: both to leading order in ``lr lam``,
      ``|w|^4 = lr g_hat_sq / (2 lam)``.

    Gradient flow has none: its rate is ``-2 lam |w|^2``, and the norm decays to 0.
    """
    lr, lam = check_lr(lr), check_lr(weight_decay, "weight_decay")
    g_hat_sq = check_lr(g_hat_sq, "g_hat_sq")
    check_choice(dynamics, "dynamics", EQUILIBRIA)
    if dynamics == "gd" and lr * lam >= 2:
        raise ValueError(
            f"with lr * weight_decay = {lr * lam:g} >= 2 GD's decay alone is "
            "unstable and its norm map has no fixed point"
        )
    denominator = {"gd": 2 - lr * lam, "eom1": 2 + lr * lam, "leading": 2.0}
    return math.sqrt(lr * g_hat_sq / (lam * denominator[dynamics]))


def flow_equilibrium_sq_norm(
    loss: Loss, params: Tree, name: str, lr: float, order: int, guess: float
) -> float:
    """The ``|w|^2`` at which the EoM of ``order`` stops changing the norm of the
    scale-invariant ``w = params[name]``, found along the ray ``c w / |w|`` with the
    other parameters held: the root in ``|w|^2`` of :func:`norm_rates` (Brent's
    method, from a bracket grown around ``guess``).

    The root sought is a stable one: the rate positive below it and negative above,
    as weight decay makes it (:func:`with_weight_decay`) for the first order. A
    higher order can change sign elsewhere, or not at all; then no bracket is found
    within a factor ``2^30`` of ``guess`` and the error says which side failed.
    """
    check_order(order, minimum=1)
    lr, guess = check_lr(lr), check_lr(guess, "guess")
    direction = params[name] / params[name].norm()

    def rate(sq: float) -> float:
        moved = dict(params)
        moved[name] = math.sqrt(sq) * direction
        return norm_rates(loss, moved, lr, [order], {name: [name]})[name][order]

    low = _grow(rate, guess / 2, 0.5, lambda r: r > 0)
    if low is None:
        raise ValueError(
            f"the EoM of order {order} shrinks |{name}|^2 at every norm down to "
            f"{guess / 2**31:.3g}: no stable equilibrium below {guess:.3g}"
        )
    high = _grow(rate, guess * 2, 2.0, lambda r: r < 0)
    if high is None:
        raise ValueError(
            f"the EoM of order {order} grows |{name}|^2 at every norm up to "
            f"{guess * 2**31:.3g}; is weight decay in the loss (with_weight_decay)?"
        )
    return brentq(rate, low, high, xtol=1e-14 * guess, rtol=1e-12)


def _grow(rate, start: float, factor: float, accept) -> float | None:
    """The first ``start * factor^i`` (i < 30) whose rate ``accept`` takes."""
    value = start
    for _ in range(30):
        if accept(rate(value)):
            return value
        value *= factor
    return None
