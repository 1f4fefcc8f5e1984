"""Counter terms: the corrections that make a flow pass through the GD iterates.

The EoM is ``d params/dt = -g - lr * xi`` with ``xi = xi_1 + lr xi_2 + ...``; it is
fixed by asking that its flow over a time ``lr`` be one GD step,
``params - lr g(params)``, to the order of the truncation. The first terms are

    xi_1 = 1/2 H g
    xi_2 = 1/3 H^2 g + 1/12 T(g, g)
    xi_3 = 1/4 H^3 g + 1/12 H T(g, g) + 1/12 T(Hg, g)

with ``T`` the third derivative of the loss. Every term is a rational combination of
nested derivatives of the gradient, one for each rooted tree (:mod:`eomlib.bseries`
derives the coefficients exactly). Here they are evaluated at ``params`` by nested
forward-mode differentiation of the gradient, each tree once: a subtree shared by
several terms (``Hg`` appears in most of them) is computed a single time.
"""

from __future__ import annotations

from eomlib import _tree
from eomlib._checks import check_int
from eomlib._tree import Tree
from eomlib.bseries import LEAF, counter_term_trees, size
from eomlib.derivatives import Loss, grad, grad_derivative


def counter_terms(loss: Loss, params: Tree, order: int) -> list[Tree]:
    """The counter terms ``[xi_1, ..., xi_order]`` at ``params``.

    Args:
        loss: a function of ``params`` returning a 0-d tensor.
        params: a tensor or a dict of tensors.
        order: how many terms, at least 1. The cost grows quickly with it: order 4
            needs a fourth derivative of the gradient.

    Returns:
        A list of ``order`` trees in the structure of ``params``.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> xis = counter_terms(lambda x: 0.5 * x @ A @ x, torch.ones(2).double(), 2)
        >>> xis[1]  # for a quadratic, xi_k = A^(k+1) params / (k+1)
        tensor([2.6667, 0.3333], dtype=torch.float64)
    """
    return counter_terms_and_grad(loss, params, order)[1]


def counter_terms_and_grad(
    loss: Loss, params: Tree, order: int
) -> tuple[Tree, list[Tree]]:
    """The gradient and the counter terms, sharing every derivative in common."""
    check_order(order, minimum=1)
    terms = [counter_term_trees(k) for k in range(1, order + 1)]

    needed = set()
    for term in terms:
        for tree in term:
            _collect_subtrees(tree, needed)
    values = {LEAF: grad(loss, params)}
    for tree in sorted(needed, key=size):
        if tree != LEAF:
            children = [values[child] for child in tree]
            values[tree] = grad_derivative(loss, params, children)

    xis = []
    for term in terms:
        total = None
        for tree, coefficient in term.items():
            piece = _tree.scale(float(coefficient), values[tree])
            total = piece if total is None else _tree.axpy(1.0, piece, total)
        xis.append(total)
    return values[LEAF], xis


def _collect_subtrees(tree, found: set) -> None:
    if tree not in found:
        found.add(tree)
        for child in tree:
            _collect_subtrees(child, found)


def check_order(order: int, minimum: int = 0) -> int:
    """An order of the EoM: an integer no smaller than ``minimum``."""
    return check_int(order, "order", minimum=minimum)
