"""The sympy derivation: a flow of its counter terms matches one GD step."""

import pytest
import sympy as sp

from eomlib import symbolic

x, lr = symbolic.x, symbolic.lr


@pytest.mark.parametrize("order", range(1, 5))
def test_the_truncated_eom_flow_matches_one_gd_step_to_its_order(order):
    xis = symbolic.counter_terms_1d(order)
    field = -symbolic.g(x) - sum(lr**k * xi for k, xi in enumerate(xis, start=1))
    flow = symbolic.flow_series(field, order + 2)
    residual = sp.expand(flow + lr * symbolic.g(x))  # flow minus the GD step
    for power in range(order + 2):
        assert sp.expand(residual.coeff(lr, power)) == 0
    assert sp.expand(residual.coeff(lr, order + 2)) != 0


def test_for_a_quadratic_the_series_is_the_logarithm():
    a = sp.Symbol("a", positive=True)
    xis = [symbolic.for_loss(xi, a * x**2 / 2) for xi in symbolic.counter_terms_1d(5)]
    for k, xi in enumerate(xis, start=1):
        assert sp.expand(xi - a ** (k + 1) * x / (k + 1)) == 0
