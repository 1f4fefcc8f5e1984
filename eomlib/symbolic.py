"""The counter terms derived symbolically in one dimension, with sympy.

This is the derivation of the book's "Deriving the EoM" chapter, and an independent
check of :mod:`eomlib.bseries`: it knows nothing about trees. For a loss of one
variable ``x`` with derivative ``g(x)``, the modified field
``F = -g - lr xi_1 - ... - lr^K xi_K`` is expanded in its Lie series,
``x(lr) = x + sum_{j>=1} lr^j / j! (L^(j-1) F)(x)`` with ``L u = u' F``, and ``xi_n``
is read off the coefficient of ``lr^(n+1)``, which must vanish for the flow to match
the GD step ``x - lr g(x)``.
"""

from __future__ import annotations

import sympy as sp

from eomlib._checks import check_int

x, lr = sp.symbols("x eta", real=True)
g = sp.Function("g")


def flow_series(field: sp.Expr, order: int) -> sp.Expr:
    """The time-``lr`` flow of ``dx/dt = field(x)``, as a polynomial in ``lr`` up to
    ``lr^order``, minus ``x``."""
    total, term = sp.Integer(0), field
    for j in range(1, order + 1):
        total += lr**j / sp.factorial(j) * term
        # Only powers of lr up to order - j - 1 can still reach the result.
        term = _truncate(sp.diff(term, x) * field, order - j - 1)
    return sp.expand(total)


def _truncate(expression: sp.Expr, degree: int) -> sp.Expr:
    """The polynomial in ``lr`` cut after ``lr^degree``."""
    expression = sp.expand(expression)
    return sum(
        (expression.coeff(lr, p) * lr**p for p in range(degree + 1)), sp.Integer(0)
    )


def counter_terms_1d(order: int) -> list[sp.Expr]:
    """``[xi_1, ..., xi_order]`` in terms of ``g(x)`` and its derivatives.

    Example:
        >>> counter_terms_1d(2)[1]
        g(x)**2*Derivative(g(x), (x, 2))/12 + g(x)*Derivative(g(x), x)**2/3
    """
    check_int(order, "order", minimum=1)
    xis: list[sp.Expr] = []
    for n in range(1, order + 1):
        field = -g(x) - sum(lr**k * xi for k, xi in enumerate(xis, start=1))
        # With xi_n left out, the lr^(n+1) coefficient of the flow is exactly xi_n.
        coefficient = flow_series(field, n + 1).coeff(lr, n + 1)
        xis.append(sp.expand(coefficient))
    return xis


def for_loss(expression: sp.Expr, loss: sp.Expr) -> sp.Expr:
    """Substitute a concrete loss of ``x``: ``g`` becomes its derivative."""
    return expression.subs(g(x), sp.diff(loss, x)).doit()
