"""The modified flow of ``torch.optim.SGD``: plain GD, and heavy-ball momentum.

``torch.optim.SGD(lr, momentum=beta, dampening=tau)`` keeps a buffer
``b_k = beta b_{k-1} + c g(params_k)``, ``c = 1 - tau``, which starts undamped at
``b_0 = g(params_0)``, and steps ``params_{k+1} = params_k - lr b_k``; with
``nesterov=True`` it steps along ``g_k + beta b_k`` instead. After a transient that
decays like ``beta^k``, the buffer is a function of the parameters (the *slow
manifold*, :func:`slow_buffer`) and the parameters follow a flow
``d params/dt = F(params)`` whose time-``lr`` map is the step (:func:`sgd_field`).

On the slow manifold ``b_k = (params_k - params_{k+1}) / lr`` and
``b_{k-1} = (params_{k-1} - params_k) / lr``, so with ``Phi_s`` the time-``s`` map
of ``F`` the buffer's recursion becomes one equation for ``F``,

    (params - Phi_lr(params)) - beta (Phi_{-lr}(params) - params) = lr c g

and for Nesterov the right-hand side is
``lr ((1 + beta c) g - beta g(Phi_{-lr}(params)))``. Written as a B-series,
``F = sum_t lr^(|t|-1) a(t) G(t)`` over rooted trees ``t`` (``G(•) = g``,
``G([t_1, ..., t_m]) = D^m g[G(t_1), ..., G(t_m)]``), the equation fixes each
``a(t)`` from those of smaller trees (:func:`field_coefficients`). The first ones:

    a(•)   = -c / (1 - beta)
    a([•]) = -c^2 (1 + beta) / (2 (1 - beta)^3)          (the H g term)

so ``F = -c/(1-beta) grad (f + lr c (1 + beta) / (4 (1 - beta)^2) |g|^2) + O(lr^2)``.
:func:`symbolic_field_1d` derives the same field in one dimension with sympy and
no trees; :func:`settled_errors`, :func:`buffer_distances` and
:func:`field_distances` compare the derived objects with the optimizer's own
iterates and buffer.
"""

from __future__ import annotations

import functools
import math
from collections import Counter

import sympy as sp
import torch

from eomlib import _tree, symbolic
from eomlib._checks import check_fraction, check_int, check_lr, check_nonnegative
from eomlib._tree import Tree
from eomlib.bseries import LEAF, graft, lie_derivative, size
from eomlib.counter_terms import check_order, elementary_differentials, split
from eomlib.derivatives import (
    AutogradPoint,
    Loss,
    autograd_applies,
    for_second_order,
    grad,
    grad_derivative,
)
from eomlib.flows import (
    Field,
    eom_field,
    field_from_iterates,
    integrate,
    optimizer_trajectory,
)
from eomlib.symmetries import with_weight_decay

# The highest order of sgd_field: trees of up to MAX_ORDER + 1 nodes.
MAX_ORDER = 4


def check_hyper(momentum, dampening, nesterov) -> tuple[float, float, bool]:
    """``torch.optim.SGD``'s rules: momentum and dampening in ``[0, 1)``, and
    Nesterov only with a momentum above 0 and no dampening."""
    momentum = check_fraction(momentum, "momentum")
    dampening = check_fraction(dampening, "dampening")
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be True or False; got nesterov={nesterov!r}")
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError(
            "nesterov=True needs momentum > 0 and dampening = 0, as in "
            f"torch.optim.SGD; got momentum={momentum!r}, dampening={dampening!r}"
        )
    return momentum, dampening, nesterov


def field_coefficients(
    order: int, momentum, dampening=0, *, nesterov: bool = False
) -> dict[tuple, object]:
    """The coefficients ``a(t)`` of ``F = sum_t lr^(|t|-1) a(t) G(t)``, trees of up
    to ``order + 1`` nodes.

    Each ``a(t)`` solves the buffer's recursion at the trees of ``|t|`` nodes, given
    those of fewer nodes. Plain arithmetic on ``momentum`` and ``dampening``: pass
    floats for numbers, :class:`fractions.Fraction` for exact values or sympy
    symbols for formulas; their range is not checked here (:func:`sgd_field` does).

    Example:
        >>> from fractions import Fraction
        >>> a = field_coefficients(1, Fraction(1, 2))
        >>> a[()], a[((),)]  # -1/(1-beta), -(1+beta)/(2 (1-beta)^3)
        (Fraction(-2, 1), Fraction(-6, 1))
    """
    check_order(order)
    beta, c = momentum, 1 - dampening
    a: dict[tuple, object] = {}
    for n in range(1, order + 2):
        trees = _trees_of_size(n)
        # With a(t) = 0 for the trees of n nodes, the flows hold only the rest.
        forward = flow_coefficients(a, n, +1)
        backward = flow_coefficients(a, n, -1)
        shifted = composed_gradient(backward, n) if nesterov else {}
        for tree in trees:
            rest = forward.get(tree, 0) + beta * backward.get(tree, 0)
            if nesterov:
                source = (1 + beta * c if tree == LEAF else 0) - beta * shifted[tree]
            else:
                source = c if tree == LEAF else 0
            a[tree] = -(source + rest) / (1 - beta)
    return a


def flow_coefficients(a: dict, max_size: int, sign: int) -> dict[tuple, object]:
    """``(Phi_{sign lr}(params) - params)`` as ``sum_t lr^|t| phi(t) G(t)``, trees of
    up to ``max_size`` nodes, for the field of coefficients ``a``:
    ``sum_{j>=1} sign^j / j! L_F^(j-1) F``."""
    total: Counter = Counter()
    power = dict(a)
    for j in range(1, max_size + 1):
        for tree, coefficient in power.items():
            total[tree] += sign**j * coefficient / math.factorial(j)
        power = lie_derivative(power, a, max_size)
    return dict(total)


def composed_gradient(shift: dict, max_size: int) -> dict[tuple, object]:
    """``g(params + Delta)`` for ``Delta = sum_t lr^|t| shift(t) G(t)``, as
    ``sum_t lr^(|t|-1) psi(t) G(t)``: ``g + sum_m 1/m! D^m g[Delta, ..., Delta]``.

    A tree ``[t_1, ..., t_m]`` gets ``prod_i shift(t_i) / prod mu!``, with ``mu``
    the multiplicities of equal subtrees.
    """
    psi = {}
    for n in range(1, max_size + 1):
        for tree in _trees_of_size(n):
            value = 1
            for child in tree:
                value = value * shift.get(child, 0)
            for count in Counter(tree).values():
                value = value / math.factorial(count)
            psi[tree] = value
    return psi


def symbolic_field_1d(order: int, *, nesterov: bool = False) -> sp.Expr:
    """The modified field in one dimension, derived with sympy and without trees.

    In one dimension every elementary differential of ``lr^n`` is a monomial
    ``g^(n + 1 - m) g^(p_1) ... g^(p_m)`` with ``p_1 + ... + p_m = n`` a partition
    of ``n`` (``g``; ``g g'``; ``g g'^2, g^2 g''``; ...). The ansatz gives each one
    an unknown coefficient, the flows ``Phi_{+-lr}`` come from their Lie series
    (:func:`eomlib.symbolic.flow_series`), and the buffer's recursion is matched
    power by power of ``lr`` and monomial by monomial.

    Returns:
        ``F`` up to ``lr^order``, in ``g(x)``, its derivatives and the symbols
        ``beta`` (momentum) and ``c`` (1 - dampening). Summed tree by tree with
        :func:`eomlib.bseries.collapse`, :func:`field_coefficients` must give it.

    Example:
        >>> symbolic_field_1d(0)  # -c/(1 - beta) g
        c*g(x)/(beta - 1)
    """
    check_order(order)
    x, lr, g = symbolic.x, symbolic.lr, symbolic.g
    beta, c = sp.symbols("beta c", positive=True)
    derivatives = [sp.diff(g(x), x, m) for m in range(order + 1)]
    field, unknowns, terms = sp.Integer(0), [], []
    for n in range(order + 1):
        for partition in _partitions(n):
            unknown = sp.Symbol(f"u_{len(unknowns)}")
            unknowns.append(unknown)
            monomial = derivatives[0] ** (n + 1 - len(partition))
            for part in partition:
                monomial *= derivatives[part]
            terms.append(lr**n * monomial)
            field += unknown * terms[-1]

    forward = symbolic.flow_series(field, order + 1)
    backward = symbolic.flow_series(-field, order + 1)
    if nesterov:
        shifted = sum(
            derivatives[m] * backward**m / sp.factorial(m) for m in range(order + 1)
        )
        source = lr * ((1 + beta * c) * g(x) - beta * shifted)
    else:
        source = lr * c * g(x)
    # (params - Phi_lr) - beta (Phi_-lr - params) = source, as residual = 0.
    residual = sp.expand(-forward - beta * backward - source)

    # Plain symbols in place of g, g', ... so that sympy sees a polynomial.
    plain = sp.symbols(f"d0:{order + 1}")
    substitution = dict(zip(reversed(derivatives), reversed(plain)))
    equations = []
    for n in range(1, order + 2):
        coefficient = residual.coeff(lr, n).subs(substitution)
        equations.extend(sp.Poly(coefficient, *plain).coeffs())
    solution = sp.solve(equations, unknowns, dict=True)[0]
    return sp.collect(sp.expand(field.subs(solution)), terms, sp.factor)


def _partitions(n: int) -> list[tuple[int, ...]]:
    """The partitions of ``n`` as tuples of parts (``()`` for ``n = 0``)."""
    if n == 0:
        return [()]
    return [
        tuple(part for part, count in p.items() for _ in range(count))
        for p in sp.utilities.iterables.partitions(n)
    ]


@functools.cache
def _trees_of_size(n: int) -> tuple[tuple, ...]:
    """Every rooted tree of ``n`` nodes, as sorted tuples of subtrees."""
    if n == 1:
        return (LEAF,)
    found = set()
    for smaller in _trees_of_size(n - 1):
        found.update(graft(LEAF, smaller))
    return tuple(sorted(found))


def buffer_coefficients(
    order: int, momentum, dampening=0, *, nesterov: bool = False
) -> dict[tuple, object]:
    """The slow manifold: the buffer as ``sum_t lr^(|t|-1) r(t) G(t)``.

    ``b = (params - Phi_lr(params)) / lr``, and with Nesterov
    ``b = ((params - Phi_lr(params)) / lr - g) / beta``.
    """
    a = field_coefficients(order, momentum, dampening, nesterov=nesterov)
    step = {t: -v for t, v in flow_coefficients(a, order + 1, +1).items()}
    if nesterov:
        step[LEAF] = step[LEAF] - 1
        step = {t: v / momentum for t, v in step.items()}
    return step


def evaluate_trees(loss: Loss, params: Tree, coefficients: dict, lr: float) -> Tree:
    """``sum_t lr^(|t|-1) coefficients[t] G(t)`` at ``params``, exact derivatives.

    Each tree is one reverse pass through the graph of its prefix (the tree less its
    largest child), as in :mod:`eomlib.counter_terms`; inside a torch.func transform
    each tree is its own nested derivative.
    """
    trees = sorted(coefficients, key=lambda tree: (size(tree), tree))
    if max(size(tree) for tree in trees) <= 2:
        loss = for_second_order(loss)
    if autograd_applies(params):
        values = _shared_graphs(loss, params, trees)
    else:
        values = {LEAF: grad(loss, params)}
        for tree in trees[1:]:
            children = [values[child] for child in tree]
            values[tree] = grad_derivative(loss, params, children)
    total = None
    for tree in trees:
        weight = float(coefficients[tree]) * lr ** (size(tree) - 1)
        piece = _tree.scale(weight, values[tree])
        total = piece if total is None else _tree.axpy(1.0, piece, total)
    return total


def _shared_graphs(loss: Loss, params: Tree, trees: list[tuple]) -> dict:
    point = AutogradPoint(loss, params)
    prefixes = {split(tree)[0] for tree in trees if tree != LEAF}
    _, value = elementary_differentials(point, trees, prefixes)
    return {tree: point.tree(leaves) for tree, leaves in value.items()}


def _with_subtrees(coefficients: dict) -> dict:
    """Every subtree that a tree needs, with coefficient 0 where it has none."""
    full = dict(coefficients)
    stack = list(coefficients)
    while stack:
        for child in stack.pop():
            if child not in full:
                full[child] = 0
                stack.append(child)
    return full


def _check_order(order: int) -> int:
    order = check_order(order)
    if order > MAX_ORDER:
        raise ValueError(
            f"order must be between 0 and {MAX_ORDER} for SGD with momentum; "
            f"got order={order}"
        )
    return order


def sgd_field(
    loss: Loss,
    *,
    order: int = 1,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> Field:
    """The modified field of ``torch.optim.SGD(lr, momentum, dampening, nesterov,
    weight_decay)`` on its slow manifold, truncated at ``lr^order``.

    Coupled weight decay adds ``weight_decay params`` to each gradient, which makes
    the field that of ``loss + weight_decay/2 |params|^2``
    (:func:`eomlib.with_weight_decay`).

    ``F = -c/(1-beta) g - lr c^2 (1+beta) / (2 (1-beta)^3) H g + O(lr^2)`` with
    ``c = 1 - dampening`` (:func:`field_coefficients` for the rest and for
    Nesterov). Without momentum torch ignores dampening, and the field is GD's EoM
    of ``order`` (:func:`eomlib.eom_field`). The series converges only while
    ``lr c lambda < (1 - sqrt(beta))^2`` for every Hessian eigenvalue ``lambda``:
    beyond it the slow root of ``z^2 - (1 + beta - lr c lambda) z + beta`` turns
    complex and no real flow passes through the iterates. Nesterov's recursion
    has the looser bound ``lr lambda < ((1 - beta) / (1 + beta))^2``.

    Example:
        >>> import torch
        >>> field = sgd_field(lambda x: (x**2).sum(), lr=0.01, momentum=0.5)
        >>> field(torch.ones(2, dtype=torch.float64))  # -4 - 0.01 * 24
        tensor([-4.2400, -4.2400], dtype=torch.float64)
    """
    lr = check_lr(lr)
    momentum, dampening, nesterov = check_hyper(momentum, dampening, nesterov)
    loss = with_weight_decay(loss, weight_decay)
    if momentum == 0.0:
        return eom_field(loss, lr, order)
    order = _check_order(order)
    coefficients = _with_subtrees(
        field_coefficients(order, momentum, dampening, nesterov=nesterov)
    )
    return lambda params: evaluate_trees(loss, params, coefficients, lr)


def slow_buffer(
    loss: Loss,
    *,
    order: int = 1,
    lr: float,
    momentum: float,
    dampening: float = 0.0,
    nesterov: bool = False,
) -> Field:
    """``params -> `` torch's ``momentum_buffer`` on the slow manifold, truncated at
    ``lr^order``: ``c/(1-beta) g + lr c^2 beta / (1-beta)^3 H g + ...`` without
    Nesterov."""
    lr = check_lr(lr)
    order = _check_order(order)
    momentum, dampening, nesterov = check_hyper(momentum, dampening, nesterov)
    if momentum == 0.0:
        raise ValueError("slow_buffer needs momentum > 0; got momentum=0.0")
    coefficients = _with_subtrees(
        buffer_coefficients(order, momentum, dampening, nesterov=nesterov)
    )
    return lambda params: evaluate_trees(loss, params, coefficients, lr)


def buffer_distances(
    buffer: Field, iterates: Tree, states: list, *, relative: bool = False
) -> torch.Tensor:
    """``|b_k - B(params_k)|`` for each step: torch's buffer against its value on
    the slow manifold (divided by ``|B(params_k)|`` with ``relative``).

    ``iterates`` and ``states`` are those of
    ``eomlib.optimizer_trajectory(..., torch.optim.SGD, state=True)``; ``states[k]``
    holds the buffer ``b_k`` that took ``params_k`` to ``params_{k+1}``.
    """
    distances = []
    for k, state in enumerate(states):
        point = _tree.tree_map(lambda x, k=k: x[k], iterates)
        expected = _tree.flatten(buffer(point))
        if isinstance(point, dict):
            actual = torch.cat([state[n]["momentum_buffer"].flatten() for n in point])
        else:
            actual = state[None]["momentum_buffer"].flatten()
        distance = torch.linalg.vector_norm(actual - expected)
        if relative:
            distance = distance / torch.linalg.vector_norm(expected)
        distances.append(distance)
    return torch.stack(distances)


def field_distances(field: Field, iterates: Tree, lr: float, order: int):
    """``|F_iterates(params_k) - F(params_k)|`` for each step k at which
    :func:`eomlib.field_from_iterates` of ``order`` is defined: the field read off
    the optimizer's iterates against a derived one."""
    lr = check_lr(lr)
    read = field_from_iterates(iterates, lr, order)
    count = _tree.leaves(read)[0].shape[0]
    distances = []
    for k in range(count):
        point = _tree.tree_map(lambda x, k=k: x[k], iterates)
        measured = _tree.flatten(_tree.tree_map(lambda x, k=k: x[k], read))
        distances.append(
            torch.linalg.vector_norm(measured - _tree.flatten(field(point)))
        )
    return torch.stack(distances)


def settled_errors(
    loss: Loss,
    params: Tree,
    *,
    lr: float,
    orders,
    num_steps: int,
    momentum: float,
    dampening: float = 0.0,
    nesterov: bool = False,
    solver: str = "dopri8",
    rtol: float = 1e-13,
    atol: float = 1e-16,
) -> dict:
    """The order test of :func:`sgd_field` at a settled iterate of the real
    optimizer.

    Runs ``torch.optim.SGD`` from ``params`` for ``num_steps + 7`` steps (so that
    ``field_from_iterates`` of order 5 has its iterates) and compares, at the
    iterate ``n = num_steps``, the field of each of ``orders`` with

    * ``"field"``: the field read off the iterates (error ``O(lr^(K+1))``);
    * ``"one_step"``: the next iterate, against the flow of the field over a time
      ``lr`` (error ``O(lr^(K+2))``).

    ``num_steps`` should exceed ``transient_steps(momentum, 1e-14)``.

    Returns:
        ``{"field": {order: error}, "one_step": {order: error}, "params": the
        iterate n}``, errors as Euclidean norms over every parameter.
    """
    lr = check_lr(lr)
    orders = [_check_order(order) for order in orders]
    check_hyper(momentum, dampening, nesterov)
    hyper = {"momentum": momentum, "dampening": dampening, "nesterov": nesterov}
    num_steps = check_int(num_steps, "num_steps", minimum=0)
    iterates = optimizer_trajectory(
        loss, params, torch.optim.SGD, num_steps + 7, lr=lr, **hyper
    )
    point = _tree.tree_map(lambda x: x[num_steps], iterates)
    following = _tree.flatten(_tree.tree_map(lambda x: x[num_steps + 1], iterates))
    read = _tree.flatten(
        _tree.tree_map(lambda x: x[num_steps], field_from_iterates(iterates, lr, 5))
    )
    times = torch.tensor([0.0, lr], dtype=following.dtype, device=following.device)
    errors = {"field": {}, "one_step": {}, "params": point}
    for order in orders:
        field = sgd_field(loss, order=order, lr=lr, **hyper)
        value = _tree.flatten(field(point))
        errors["field"][order] = float(torch.linalg.vector_norm(value - read))
        flow = integrate(field, point, times, solver=solver, rtol=rtol, atol=atol)
        end = _tree.flatten(_tree.tree_map(lambda x: x[-1], flow))
        errors["one_step"][order] = float(torch.linalg.vector_norm(end - following))
    return errors


def settling_steps(distances, tolerance: float) -> int:
    """The first step from which every distance stays at or below ``tolerance``
    (``len(distances)`` when the last one is still above it)."""
    check_nonnegative(tolerance, "tolerance")
    above = [k for k, d in enumerate(distances) if float(d) > tolerance]
    return above[-1] + 1 if above else 0


def transient_steps(momentum: float, tolerance: float) -> int:
    """Steps for the fast mode ``beta^k`` to fall below ``tolerance``: the number
    of optimizer steps to run before an iterate sits on the slow manifold to that
    relative accuracy."""
    momentum = check_fraction(momentum, "momentum")
    check_lr(tolerance, "tolerance")
    if momentum == 0.0 or tolerance >= 1:
        return 0
    return math.ceil(math.log(tolerance) / math.log(momentum))


def exact_slow_rate(lr: float, curvature: float, momentum: float, dampening=0.0):
    """``log(z_slow) / lr`` for a quadratic of curvature ``lambda``: the exact
    field on the slow manifold is this rate times ``params`` (heavy ball).

    ``z_slow`` is the root near 1 of ``z^2 - (1 + beta - lr c lambda) z + beta``;
    raises when the roots are complex (``lr c lambda > (1 - sqrt(beta))^2``).
    """
    lr = check_lr(lr)
    beta, c = momentum, 1 - dampening
    # z_slow = 1 + w with w^2 + (1 - beta + q) w + q = 0, q = lr c lambda; the
    # root is written without cancellation, so that small rates keep their digits.
    q = lr * c * curvature
    p = 1 - beta + q
    discriminant = p**2 - 4 * q
    if discriminant < 0:
        raise ValueError(
            f"lr * (1 - dampening) * curvature = {q:.3g} is above "
            f"(1 - sqrt(momentum))^2 = {(1 - math.sqrt(beta)) ** 2:.3g}: the roots "
            "are complex and no real flow passes through the iterates"
        )
    w = -2 * q / (p + math.sqrt(discriminant)) if q else 0.0
    return math.log1p(w) / lr


__all__ = [
    "MAX_ORDER",
    "buffer_coefficients",
    "buffer_distances",
    "check_hyper",
    "exact_slow_rate",
    "evaluate_trees",
    "field_coefficients",
    "field_distances",
    "settled_errors",
    "settling_steps",
    "sgd_field",
    "slow_buffer",
    "symbolic_field_1d",
    "transient_steps",
]
