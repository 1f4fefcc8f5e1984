"""Counter terms: the corrections that make a flow pass through the GD iterates.

The EoM is ``d params/dt = -g - lr * xi`` with ``xi = xi_1 + lr xi_2 + ...``; it is
fixed by asking that its flow over a time ``lr`` be one GD step,
``params - lr g(params)``, to the order of the truncation. Expanding the flow in
``lr``, ``params(lr) = params - lr g + lr^2/2 H g - lr^2 xi_1 + O(lr^3)``, so the
order-``lr^2`` terms cancel when ``xi_1 = 1/2 H g``.
"""

from __future__ import annotations

from eomlib import _tree
from eomlib._checks import check_int
from eomlib._tree import Tree
from eomlib.derivatives import Loss, grad, grad_and_hvp

# The highest order this version computes.
MAX_ORDER = 1


def counter_terms(loss: Loss, params: Tree, order: int) -> list[Tree]:
    """The counter terms ``[xi_1, ..., xi_order]`` at ``params``.

    Args:
        loss: a function of ``params`` returning a 0-d tensor.
        params: a tensor or a dict of tensors.
        order: how many terms, at least 1.

    Returns:
        A list of ``order`` trees in the structure of ``params``; ``xi_1 = 1/2 H g``.

    Raises:
        NotImplementedError: for an order above the highest this version computes,
            before any derivative is taken.
    """
    return counter_terms_and_grad(loss, params, order)[1]


def counter_terms_and_grad(
    loss: Loss, params: Tree, order: int
) -> tuple[Tree, list[Tree]]:
    """The gradient and the counter terms, sharing the gradient's computation."""
    check_order(order, minimum=1)
    g = grad(loss, params)
    _, hg = grad_and_hvp(loss, params, g)
    return g, [_tree.scale(0.5, hg)]


def check_order(order: int, minimum: int = 0) -> int:
    """An order this version can compute, or an error that says which it can."""
    check_int(order, "order", minimum=minimum)
    if order > MAX_ORDER:
        raise NotImplementedError(
            f"counter terms of order {order} are not implemented; this version "
            f"computes orders up to {MAX_ORDER} (xi_1 = 1/2 H g)"
        )
    return order
