"""The modified flows of ``torch.optim.Adam`` and ``torch.optim.RMSprop``.

Both optimizers divide a gradient estimate by the root of a running average of the
squared gradient, element by element. With ``torch.optim``'s conventions (step k =
1, 2, ..., gradient ``g = g(params_{k-1})``, moments starting at zero, all products
element-wise):

* Adam: ``m_k = beta1 m_{k-1} + (1 - beta1) g``, ``v_k = beta2 v_{k-1} + (1 -
  beta2) g^2``, ``params_k = params_{k-1} - lr m_hat / (sqrt(v_hat) + eps)`` with
  ``m_hat = m_k / (1 - beta1^k)`` and ``v_hat = v_k / (1 - beta2^k)``: ``eps`` is
  added outside the root, after the bias correction;
* RMSprop: ``v_k = alpha v_{k-1} + (1 - alpha) g^2``, ``params_k = params_{k-1} -
  lr g / (sqrt(v_k) + eps)``, with no bias correction.

**The slow manifold.** The optimizer's state is (params, m, v, k). For fixed betas
and ``lr -> 0`` the moments relax in a few ``1/(1 - beta)`` steps while the params
move by ``O(lr)`` a step, so after that transient the moments are functions of the
params, ``m = M(params)`` and ``v = V(params)``. Each average weighs the gradients
at the past iterates, which lie at ``params + j lr P g`` (``j = 1, 2, ...``) with
``P = diag(1 / (|g| + eps))``; to first order in ``lr``

    M = g + lr/(1 - beta1) H P g,   V = g^2 + 2 lr/(1 - beta2) g H P g

(:func:`slow_manifold`, the state stored after the step that lands on params).

**The modified equation.** On the manifold the next step is ``params -> params - lr
U(params)`` with ``m = g + lr a H P g``, ``sqrt(v) = |g| + lr b sign(g) H P g``, so

    U = P g + lr P (a - b D) H P g + O(lr^2),

``D = |g| P`` (in [0, 1)), ``a = beta1/(1 - beta1)``, ``b = beta2/(1 - beta2)``
(RMSprop: ``a = 0``, ``b = alpha/(1 - alpha)``). The flow that passes through these
steps at ``t = k lr`` is the backward error of the Euler step, ``F = -U - lr/2
DU[U] + O(lr^2)``; ``U_0 = P g`` is not a gradient field, and ``D U_0 [w] = eps P^2
H w = P (1 - D) H w``. Together,

    d params/dt = -P g - lr P (a + 1/2 - (b + 1/2) D) H P g.

``H P g`` is the gradient of the perturbed one-norm ``Psi(params) = sum_i
psi(g_i)``, ``psi(x) = |x| - eps log(1 + |x|/eps)`` (:func:`perturbed_one_norm`):
where every ``|g_i| >> eps``, ``D = 1`` and the field is ``-P grad(f + lr (a - b)
|g|_1)``; where every ``|g_i| << eps``, ``D = 0`` and it is ``-1/eps grad(f +
lr/eps (a + 1/2) |g|^2 / 2)``, the modified flow of heavy-ball momentum (momentum
``beta1``, dampening ``beta1``) at the learning rate ``lr/eps``.

**The second order.** On the manifold the iterates lie on the modified flow
itself, so the past ones are ``phi_{-j lr}(params)`` and, with ``s = j lr``,
``g(phi_{-s}) = g - s H F + s^2/2 G2 + O(s^3)``, ``G2 = D^3 f[F0, F0] + H DF0[F0]``.
The averages then weigh ``j`` and ``j^2`` by the mean ages ``a`` and ``a (1 +
2a)`` (``b``, ``b (1 + 2b)``), which gives ``m`` and ``v``, hence ``U``, to
``O(lr^2)``, and the flow of ``params -> params + lr f`` (``f = -U = f0 + lr f1 +
lr^2 f2``) is ``F = f0 + lr F1 + lr^2 F2`` with ``F1 = f1 - 1/2 f0' f0`` and ``F2
= f2 - 1/2 (f0' F1 + F1' f0) - 1/6 (f0' f0)' f0``. The root ``sqrt(v)`` adds the
term ``b (1 + b) (H F0)^2 / (2 |g|)`` to its second-order coefficient: it is
where the expansion needs ``|g_i|`` away from zero. Order 2 is evaluated by
nested forward-mode derivatives (third derivatives of the loss), not in closed
form.

**Bias correction.** During the first steps Adam's averages hold ``k`` gradients,
not infinitely many, and ``1/(1 - beta^k)`` renormalises their weights: the
corrected moments at step k are ``g + lr a_k H P g`` and ``g^2 + 2 lr b_k g H P
g`` with the shorter memories ``a_k = a - k beta1^k / (1 - beta1^k)`` and ``b_k``
alike (:func:`memory_coefficients`, :func:`adam_step`). So Adam's first step is
exactly ``-lr P g`` and every step matches the settled field at order 0; the
transient is an ``O(lr)`` change of the first-order term that dies out like ``k
beta^k`` (:func:`transient_steps`). Without the correction the step would carry the
factor ``(1 - beta1^k) / sqrt(1 - beta2^k)`` at order 0 (for ``eps -> 0``);
RMSprop, which divides nothing out, carries ``1 / sqrt(1 - alpha^k)``.

**Where the expansion holds.** ``g/(|g| + eps)`` bends over a width ``eps`` around
``g_i = 0``, where ``D`` has a kink, and ``sqrt(v)`` is not expandable in ``lr``
while ``|g_i|`` is as small as ``lr b |H P g|_i``: the series needs the ``g_i`` away
from zero, or ``eps`` large enough to smooth them. Putting ``eps`` inside the root,
``sqrt(v + eps^2)``, would give ``P = 1/sqrt(g^2 + eps^2)``, smooth at ``g_i = 0``;
torch's ``sqrt(v) + eps`` keeps the kink.
"""

from __future__ import annotations

import math

import torch
from torch import func

from eomlib import _tree
from eomlib._checks import (
    check_fraction,
    check_int,
    check_lr,
    check_nonnegative,
    check_optimizer_keywords,
)
from eomlib._tree import Tree
from eomlib.derivatives import Loss, grad, hvp
from eomlib.flows import Field
from eomlib.symmetries import with_weight_decay

# The orders of the modified field implemented here: 0 (the lr -> 0 limit) to 2.
ORDERS = (0, 1, 2)

# The orders of the slow manifold of the moments implemented here.
MANIFOLD_ORDERS = (0, 1)

# Hyper-parameters with their torch defaults (lr has none here: it is required).
ADAM_HYPER = {"lr": None, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
RMSPROP_HYPER = {"lr": None, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0}

# torch.optim options that change the update but are modelled only at this value.
ADAM_FIXED = {"amsgrad": False, "maximize": False, "decoupled_weight_decay": False}
RMSPROP_FIXED = {"momentum": 0.0, "centered": False, "maximize": False}

# Options that choose torch's implementation, not the update: accepted, ignored.
IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")


def adam_field(loss: Loss, *, order: int = 1, **hyper) -> Field:
    """The modified field of ``torch.optim.Adam`` on its slow manifold.

    ``d params/dt = -P g - lr P (a + 1/2 - (b + 1/2) D) H P g`` truncated at
    ``order`` (0 or 1), with ``P = 1/(|g| + eps)``, ``D = |g| P``, ``a =
    beta1/(1 - beta1)`` and ``b = beta2/(1 - beta2)``, element-wise, or carried
    to ``O(lr^2)`` with ``order=2``; the module's docstring derives both. It
    follows Adam's iterates at ``t = k lr`` once the first :func:`transient_steps`
    steps are past.

    Args:
        loss: a function of ``params`` returning a 0-d tensor.
        order: 0 (``-P g``), 1 or 2.
        **hyper: torch's names: ``lr`` (required), ``betas`` (default ``(0.9,
            0.999)``), ``eps`` (``1e-8``) and ``weight_decay`` (``0``, coupled:
            ``g + weight_decay params``). ``amsgrad``, ``maximize`` and
            ``decoupled_weight_decay`` are accepted at ``False`` only; ``foreach``,
            ``fused``, ``capturable`` and ``differentiable`` are ignored.

    Returns:
        The field ``params -> d params/dt``.

    Example:
        >>> import torch
        >>> field = adam_field(lambda x: (x**2).sum(), order=0, lr=0.1, eps=1.0)
        >>> field(torch.tensor([1.0, -0.5], dtype=torch.float64))  # -2x/(|2x| + 1)
        tensor([-0.6667,  0.5000], dtype=torch.float64)
    """
    values = _check_hyper("Adam", hyper, ADAM_HYPER, ADAM_FIXED)
    order = _check_order(order)
    a, b = _memories(_check_betas(values["betas"]))
    return _field(loss, order, values, a, b)


def rmsprop_field(loss: Loss, *, order: int = 1, **hyper) -> Field:
    """The modified field of ``torch.optim.RMSprop`` on its slow manifold.

    ``d params/dt = -P g - lr P (1/2 - (b + 1/2) D) H P g`` truncated at ``order``
    (0 or 1; 2 adds the next term), with ``P = 1/(|g| + eps)``, ``D = |g| P``
    and ``b = alpha/(1 - alpha)``: Adam's field without the first moment (``beta1
    = 0``). RMSprop has no bias correction, so its early steps are too long by up
    to ``1/sqrt(1 - alpha^k)``; the field holds after :func:`transient_steps`.

    Args:
        loss: a function of ``params`` returning a 0-d tensor.
        order: 0 (``-P g``), 1 or 2.
        **hyper: torch's names: ``lr`` (required), ``alpha`` (default ``0.99``),
            ``eps`` (``1e-8``) and ``weight_decay`` (``0``). ``momentum`` is
            accepted at 0, ``centered`` and ``maximize`` at ``False``; ``foreach``,
            ``capturable`` and ``differentiable`` are ignored.

    Returns:
        The field ``params -> d params/dt``.
    """
    values = _check_hyper("RMSprop", hyper, RMSPROP_HYPER, RMSPROP_FIXED)
    order = _check_order(order)
    alpha = check_fraction(values["alpha"], "alpha")
    return _field(loss, order, values, 0.0, alpha / (1 - alpha))


def _field(loss: Loss, order: int, values: dict, a: float, b: float) -> Field:
    """``-P g - lr P (a + 1/2 - (b + 1/2) D) H P g``, truncated at ``order``."""
    lr, eps = values["lr"], values["eps"]
    loss = with_weight_decay(loss, values["weight_decay"])
    if order == 2:
        return _second_order_field(loss, lr, eps, a, b)

    def field(params: Tree) -> Tree:
        g = grad(loss, params)
        pg = _tree.tree_map(lambda x: x / (x.abs() + eps), g)
        if order == 0:
            return _tree.scale(-1.0, pg)
        hpg = hvp(loss, params, pg)

        def total(g_, pg_, hpg_):
            weight = a + 0.5 - (b + 0.5) * (g_.abs() / (g_.abs() + eps))
            return -pg_ - lr * weight * hpg_ / (g_.abs() + eps)

        return _tree.tree_map(total, g, pg, hpg)

    return field


def _second_order_field(loss: Loss, lr: float, eps: float, a: float, b: float):
    """The field to ``O(lr^2)``, by forward-mode derivatives of the flat loss.

    The moments are averages over the past iterates ``phi_{-j lr}(params)`` on the
    modified flow itself: with ``s = j lr``, ``g(phi_{-s}) = g - s H F + s^2/2 G2``,
    ``G2 = d^2/ds^2 g(params + s F0 + s^2/2 DF0[F0])``, and the mean ages ``a``,
    ``a (1 + 2a)`` of ``j`` and ``j^2``. That gives the step ``U = U0 + lr U1 +
    lr^2 U2``, and the flow of ``params -> params + lr f`` (``f = -U``) is ``f0 +
    lr F1 + lr^2 F2`` with ``F1 = f1 - 1/2 f0' f0`` and ``F2 = f2 - 1/2 (f0' F1 +
    F1' f0) - 1/6 (f0' f0)' f0``.
    """
    a2, b2 = a * (1 + 2 * a), b * (1 + 2 * b)

    def at(x: torch.Tensor, fn, v: torch.Tensor) -> torch.Tensor:
        return func.jvp(fn, (x,), (v,))[1]

    def build(like: Tree) -> Field:
        gfun = func.grad(lambda x: loss(_tree.unflatten(x, like)))

        def f0(x):
            g = gfun(x)
            return -g / (g.abs() + eps)

        def f1(x):  # the first-order coefficient of the field, -U1 - 1/2 f0' f0
            g = gfun(x)
            p = 1 / (g.abs() + eps)
            u1 = p * (a - b * g.abs() * p) * at(x, gfun, p * g)
            return -u1 - 0.5 * at(x, f0, f0(x))

        def flat_field(x):
            g = gfun(x)
            ag = g.abs()
            d0, field0, field1 = ag + eps, -g / (ag + eps), f1(x)
            hf0, hf1 = at(x, gfun, field0), at(x, gfun, field1)
            bend = at(x, f0, field0)
            zero, one = torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype)

            def along(t):
                return gfun(x + t * field0 + 0.5 * t**2 * bend)

            g2 = at(zero, lambda t: at(t, along, one), one)

            # m = g + lr m1 + lr^2 m2; sqrt(v) = |g| + lr s1 + lr^2 s2.
            m1, m2 = -a * hf0, -a * hf1 + 0.5 * a2 * g2
            sign = torch.sign(g)
            root = torch.where(hf0 == 0, torch.zeros_like(ag), hf0**2 / (2 * ag))
            s1 = -b * sign * hf0
            s2 = sign * (-b * hf1 + 0.5 * b2 * g2) + b * (1 + b) * root
            u0 = g / d0
            u1 = (m1 - u0 * s1) / d0
            u2 = (m2 - u1 * s1 - u0 * s2) / d0
            flow = at(x, lambda y: at(y, f0, f0(y)), field0)
            f2 = -u2 - 0.5 * (at(x, f0, field1) + at(x, f1, field0)) - flow / 6
            return field0 + lr * field1 + lr**2 * f2

        return flat_field

    def field(params: Tree) -> Tree:
        flat = _tree.flatten(params).detach()
        return _tree.unflatten(build(params)(flat), params)

    return field


def adam_step(loss: Loss, params: Tree, step: int, **hyper) -> Tree:
    """Adam's ``step``-th displacement from ``params``, to second order in ``lr``.

    ``params_k - params_{k-1} = -lr P g - lr^2 P (a_k - b_k D) H P g + O(lr^3)`` at
    ``params = params_{k-1}``, with the memories ``(a_k, b_k)`` of
    :func:`memory_coefficients` at ``step = k``: what bias correction leaves of
    the transient. The first step is exactly ``-lr P g``.

    Args:
        loss: a function of ``params`` returning a 0-d tensor.
        params: the iterate ``params_{k-1}`` that the step starts from.
        step: the step counter ``k`` (1, 2, ...) that torch stores as ``step``.
        **hyper: as for :func:`adam_field`.

    Returns:
        The displacement, in the structure of ``params``.
    """
    values = _check_hyper("Adam", hyper, ADAM_HYPER, ADAM_FIXED)
    a, b = memory_coefficients(torch.optim.Adam, step=step, betas=values["betas"])
    lr, eps = values["lr"], values["eps"]
    loss = with_weight_decay(loss, values["weight_decay"])
    g = grad(loss, params)
    pg = _tree.tree_map(lambda x: x / (x.abs() + eps), g)
    hpg = hvp(loss, params, pg)

    def displacement(g_, pg_, hpg_):
        weight = a - b * (g_.abs() / (g_.abs() + eps))
        return -lr * pg_ - lr**2 * weight * hpg_ / (g_.abs() + eps)

    return _tree.tree_map(displacement, g, pg, hpg)


def _check_order(order, orders=ORDERS, what="Adam and RMSprop") -> int:
    order = check_int(order, "order")
    if order not in orders:
        raise ValueError(
            f"order must be one of {', '.join(map(str, orders))} for {what}; "
            f"got order={order}"
        )
    return order


def _check_hyper(name: str, hyper: dict, known: dict, fixed: dict) -> dict:
    """The hyper-parameters with defaults filled in; unknown names, a missing lr,
    and options that are not modelled are refused with what is allowed."""
    given = check_optimizer_keywords(
        name, hyper, known, fixed=fixed, ignored=IMPLEMENTATION
    )
    values = {**known, **given}
    values["lr"] = check_lr(values["lr"])
    values["eps"] = check_lr(values["eps"], "eps")
    values["weight_decay"] = check_nonnegative(values["weight_decay"], "weight_decay")
    return values


def _check_betas(betas) -> tuple[float, float]:
    """Two averaging coefficients, each in [0, 1)."""
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__"):
        raise TypeError(f"betas must be a pair of numbers in [0, 1); got {betas!r}")
    if len(betas) != 2:
        raise ValueError(f"betas must hold two numbers in [0, 1); got betas={betas!r}")
    return tuple(check_fraction(b, f"betas[{i}]") for i, b in enumerate(betas))


def _settings(optimizer, hyper: dict, what: str) -> tuple[dict, tuple[float, float]]:
    """The checked hyper-parameters and ``(beta1, beta2)`` of Adam, or ``(0,
    alpha)`` for RMSprop (no first moment: a memory of zero)."""
    if optimizer is torch.optim.Adam:
        values = _check_hyper("Adam", hyper, ADAM_HYPER, ADAM_FIXED)
        return values, _check_betas(values["betas"])
    if optimizer is torch.optim.RMSprop:
        values = _check_hyper("RMSprop", hyper, RMSPROP_HYPER, RMSPROP_FIXED)
        return values, (0.0, check_fraction(values["alpha"], "alpha"))
    raise ValueError(
        f"no {what} for {optimizer!r}; known: torch.optim.Adam, torch.optim.RMSprop"
    )


def _memories(betas, step: int | None = None) -> tuple[float, ...]:
    """``beta/(1 - beta) - k beta^k/(1 - beta^k)`` for each beta (``k = inf``
    when ``step`` is None)."""
    settled = [beta / (1 - beta) for beta in betas]
    if step is None:
        return tuple(settled)
    return tuple(
        s - step * beta**step / (1 - beta**step) for s, beta in zip(settled, betas)
    )


def memory_coefficients(
    optimizer: type[torch.optim.Optimizer], step: int | None = None, **hyper
) -> tuple[float, float]:
    """``(a, b)``: how far back the two averages reach, in steps.

    Settled (``step=None``): Adam's ``(beta1/(1 - beta1), beta2/(1 - beta2))``,
    RMSprop's ``(0, alpha/(1 - alpha))``: the mean age ``sum_j j (1 - beta)
    beta^j`` of the gradients in each average. At Adam's step ``k`` the
    bias-corrected averages hold ``k`` gradients and their mean age is ``a_k = a -
    k beta1^k / (1 - beta1^k)`` (``0`` at ``k = 1``), ``b_k`` alike. The
    first-order term of the field is ``-lr P (a + 1/2 - (b + 1/2) D) H P g``; its
    weight runs from ``a + 1/2`` (``eps >> |g|``) to ``a - b`` (``eps << |g|``).

    Example:
        >>> memory_coefficients(torch.optim.Adam, betas=(0.5, 0.75))
        (1.0, 3.0)
        >>> memory_coefficients(torch.optim.Adam, step=1, betas=(0.5, 0.75))
        (0.0, 0.0)
    """
    if optimizer is torch.optim.Adam:
        betas = _check_betas(hyper.get("betas", ADAM_HYPER["betas"]))
        if step is not None:
            step = check_int(step, "step", minimum=1)
        return _memories(betas, step)
    if optimizer is torch.optim.RMSprop:
        if step is not None:
            raise ValueError(
                f"step={step!r}: RMSprop has no bias correction, so its early steps "
                "are not the settled ones with a shorter memory; only Adam takes step"
            )
        alpha = check_fraction(hyper.get("alpha", RMSPROP_HYPER["alpha"]), "alpha")
        return 0.0, alpha / (1 - alpha)
    raise ValueError(
        f"no memory coefficients for {optimizer!r}; known: torch.optim.Adam, "
        "torch.optim.RMSprop"
    )


def transient_steps(
    optimizer: type[torch.optim.Optimizer], tol: float = 1e-12, **hyper
) -> int:
    """The first step ``k`` with ``k beta^k / (1 - beta^k) < tol`` for every average.

    That is Adam's memory deficit ``a - a_k`` (:func:`memory_coefficients`); it
    also bounds ``beta^k``, the weight RMSprop's uncorrected average still lacks.
    Past it the state sits on the slow manifold up to ``tol`` relative to the
    first-order term: about ``log(1/tol) / (1 - beta)`` steps of the slowest beta.

    Example:
        >>> transient_steps(torch.optim.Adam, 1e-12, betas=(0.9, 0.99))
        3564
    """
    check_lr(tol, "tol")
    if not tol < 1:
        raise ValueError(f"tol must be below 1; got tol={tol!r}")
    a, b = memory_coefficients(optimizer, **hyper)
    slowest = max(a / (1 + a), b / (1 + b))
    if slowest == 0:
        return 1

    # k beta^k / (1 - beta^k) decreases in k; bracket the crossing, then bisect.
    def deficit(k: int) -> float:
        return k * slowest**k / (1 - slowest**k)

    high = max(1, math.ceil(math.log(tol) / math.log(slowest)))
    while deficit(high) >= tol:
        high *= 2
    low = 0
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if deficit(middle) >= tol else (low, middle)
    return high


def slow_manifold(
    loss: Loss,
    params: Tree,
    optimizer: type[torch.optim.Optimizer],
    *,
    order: int = 1,
    **hyper,
) -> dict[str, Tree]:
    """The optimizer's settled state at ``params``, truncated at ``order``.

    The state ``torch.optim`` stores after the step that lands on ``params``:
    Adam's ``exp_avg = g + lr/(1 - beta1) H P g`` and ``exp_avg_sq = g^2 + 2 lr/(1
    - beta2) g H P g``, RMSprop's ``square_avg`` alike with ``alpha``; order 0
    keeps ``g`` and ``g^2``. Each is an average over the past iterates ``params + j
    lr P g``, ``j = 1, 2, ...``; Adam stores its moments without bias correction,
    which has died out on the manifold.

    Example:
        >>> state = slow_manifold(
        ...     lambda x: (x**2).sum(), torch.ones(1), torch.optim.RMSprop,
        ...     lr=0.01, alpha=0.5, eps=1.0,
        ... )
        >>> state["square_avg"]  # g^2 + 2 lr/(1 - alpha) g H P g, g = 2, H P g = 4/3
        tensor([4.1067])
    """
    values, (beta1, beta2) = _settings(optimizer, hyper, "slow manifold")
    order = _check_order(order, MANIFOLD_ORDERS, "the slow manifold")
    lr, eps = values["lr"], values["eps"]
    loss = with_weight_decay(loss, values["weight_decay"])
    g = grad(loss, params)
    if order == 0:
        hpg = _tree.scale(0.0, g)
    else:
        hpg = hvp(loss, params, _tree.tree_map(lambda x: x / (x.abs() + eps), g))
    square = _tree.tree_map(lambda x, y: x * x + 2 * lr / (1 - beta2) * x * y, g, hpg)
    if optimizer is torch.optim.RMSprop:
        return {"square_avg": square}
    first = _tree.axpy(lr / (1 - beta1), hpg, g)
    return {"exp_avg": first, "exp_avg_sq": square}


def perturbed_one_norm(g: Tree, eps: float) -> torch.Tensor:
    """``Psi = sum_i |g_i| - eps log(1 + |g_i|/eps)``, whose gradient is ``H P g``.

    ``psi'(x) = x / (|x| + eps)``, so ``grad_params Psi(g(params)) = H P g``. It is
    the one-norm ``|g|_1`` less ``O(eps log)`` for ``|g_i| >> eps``, and ``|g|^2 /
    (2 eps)`` for ``|g_i| << eps``: the norm that Adam's and RMSprop's first-order
    term moves along, by ``-lr P (a + 1/2 - (b + 1/2) D) grad Psi``.

    Example:
        >>> perturbed_one_norm(torch.tensor([1.0, -1.0]), 1.0)  # 2 (1 - log 2)
        tensor(0.6137)
    """
    eps = check_lr(eps, "eps")
    return sum(
        (x.abs() - eps * torch.log1p(x.abs() / eps)).sum() for x in _tree.leaves(g)
    )


def perturbed_one_norm_rates(
    loss: Loss, params: Tree, optimizer: type[torch.optim.Optimizer], **hyper
) -> dict[str, float]:
    """How fast the modified flow changes ``Psi`` at ``params``, term by term.

    ``d Psi/dt = grad Psi . F`` with ``grad Psi = H P g``: ``"order_0"`` is
    ``-(H P g) . P g``, the leading flow's rate, and ``"first_order"`` is
    ``-lr sum_i P_i w_i (H P g)_i^2`` with ``w = a + 1/2 - (b + 1/2) D``, the
    implicit bias. ``"penalty"`` and ``"anti_penalty"`` split the latter over the
    coordinates with ``w > 0`` (pushing ``Psi`` down) and ``w < 0`` (up).

    Args:
        loss: a function of ``params`` returning a 0-d tensor.
        params: where to evaluate.
        optimizer: ``torch.optim.Adam`` or ``torch.optim.RMSprop``.
        **hyper: as for :func:`adam_field` or :func:`rmsprop_field`.

    Returns:
        The four rates, as floats.
    """
    values, betas = _settings(optimizer, hyper, "perturbed one-norm rates")
    a, b = _memories(betas)
    lr, eps = values["lr"], values["eps"]
    loss = with_weight_decay(loss, values["weight_decay"])
    g = _tree.flatten(grad(loss, params))
    p = 1 / (g.abs() + eps)
    hpg = _tree.flatten(hvp(loss, params, _tree.unflatten(p * g, params)))
    w = a + 0.5 - (b + 0.5) * g.abs() * p
    terms = -lr * p * w * hpg**2
    return {
        "order_0": float(-(hpg * p * g).sum()),
        "first_order": float(terms.sum()),
        "penalty": float(terms[w > 0].sum()),
        "anti_penalty": float(terms[w < 0].sum()),
    }
