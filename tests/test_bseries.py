"""The tree algebra behind the counter terms, against truths that do not use it."""

from fractions import Fraction

import pytest
import sympy as sp

from eomlib import bseries, symbolic

F = Fraction


def _chain(length: int):
    """``H^length g``: a path of ``length + 1`` nodes."""
    tree = bseries.LEAF
    for _ in range(length):
        tree = (tree,)
    return tree


def test_the_first_three_counter_terms_are_the_known_ones():
    leaf, hg = bseries.LEAF, (bseries.LEAF,)
    assert bseries.counter_term_trees(1) == {hg: F(1, 2)}
    assert bseries.counter_term_trees(2) == {(hg,): F(1, 3), (leaf, leaf): F(1, 12)}
    assert bseries.counter_term_trees(3) == {
        ((hg,),): F(1, 4),  # H^3 g
        ((leaf, leaf),): F(1, 12),  # H T(g, g)
        (leaf, hg): F(1, 12),  # T(Hg, g)
    }


@pytest.mark.parametrize("order", range(1, 7))
def test_chain_coefficients_are_those_of_the_logarithm(order):
    # For a quadratic only H^k g survives, and log(1 - lr H)/lr gives 1/(k+1).
    assert bseries.counter_term_trees(order)[_chain(order)] == F(1, order + 1)


@pytest.mark.parametrize(
    "tree", [bseries.LEAF, ((),), ((), ()), (((),), ()), (((), ()), ((),))]
)
def test_grafting_attaches_once_to_every_node(tree):
    grafted = bseries.graft(bseries.LEAF, tree)
    assert sum(grafted.values()) == bseries.size(tree)
    assert all(bseries.size(t) == bseries.size(tree) + 1 for t in grafted)


@pytest.mark.parametrize("order", range(1, 6))
def test_trees_collapse_to_the_sympy_derivation_in_one_dimension(order):
    x = symbolic.x
    derivatives = [sp.diff(symbolic.g(x), x, m) for m in range(order + 2)]
    from_trees = sum(
        sp.Rational(c.numerator, c.denominator) * bseries.collapse(tree, derivatives)
        for tree, c in bseries.counter_term_trees(order).items()
    )
    from_sympy = symbolic.counter_terms_1d(order)[order - 1]
    assert sp.expand(from_trees - from_sympy) == 0


def test_to_text_writes_the_books_notation():
    assert bseries.to_text(((bseries.LEAF,),)) == "HHg"
    assert bseries.to_text((bseries.LEAF,) * 3) == "D^4f(g, g, g)"
