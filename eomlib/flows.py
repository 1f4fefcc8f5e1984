"""Fields, gradient-descent trajectories and their integration in time.

A field maps ``params`` to ``d params/dt``. Gradient flow (GF) is ``-g``; the EoM
truncated at ``order`` K is ``-g - sum_{k=1..K} lr^k xi_k``. GD iterates are compared
with a flow at the times ``t = k * lr``, where the EoM is built to meet them.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch
import torchdiffeq
from tqdm import tqdm

from eomlib import _tree
from eomlib._checks import check_choice, check_int, check_lr, check_lrs
from eomlib._tree import Tree
from eomlib.counter_terms import check_order, counter_terms_and_grad
from eomlib.derivatives import (
    Loss,
    autograd_applies,
    for_second_order,
    grad,
    gradient_at,
    top_eigenvalue,
)

log = logging.getLogger(__name__)

Field = Callable[[Tree], Tree]


_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def order_name(order: int) -> str:
    """``GF`` for order 0, else ``EoM₁``, ``EoM₂``, ...: a flow's name in plain text."""
    return "GF" if order == 0 else "EoM" + str(order).translate(_SUBSCRIPTS)


class DivergenceError(FloatingPointError):
    """GD produced a non-finite value; the message names the step, the learning
    rate and the measured ``lr * lambda_max``."""


class SeriesDivergenceError(DivergenceError):
    """``lr * |lambda|_max >= 1`` along GD: the counter-term series cannot converge.

    On a quadratic with curvature ``lambda`` a GD step multiplies the offset by
    ``1 - lr lambda``, and the EoM is ``d params/dt = log(1 - lr lambda)/lr params``:
    the series of ``log`` converges only for ``|lr lambda| < 1``, and for
    ``lr lambda >= 1`` no real flow passes through the iterates (GD flips the sign,
    though it stays stable up to 2). Truncated EoMs can still be integrated there,
    but they no longer approximate GD order by order.
    """


# Above this, the counter-term series of the EoM diverges; above 2, GD does.
SERIES_LIMIT, GD_LIMIT = 1.0, 2.0


def eom_field(loss: Loss, lr: float, order: int, *, method: str = "autodiff") -> Field:
    """The EoM field truncated at ``order``: ``params -> d params/dt``.

    Two methods give the same field up to ``O(lr^(order+1))``:

    * ``"autodiff"``: ``-g - sum_{k=1..order} lr^k xi_k`` with the counter terms of
      :func:`eomlib.counter_terms`, exact derivatives at every order.
    * ``"iterates"``: the operator logarithm of the GD step. The EoM's flow over a
      time ``lr`` *is* the step ``Phi(params) = params - lr g``, so
      ``lr F = log(Phi) = sum_{m>=1} (-1)^(m+1)/m Delta^m params``, where
      ``Delta^m`` is the m-th forward difference of the GD iterates started at
      ``params``. Truncated after ``m = order + 1`` it costs ``order + 1`` gradients
      and no higher derivative. It is summed as a weighted sum of those gradients
      (:func:`log_step_weights`), so its round-off is about ``eps 2^order |g|``
      rather than a difference of nearby iterates divided by ``lr``.


    ``order=0`` is gradient flow, ``-g``, whatever ``lr``. The arguments are checked
    here, before any derivative is taken.
    """
    lr = check_lr(lr)
    check_order(order)
    check_choice(method, "method", FIELD_METHODS)
    return FIELD_METHODS[method](loss, lr, order)


def _autodiff_field(loss: Loss, lr: float, order: int) -> Field:
    return lambda params: flow_fields(loss, params, lr, [order])[order]


def flow_fields(loss: Loss, params: Tree, lr: float, orders) -> dict[int, Tree]:
    """The field ``d params/dt`` at ``params`` of the EoM of each order in ``orders``
    (0 is GF), from one evaluation of the counter terms up to the highest order."""
    lr = check_lr(lr)
    orders = sorted({check_order(order) for order in orders})
    if not orders:
        raise ValueError("orders must name at least one order (0 is GF)")
    if orders[-1] == 0:
        return {0: _tree.scale(-1.0, grad(loss, params))}
    g, xis = counter_terms_and_grad(loss, params, orders[-1])
    fields, correction = {}, None
    for order in range(orders[-1] + 1):
        if order > 0:
            term = _tree.scale(lr**order, xis[order - 1])
            correction = (
                term if correction is None else _tree.axpy(1.0, term, correction)
            )
        if order in orders:
            total = g if correction is None else _tree.axpy(1.0, correction, g)
            fields[order] = _tree.scale(-1.0, total)
    return fields


def _iterates_field(loss: Loss, lr: float, order: int) -> Field:
    weights = [float(w) for w in log_step_weights(order)]
    fast = for_second_order(loss)

    def field(params: Tree) -> Tree:
        _tree.check_floating(params)
        if not autograd_applies(params):
            return _iterates_field_functional(loss, lr, weights, params)
        current = [leaf.detach() for leaf in _tree.leaves(params)]
        total = None
        for i, weight in enumerate(weights):
            g = gradient_at(fast, current, params)
            with torch.no_grad():
                # torch._foreach_* act on all leaves at once, as torch.optim does.
                if total is None:
                    total = torch._foreach_mul(g, -weight)
                else:
                    torch._foreach_add_(total, g, alpha=-weight)
                if i < order:
                    current = torch._foreach_add(current, g, alpha=-lr)
        return _tree.rebuild(total, params)

    return field


def _iterates_field_functional(loss, lr, weights, params):
    """The iterates field inside a torch.func transform or on params with a graph."""
    current, total = params, None
    for i, weight in enumerate(weights):
        g = grad(loss, current)
        total = (
            _tree.scale(-weight, g) if total is None else _tree.axpy(-weight, g, total)
        )
        if i < len(weights) - 1:
            current = _tree.axpy(-lr, g, current)
    return total


def log_step_weights(order: int) -> list[Fraction]:
    """The weights ``w_i`` of ``F = -sum_i w_i g(params_i)``, the iterates field of
    ``order`` written in the gradients at the GD iterates ``params_0..params_order``.

    ``lr F = sum_{m=1..order+1} (-1)^(m+1)/m Delta^m params_0`` is a combination
    ``sum_j c_j params_j`` with ``sum_j c_j = 0``, and
    ``params_j - params_0 = -lr sum_{i<j} g(params_i)``, so ``w_i = sum_{j>i} c_j``.
    Summing gradients, the field never divides a difference of nearby points by lr.

    Example:
        >>> [str(w) for w in log_step_weights(1)]  # F = -(3/2 g_0 - 1/2 g_1)
        ['3/2', '-1/2']
    """
    c = log_difference_coefficients(order)
    return [sum(c[i + 1 :], Fraction(0)) for i in range(order + 1)]


def log_difference_coefficients(order: int) -> list[Fraction]:
    """The ``c_j`` of ``sum_{m=1..order+1} (-1)^(m+1)/m Delta^m x_0 = sum_j c_j x_j``,
    ``j = 0..order+1``: the operator logarithm of a one-step map, truncated, written
    in the points ``x_j`` of its orbit. They sum to 0.

    Example:
        >>> [str(c) for c in log_difference_coefficients(1)]  # Delta - Delta^2 / 2
        ['-3/2', '2', '-1/2']
    """
    check_order(order)
    c = [Fraction(0)] * (order + 2)
    for m in range(1, order + 2):
        for j in range(m + 1):
            c[j] += Fraction((-1) ** (m + 1), m) * (-1) ** (m - j) * math.comb(m, j)
    return c


def field_from_iterates(iterates: Tree, lr: float, order: int) -> Tree:
    """The modified field at each iterate, read off the iterates that follow it.

    For the orbit ``x_0, x_1, ...`` of any one-step map that is near the identity
    (GD, or an optimizer whose state has settled onto its slow manifold, where the
    parameters alone determine the next step), the flow that passes through the
    orbit at ``t = k lr`` has the field ``F(x_k) = 1/lr sum_j c_j x_{k+j}`` up to
    ``O(lr^(order+1))``, with the coefficients of
    :func:`log_difference_coefficients`. No derivative is taken: this is how a
    derived modified equation is checked against an optimizer's own steps.

    Args:
        iterates: a trajectory with a leading step axis of length ``N + 1``.
        lr: the time between iterates.
        order: the truncation K; each field uses ``K + 2`` consecutive iterates.

    Returns:
        The field at iterates ``0 .. N - K - 1``, stacked along the leading axis.
        Its round-off is about ``eps |x| 2^K / lr``: differences of nearby points.
    """
    lr = check_lr(lr)
    weights = [float(c) for c in log_difference_coefficients(order)]
    span = len(weights)
    _tree.check_floating(iterates, "iterates")
    lengths = {x.shape[0] if x.dim() else 0 for x in _tree.leaves(iterates)}
    if not lengths:
        raise ValueError("iterates must hold at least one tensor; got an empty dict")
    if len(lengths) != 1:
        raise ValueError(
            "every leaf of iterates must hold the same number of iterates along its "
            f"first axis; got lengths {sorted(lengths)}"
        )
    (length,) = lengths
    if length < span:
        raise ValueError(f"order {order} needs at least {span} iterates; got {length}")

    def combine(x: torch.Tensor) -> torch.Tensor:
        count = x.shape[0] - span + 1
        return sum(w * x[j : j + count] for j, w in enumerate(weights)) / lr

    return _tree.tree_map(combine, iterates)


FIELD_METHODS = {"autodiff": _autodiff_field, "iterates": _iterates_field}


def show_progress(progress: bool | None) -> bool:
    """Whether a long loop shows a tqdm bar: as asked, or with ``None`` only when
    standard error is a terminal outside CI (notebooks and CI logs stay quiet)."""
    if progress is not None:
        return bool(progress)
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("CI")


def gd_trajectory(
    loss: Loss,
    params: Tree,
    lr: float,
    num_steps: int,
    *,
    progress: bool | None = None,
) -> Tree:
    """The GD iterates ``params_{k+1} = params_k - lr g(params_k)``, k = 0..num_steps.

    Returns the iterates stacked along a new leading axis, in the structure of
    ``params``. Raises :class:`DivergenceError` at the first non-finite iterate.
    ``progress`` is that of :func:`show_progress`.
    """
    lr = check_lr(lr)
    check_int(num_steps, "num_steps")
    iterates = [params]
    bar = tqdm(
        range(num_steps), desc=f"GD lr={lr:g}", disable=not show_progress(progress)
    )
    for step in bar:
        params = _tree.axpy(-lr, grad(loss, params), params)
        if not torch.isfinite(_tree.flatten(params)).all():
            raise DivergenceError(_divergence_message(loss, iterates, lr, step + 1))
        iterates.append(params)
    return _tree.tree_map(lambda *leaves: torch.stack(leaves), *iterates)


def _divergence_message(
    loss: Loss, iterates: list, lr: float, step: int, method: str = "GD"
) -> str:
    """Why ``method`` stopped: the step, and ``lr * lambda_max`` at the last finite
    iterate (or at the start, when the last one's curvature is not finite either);
    GD's stability limit is named only for GD."""
    message = (
        f"{method} diverged at step {step} with lr={lr:g}: the parameters are no "
        "longer finite."
    )
    for where, point in ((step - 1, iterates[-1]), (0, iterates[0])):
        try:
            sharpness = abs(top_eigenvalue(loss, point, num_iters=50, rtol=1e-3))
        except (RuntimeError, ValueError):  # NOTE: overflow in the products
            continue
        if math.isfinite(sharpness) and sharpness > 0 and method != "GD":
            return (
                f"{message} At step {where}, lr * lambda_max = {lr * sharpness:.3g} "
                f"(lambda_max = {sharpness:.3g}). Use a smaller learning rate."
            )
        if math.isfinite(sharpness) and sharpness > 0:
            return (
                f"{message} At step {where}, lr * lambda_max = {lr * sharpness:.3g} "
                f"(lambda_max = {sharpness:.3g}); GD is stable only below "
                f"{GD_LIMIT:g}, so use lr < {GD_LIMIT / sharpness:.3g}."
            )
    return message + " Use a smaller learning rate."


def check_series_converges(
    loss: Loss, gd: Tree, lr: float, *, checkpoints: int = 3
) -> list[tuple[int, float]]:
    """``lr * |lambda|_max`` at ``checkpoints`` GD iterates spread from the first to
    the last; raises :class:`SeriesDivergenceError` at the first that reaches 1.

    ``gd`` is a trajectory of :func:`gd_trajectory` (a leading step axis). Each
    checkpoint costs one power iteration on ``H v``. Returns ``(step, lr *
    lambda_max)`` for each checkpoint when all are below 1; the power iteration
    stops once its estimate changes by less than 1e-3 of itself.
    """
    lr = check_lr(lr)
    check_int(checkpoints, "checkpoints", minimum=1)
    num_steps = _tree.leaves(gd)[0].shape[0] - 1
    steps = sorted(
        {round(i * num_steps / max(1, checkpoints - 1)) for i in range(checkpoints)}
    )
    measured = []
    for step in steps:
        point = _tree.tree_map(lambda x, step=step: x[step], gd)
        value = lr * abs(top_eigenvalue(loss, point, num_iters=100, rtol=1e-3))
        if value >= SERIES_LIMIT:
            raise SeriesDivergenceError(
                f"the EoM's counter-term series diverges at GD step {step} with "
                f"lr={lr:g}: lr * |lambda|_max = {value:.3g} >= {SERIES_LIMIT:g} "
                f"(GD itself is stable below {GD_LIMIT:g}). The truncated EoM no "
                f"longer approximates GD order by order; use lr < "
                f"{SERIES_LIMIT * lr / value:.3g}, or pass check_series=False to "
                "integrate it anyway."
            )
        measured.append((step, value))
    return measured


def optimizer_trajectory(
    loss: Loss,
    params: Tree,
    optimizer: type[torch.optim.Optimizer],
    num_steps: int,
    *,
    progress: bool | None = None,
    state: bool = False,
    **hyper,
):
    """The iterates of a ``torch.optim`` optimizer on the full-batch ``loss``.

    Args:
        loss: a function of ``params`` returning a 0-d tensor.
        params: the start, a tensor or a dict of tensors; never changed.
        optimizer: a ``torch.optim.Optimizer`` subclass (``torch.optim.SGD``,
            ``Adam``, ``RMSprop``, ...), run on copies of ``params``.
        num_steps: how many steps.
        progress: that of :func:`show_progress`.
        state: also return the optimizer's state after each step.
        **hyper: the optimizer's hyper-parameters; ``lr`` is required.

    Returns:
        The iterates ``0..num_steps`` stacked along a new leading axis, in the
        structure of ``params``; with ``state``, also a list of the optimizer's
        per-parameter state (a dict by parameter name of dicts of tensors) after
        each step. Raises :class:`DivergenceError` at the first non-finite iterate.
    """
    if not (
        isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)
    ):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer class such as torch.optim.SGD "
            f"or torch.optim.Adam; got {optimizer!r}"
        )
    if "lr" not in hyper:
        raise TypeError(f"{optimizer.__name__} needs lr=...; got {sorted(hyper)}")
    lr = check_lr(hyper["lr"])
    check_int(num_steps, "num_steps")
    _tree.check_floating(params)
    fast = for_second_order(loss)
    leaves = [leaf.detach().clone() for leaf in _tree.leaves(params)]
    for leaf in leaves:
        leaf.requires_grad_()
    try:
        engine = optimizer(leaves, **hyper)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{optimizer.__name__}({hyper}): {error}") from error
    names = list(params) if isinstance(params, dict) else [None]

    iterates, states = [params], []
    bar = tqdm(
        range(num_steps),
        desc=f"{optimizer.__name__} lr={lr:g}",
        disable=not show_progress(progress),
    )
    for step in bar:
        with torch.enable_grad():
            value = fast(_tree.rebuild(leaves, params))
        for leaf, g in zip(leaves, torch.autograd.grad(value, leaves)):
            leaf.grad = g
        engine.step()
        current = _tree.rebuild([leaf.detach().clone() for leaf in leaves], params)
        if not torch.isfinite(_tree.flatten(current)).all():
            plain = optimizer is torch.optim.SGD and not hyper.get("momentum", 0)
            method = "GD" if plain else optimizer.__name__
            raise DivergenceError(
                _divergence_message(loss, iterates, lr, step + 1, method)
            )
        iterates.append(current)
        if state:
            states.append(
                {
                    name: {
                        key: value.detach().clone()
                        if isinstance(value, torch.Tensor)
                        else value
                        for key, value in engine.state[leaf].items()
                    }
                    for name, leaf in zip(names, leaves)
                }
            )
    stacked = _tree.tree_map(lambda *leaves: torch.stack(leaves), *iterates)
    return (stacked, states) if state else stacked


def integrate(
    field: Field,
    params: Tree,
    times: torch.Tensor,
    *,
    solver: str = "dopri5",
    rtol: float = 1e-10,
    atol: float = 1e-12,
    progress: bool | None = None,
) -> Tree:
    """Solve ``d params/dt = field(params)`` from ``params`` at ``times[0]``.

    ``solver`` names one of torchdiffeq's adaptive methods (``SOLVERS``: Dormand-Prince
    of order 5 or 8, ...), run by its ``odeint`` on the flattened parameters; the
    tolerances are checked against the dtype first. Returns the
    solution at each of ``times``, stacked along a new leading axis, in the structure
    of ``params``. ``progress`` is that of :func:`show_progress`: a bar of the time
    integrated so far.
    """
    flat = _tree.flatten(params)
    check_tolerances(flat.dtype, rtol, atol)
    check_choice(solver, "solver", SOLVERS)
    times = torch.as_tensor(times, dtype=flat.dtype, device=flat.device)
    span = float(times[-1] - times[0])
    bar = tqdm(
        total=span,
        desc=f"{solver} to t={float(times[-1]):g}",
        disable=not show_progress(progress),
        bar_format="{l_bar}{bar}| t {n:.3g}/{total:.3g} [{elapsed}]",
    )

    def rhs(t, y):
        if not bar.disable:
            bar.update(max(0.0, min(float(t - times[0]), span) - bar.n))
        return _tree.flatten(field(_tree.unflatten(y, params)))

    start = time.perf_counter()
    # Steps land on every output time, so no value comes from the solver's
    # interpolant, whose order is lower than the method's.
    try:
        solution = torchdiffeq.odeint(
            rhs,
            flat,
            times,
            method=solver,
            rtol=rtol,
            atol=atol,
            options={"step_t": times},
        )
    finally:
        bar.close()
    log.info(
        "integrated to t=%g with %s in %.2f s",
        times[-1].item(),
        solver,
        time.perf_counter() - start,
    )
    return _tree.unflatten_batch(solution, params)


# torchdiffeq's adaptive solvers: the tolerances below only mean something to them.
SOLVERS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")


def check_tolerances(
    dtype: torch.dtype, rtol: float, atol: float | None = None
) -> None:
    """Tolerances that are positive, finite and resolvable in ``dtype``.

    A relative tolerance near the dtype's machine epsilon makes an adaptive solver
    shrink its step without end, so it is refused at once.
    """
    check_lr(rtol, "rtol")
    if atol is not None:
        check_lr(atol, "atol")
    floor = 10 * torch.finfo(dtype).eps
    if rtol < floor:
        raise ValueError(
            f"rtol={rtol:g} is below what {str(dtype).removeprefix('torch.')} resolves "
            f"(10 eps = {floor:.1e}); use rtol >= {floor:.0e} or dtype='float64'"
        )


def eom_trajectory(
    loss: Loss,
    params: Tree,
    lr: float,
    num_steps: int,
    order: int,
    *,
    method: str = "autodiff",
    **solver,
) -> Tree:
    """The EoM of ``order`` integrated from ``params``, sampled at ``t = k * lr``.

    ``order=0`` is gradient flow; ``method`` is that of :func:`eom_field`.
    ``solver`` goes to :func:`integrate`.
    """
    field = eom_field(loss, lr, order, method=method)
    check_int(num_steps, "num_steps")
    first = _tree.leaves(params)[0]
    times = lr * torch.arange(num_steps + 1, dtype=first.dtype, device=first.device)
    return integrate(field, params, times, **solver)


def distance(trajectory: Tree, other: Tree) -> torch.Tensor:
    """The Euclidean distance between two trajectories at each of their times."""
    a = torch.cat([x.flatten(1) for x in _tree.leaves(trajectory)], dim=1)
    b = torch.cat([x.flatten(1) for x in _tree.leaves(other)], dim=1)
    return torch.linalg.vector_norm(a - b, dim=1)


@dataclass
class Comparison:
    """GD at one learning rate against flows of several orders from the same start.

    Attributes:
        lr: the learning rate.
        gd: the GD iterates, stacked along a leading axis (``num_steps + 1``).
        distances: for each order (0 is GF), ``|flow(k lr) - params_k|`` for each k.
    """

    lr: float
    gd: Tree
    distances: dict[int, torch.Tensor]

    def final_params(self) -> Tree:
        return _tree.tree_map(lambda x: x[-1], self.gd)

    def summary(self, loss: Loss, sharpness_start: float | None = None) -> dict:
        """One row of numbers: ``lr * lambda_max`` at the start (when given) and at
        the last GD iterate, the final loss, each flow's final distance to GD, and
        the ratio of GF's distance to that of the highest-order EoM."""
        final = self.final_params()
        row = {"lr": self.lr}
        if sharpness_start is not None:
            row["lr·λmax, start"] = self.lr * sharpness_start
        row["lr·λmax, end"] = self.lr * top_eigenvalue(loss, final)
        row["loss, end"] = loss(final).item()
        for order, distances in self.distances.items():
            name = order_name(order)
            row[f"{name} to GD, end"] = distances[-1].item()
        highest = max(self.distances)
        if 0 in self.distances and highest > 0:
            row["ratio"] = (
                self.distances[0][-1].item() / self.distances[highest][-1].item()
            )
        return row


def compare_with_gd(
    loss: Loss,
    params: Tree,
    lr: float,
    num_steps: int,
    orders: tuple[int, ...] = (0, 1),
    *,
    check_series: bool = True,
    **solver,
) -> Comparison:
    """Run GD and integrate the EoM of each order; measure their distance per step.

    Every order is checked before GD starts. GD that diverges raises
    :class:`DivergenceError`. With ``check_series`` and an order above 0,
    ``lr * |lambda|_max`` is measured at the first, middle and last GD iterate
    before any EoM is integrated, and :class:`SeriesDivergenceError` is raised where
    it reaches 1. ``solver`` goes to :func:`integrate`.
    """
    for order in orders:
        check_order(order)
    gd = gd_trajectory(loss, params, lr, num_steps)
    if check_series and any(order > 0 for order in orders):
        check_series_converges(loss, gd, lr)
    distances = {
        order: distance(
            eom_trajectory(loss, params, lr, num_steps, order, **solver), gd
        )
        for order in orders
    }
    return Comparison(lr=lr, gd=gd, distances=distances)


def discretization_errors(
    loss: Loss,
    params: Tree,
    lrs: list[float],
    orders: tuple[int, ...],
    *,
    horizon: float | None = None,
    **solver,
) -> dict[int, list[float]]:
    """The distance between GD and the EoM of each order, for each learning rate.

    With ``horizon=None`` it is the local error, after one step; otherwise the global
    error after ``N = round(horizon / lr)`` steps, at the same time ``t = N lr`` for
    every ``lr`` that divides ``horizon``. ``solver`` goes to :func:`integrate`.
    """
    lrs = check_lrs(lrs)
    for order in orders:
        check_order(order)
    if horizon is not None:
        check_lr(horizon, "horizon")
    errors: dict[int, list[float]] = {order: [] for order in orders}
    for lr in lrs:
        num_steps = 1 if horizon is None else max(1, round(horizon / lr))
        comparison = compare_with_gd(loss, params, lr, num_steps, orders, **solver)
        for order in orders:
            errors[order].append(comparison.distances[order][-1].item())
    return errors


def roundoff_floor(params: Tree) -> float:
    """``eps |params|``: the smallest distance that the dtype can resolve at params."""
    flat = _tree.flatten(params)
    return torch.finfo(flat.dtype).eps * flat.norm().item()
