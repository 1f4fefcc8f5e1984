"""Counter terms: the corrections that make a flow pass through the GD iterates.

The EoM is ``d params/dt = -g - lr * xi`` with ``xi = xi_1 + lr xi_2 + ...``; it is
fixed by asking that its flow over a time ``lr`` be one GD step,
``params - lr g(params)``, to the order of the truncation. The first terms are

    xi_1 = 1/2 H g
    xi_2 = 1/3 H^2 g + 1/12 T(g, g)
    xi_3 = 1/4 H^3 g + 1/12 H T(g, g) + 1/12 T(Hg, g)

with ``T`` the third derivative of the loss. Every term is a rational combination of
nested derivatives of the gradient, one for each rooted tree (:mod:`eomlib.bseries`
derives the coefficients exactly).

How they are evaluated. A tree ``[c_1, ..., c_m]`` stands for
``D^m g[G(c_1), ..., G(c_m)]``, which is one reverse pass through the graph of its
*prefix* against the vector ``G(c_m)``: with ``c_m`` its largest child, the prefix
``[c_1, ..., c_{m-1}]`` is itself a tree, kept as a differentiable function of params.
So the gradient's graph is built once, every prefix's graph once, and each tree costs
one pass: ``T(g, g)`` and ``T(g, Hg)`` start from the graph of ``Hg``, ``D^4 f(g, g,
g)`` from that of ``T(g, g)``. The trees that only feed the sum of one counter term
are not evaluated one by one at all: those that share a prefix are one pass against
the combination of their last children, since a pass is linear in its vector.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction

from eomlib import _tree
from eomlib._checks import check_choice, check_int
from eomlib._tree import Tree
from eomlib.bseries import LEAF, counter_term_trees, size
from eomlib.derivatives import (
    HVP_METHODS,
    AutogradPoint,
    Loss,
    autograd_applies,
    for_second_order,
    grad,
    grad_derivative,
    reverse_or_forward,
)


def counter_terms(
    loss: Loss, params: Tree, order: int, *, method: str = "auto"
) -> list[Tree]:
    """The counter terms ``[xi_1, ..., xi_order]`` at ``params``.

    Args:
        loss: a function of ``params`` returning a 0-d tensor.
        params: a tensor or a dict of tensors.
        order: how many terms, at least 1. Order 4 needs a fourth derivative of the
            gradient; the performance appendix gives the measured cost of each order.
        method: ``"reverse"``, ``"forward"`` or ``"auto"``, as for
            :func:`eomlib.hvp`. Reverse mode shares the graphs of the derivatives
            between trees; forward mode evaluates each tree by its own nested ``jvp``.

    Returns:
        A list of ``order`` trees in the structure of ``params``.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> xis = counter_terms(lambda x: 0.5 * x @ A @ x, torch.ones(2).double(), 2)
        >>> xis[1]  # for a quadratic, xi_k = A^(k+1) params / (k+1)
        tensor([2.6667, 0.3333], dtype=torch.float64)
    """
    return counter_terms_and_grad(loss, params, order, method=method)[1]


def counter_terms_and_grad(
    loss: Loss, params: Tree, order: int, *, method: str = "auto"
) -> tuple[Tree, list[Tree]]:
    """The gradient and the counter terms, sharing every derivative in common."""
    check_order(order, minimum=1)
    check_choice(method, "method", HVP_METHODS)
    _tree.check_floating(params)
    plan = evaluation_plan(order)
    if order == 1:  # H g: no derivative above the second
        loss = for_second_order(loss)

    def reverse():
        if autograd_applies(params):
            return _shared_graphs(loss, params, plan)
        return _tree_by_tree(loss, params, order, "reverse")

    return reverse_or_forward(
        loss,
        method,
        reverse=reverse,
        forward=lambda: _tree_by_tree(loss, params, order, "forward"),
        params=params,
    )


def split(tree: tuple) -> tuple[tuple, tuple]:
    """A tree's prefix and last child: the tree without its largest child, and that
    child. ``[c_1, ..., c_m]`` is the derivative of its prefix along its last child."""
    last = max(range(len(tree)), key=lambda i: (size(tree[i]), tree[i]))
    return tree[:last] + tree[last + 1 :], tree[last]


@dataclass
class Plan:
    """What reverse mode evaluates for the counter terms up to some order.

    ``trees``: the trees evaluated one by one, smallest first; ``graphs``: those
    whose graph is kept, because they are the prefix of another. For ``xi_{k+1}``,
    ``direct[k]`` lists ``(coefficient, tree)`` for its trees evaluated one by one,
    and ``sums[k]`` maps each prefix of its other trees to their
    ``(coefficient, last child)``.
    """

    trees: list[tuple]
    graphs: set[tuple]
    direct: list[list[tuple[Fraction, tuple]]] = field(default_factory=list)
    sums: list[dict[tuple, list[tuple[Fraction, tuple]]]] = field(default_factory=list)

    @property
    def passes(self) -> int:
        """Reverse passes after the gradient: one a tree, one a prefix of a sum."""
        return len(self.trees) - 1 + sum(len(groups) for groups in self.sums)


def evaluation_plan(order: int) -> Plan:
    """The trees, kept graphs and grouped sums of reverse mode up to ``order``.

    Example:
        >>> plan = evaluation_plan(2)
        >>> plan.trees  # g and Hg one by one; H^2 g and T(g, g) only in xi_2's sum
        [(), ((),)]
        >>> plan.passes
        3
    """
    check_order(order, minimum=1)
    vectors, graphs = set(), set()

    def need(tree, as_graph):
        if tree in (graphs if as_graph else vectors):
            return
        (graphs if as_graph else vectors).add(tree)
        if tree != LEAF:
            prefix, last = split(tree)
            need(prefix, as_graph=True)
            need(last, as_graph=False)

    terms = [counter_term_trees(k) for k in range(1, order + 1)]
    for term in terms:
        for tree in term:
            prefix, last = split(tree)
            need(prefix, as_graph=True)
            need(last, as_graph=False)
    evaluated = vectors | graphs
    plan = Plan(sorted(evaluated, key=lambda tree: (size(tree), tree)), graphs)
    for term in terms:
        direct, groups = [], defaultdict(list)
        for tree, coefficient in term.items():
            if tree in evaluated:
                direct.append((coefficient, tree))
            else:
                prefix, last = split(tree)
                groups[prefix].append((coefficient, last))
        plan.direct.append(direct)
        plan.sums.append(dict(groups))
    return plan


def elementary_differentials(
    point: AutogradPoint, trees: list[tuple], keep: set
) -> tuple[dict, dict]:
    """Each tree's elementary differential at ``point``, as leaves.

    ``trees`` are ordered so that a tree's prefix and its last child come before
    it; each costs one reverse pass through the graph of its prefix
    (:func:`split`). Returns the graphs of the trees in ``keep``, which later
    trees or products differentiate through, and every tree's detached value.
    """
    graph, value = {}, {}
    for tree in trees:
        kept = tree in keep
        if tree == LEAF:
            result = point.gradient(create_graph=kept)
        else:
            prefix, last = split(tree)
            result = point.pullback(graph[prefix], value[last], create_graph=kept)
        if kept:
            graph[tree] = result
        value[tree] = [leaf.detach() for leaf in result]
    return graph, value


def _shared_graphs(loss: Loss, params: Tree, plan: Plan) -> tuple[Tree, list[Tree]]:
    point = AutogradPoint(loss, params)
    graph, value = elementary_differentials(point, plan.trees, plan.graphs)

    xis = []
    for direct, groups in zip(plan.direct, plan.sums):
        total = _combination([(c, value[tree]) for c, tree in direct], value[LEAF])
        for prefix, items in groups.items():
            vector = _combination([(c, value[last]) for c, last in items], total)
            piece = point.pullback(graph[prefix], vector, create_graph=False)
            for acc, leaf in zip(total, piece):
                acc.add_(leaf)
        xis.append(point.tree(total))
    return point.tree(value[LEAF]), xis


def _combination(terms, like):
    """``sum_i c_i v_i`` leaf by leaf, for ``terms = [(c_i, v_i)]``."""
    total = [leaf.new_zeros(leaf.shape) for leaf in like]
    for coefficient, vector in terms:
        for acc, leaf in zip(total, vector):
            acc.add_(leaf, alpha=float(coefficient))

    return total


def _tree_by_tree(
    loss: Loss, params: Tree, order: int, method: str
) -> tuple[Tree, list[Tree]]:
    """Each tree by its own nested derivative; the way that works inside torch.func
    transforms, and the only one in forward mode."""
    terms = [counter_term_trees(k) for k in range(1, order + 1)]
    needed = set()
    for term in terms:
        for tree in term:
            _collect_subtrees(tree, needed)
    values = {LEAF: grad(loss, params)}
    for tree in sorted(needed, key=size):
        if tree != LEAF:
            children = [values[child] for child in tree]
            values[tree] = grad_derivative(loss, params, children, method=method)

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
