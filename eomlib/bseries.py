"""The counter terms as sums over rooted trees, with exact rational coefficients.

Backward error analysis writes every term of a modified equation as a combination of
*elementary differentials*, one for each rooted tree. For the field ``f = -g`` of GD:

* the one-node tree ``•`` stands for ``f`` itself;
* a tree whose root has subtrees ``t_1, ..., t_m`` stands for
  ``f^(m)[F(t_1), ..., F(t_m)]``, the m-th derivative of ``f`` applied to them.

So ``[•]`` is ``f' f`` (``= H g``), ``[[•]]`` is ``f' f' f`` and ``[•, •]`` is
``f''[f, f]``. Differentiating an elementary differential along another grafts the
other tree onto each node in turn, which turns the Taylor series of a flow into
arithmetic on trees.

The modified field of GD is ``F = sum_t lr^(|t| - 1) b(t) F(t)``, ``|t|`` the number of
nodes, with ``b`` fixed by asking that the time-``lr`` flow of ``F``,
``params + sum_{j>=1} lr^j / j! L_F^(j-1) F`` (``L_F`` the derivative along ``F``), be
the GD step ``params + lr f``: ``b(•) = 1`` and every larger tree's coefficient in the
flow vanishes. With ``f = -g`` each node carries a sign, so the counter term of order
k is ``xi_k = (-1)^k sum_{|t| = k+1} b(t) G(t)``, where ``G`` is ``F`` with ``g`` in
place of ``f``.

A tree is a sorted tuple of its subtrees; the one-node tree is ``()``.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from fractions import Fraction

from eomlib._checks import check_int

Tree = tuple
LEAF: Tree = ()


def size(tree: Tree) -> int:
    """The number of nodes."""
    return 1 + sum(size(child) for child in tree)


def _with_child(tree: Tree, child: Tree) -> Tree:
    return tuple(sorted((*tree, child)))


def graft(scion: Tree, tree: Tree) -> Counter:
    """``tree`` with ``scion`` attached to each of its nodes in turn, with multiplicity.

    This is the derivative of the elementary differential of ``tree`` along that of
    ``scion``.
    """
    grafted = Counter({_with_child(tree, scion): 1})
    for i, child in enumerate(tree):
        rest = tree[:i] + tree[i + 1 :]
        for new_child, count in graft(scion, child).items():
            grafted[tuple(sorted((*rest, new_child)))] += count
    return grafted


def lie_derivative(series: dict, field: dict, max_size: int) -> dict:
    """``L_field series``: each tree of ``field`` grafted onto each of ``series``,
    trees of up to ``max_size`` nodes; zero coefficients are left out.

    ``series`` and ``field`` map trees to coefficients, which may be numbers,
    fractions or sympy expressions.

    Example:
        >>> lie_derivative({(): 1}, {(): 1}, 2)  # the derivative of g along g: H g
        {((),): 1}
    """
    result: Counter = Counter()
    for tree, coefficient in series.items():
        for scion, weight in field.items():
            if size(tree) + size(scion) > max_size:
                continue
            for grafted, count in graft(scion, tree).items():
                result[grafted] += coefficient * weight * count
    return {tree: c for tree, c in result.items() if c != 0}


def modified_field_coefficients(max_size: int) -> dict[Tree, Fraction]:
    """The coefficients ``b(t)`` of GD's modified field, for trees of up to
    ``max_size`` nodes; trees whose coefficient is zero are left out.

    Example:
        >>> b = modified_field_coefficients(3)
        >>> b[()], b[((),)], b[((), ())], b[(((),),)]
        (Fraction(1, 1), Fraction(-1, 2), Fraction(1, 12), Fraction(1, 3))
    """
    check_int(max_size, "max_size", minimum=1)
    return dict(_coefficients(max_size))


@functools.cache
def _coefficients(max_size: int) -> dict[Tree, Fraction]:
    b: dict[Tree, Fraction] = {LEAF: Fraction(1)}
    for n in range(2, max_size + 1):
        # The flow's trees of n nodes, from every j >= 2 (j = 1 contributes b itself).
        flow_terms: Counter = Counter()
        power = dict(b)
        for j in range(2, n + 1):
            power = lie_derivative(power, b, n)
            for tree, coefficient in power.items():
                if size(tree) == n:
                    flow_terms[tree] += coefficient / math.factorial(j)
        b.update({tree: -c for tree, c in flow_terms.items() if c != 0})
    return b


def counter_term_trees(order: int) -> dict[Tree, Fraction]:
    """The trees of ``xi_order`` and their coefficients in terms of ``g``:
    ``xi_order = sum_t c(t) G(t)``.

    Example:
        >>> counter_term_trees(1)
        {((),): Fraction(1, 2)}
    """
    check_int(order, "order", minimum=1)
    sign = -1 if order % 2 else 1
    return {
        tree: sign * coefficient
        for tree, coefficient in modified_field_coefficients(order + 1).items()
        if size(tree) == order + 1
    }


def collapse(tree: Tree, derivatives):
    """The elementary differential of ``tree`` in one dimension, where every product
    commutes: the product over its nodes of ``derivatives[m]``, m the node's number
    of children (``derivatives[m]`` stands for the m-th derivative of ``g``).

    Example:
        >>> collapse(((), ((),)), [2, 3, 5])  # T(g, Hg) -> g'' g (g' g) = 5 2 3 2
        60
    """
    value = derivatives[len(tree)]
    for child in tree:
        value = value * collapse(child, derivatives)
    return value


def to_text(tree: Tree) -> str:
    """An elementary differential of ``g`` in the book's notation: ``H``, ``T``,
    ``D^m g`` for the derivatives, ``g`` for the leaf.

    Example:
        >>> to_text(((), ((),)))
        'T(g, Hg)'
    """
    if tree == LEAF:
        return "g"
    if len(tree) == 1:
        return "H" + to_text(tree[0])
    name = "T" if len(tree) == 2 else f"D^{len(tree) + 1}f"
    return f"{name}({', '.join(to_text(child) for child in tree)})"
