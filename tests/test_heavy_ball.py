"""Heavy-ball momentum's modified field against sympy, closed forms, exact rates on
quadratics and the real iterates of ``torch.optim.SGD``, all in float64."""

from fractions import Fraction

import pytest
import sympy as sp
import torch

import eomlib
from eomlib import bseries, symbolic
from eomlib.figures import fit_slope
from eomlib.optimizers import heavy_ball

F = Fraction
HG = (bseries.LEAF,)
A = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
X0 = torch.tensor([1.0, -0.7], dtype=torch.float64)
LRS = [0.02, 0.01, 0.005]
# Settled iterates at the same time t = 1.2 for every lr (beta^n < 1e-18 there).
TIME = 1.2
HYPERS = {
    "momentum": {"momentum": 0.5},
    "dampening": {"momentum": 0.5, "dampening": 0.3},
    "nesterov": {"momentum": 0.5, "nesterov": True},
}
TOLERANCE = 0.3


def _quartic(x):
    """A 2-D loss whose third and fourth derivatives do not vanish."""
    return 0.5 * x @ A @ x + 0.1 * (x**4).sum() + 0.05 * x[0] ** 3


def _settled_runs(hyper):
    """For each lr: the iterates and states of SGD, and the settled step n."""
    runs = []
    for lr in LRS:
        n = round(TIME / lr)
        iterates, states = eomlib.optimizer_trajectory(
            _quartic, X0, torch.optim.SGD, n + 8, state=True, lr=lr, **hyper
        )
        runs.append((lr, n, iterates, states))
    return runs


@pytest.fixture(scope="module", params=sorted(HYPERS))
def settled(request):
    hyper = HYPERS[request.param]
    return hyper, _settled_runs(hyper)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("order", [1, 2])
def test_field_coefficients_match_the_sympy_derivation_in_one_dimension(
    order, nesterov
):
    beta, c = sp.symbols("beta c", positive=True)
    x, lr = symbolic.x, symbolic.lr
    derivatives = [sp.diff(symbolic.g(x), x, m) for m in range(order + 1)]
    a = heavy_ball.field_coefficients(order, beta, 1 - c, nesterov=nesterov)
    from_trees = sum(
        lr ** (bseries.size(t) - 1) * v * bseries.collapse(t, derivatives)
        for t, v in a.items()
    )
    derived = heavy_ball.symbolic_field_1d(order, nesterov=nesterov)
    assert sp.simplify(from_trees - derived) == 0


@pytest.mark.parametrize("beta", [F(0), F(1, 2), F(9, 10)])
@pytest.mark.parametrize("dampening", [F(0), F(3, 10)])
def test_first_coefficients_are_the_closed_forms(beta, dampening):
    c = 1 - dampening
    a = heavy_ball.field_coefficients(1, beta, dampening)
    assert a[bseries.LEAF] == -c / (1 - beta)
    assert a[HG] == -(c**2) * (1 + beta) / (2 * (1 - beta) ** 3)


def test_first_buffer_coefficients_are_the_closed_forms():
    beta, c = F(1, 2), F(7, 10)
    r = heavy_ball.buffer_coefficients(1, beta, 1 - c)
    assert r[bseries.LEAF] == c / (1 - beta)
    assert r[HG] == c**2 * beta / (1 - beta) ** 3


def _quadratic_errors(momentum, dampening, fraction):
    """Relative errors of the field of each order against the exact slow rate on
    ``lambda/2 x^2``, at ``lr c lambda = fraction (1 - sqrt(beta))^2``."""
    curvature, x = 2.0, 0.7
    lr = fraction * (1 - momentum**0.5) ** 2 / ((1 - dampening) * curvature)
    exact = heavy_ball.exact_slow_rate(lr, curvature, momentum, dampening) * x
    params = torch.tensor([x], dtype=torch.float64)

    def loss(params):
        return 0.5 * curvature * (params**2).sum()

    errors = []
    for order in range(heavy_ball.MAX_ORDER + 1):
        field = heavy_ball.sgd_field(
            loss, order=order, lr=lr, momentum=momentum, dampening=dampening
        )
        errors.append(abs(float(field(params)[0]) - exact) / abs(exact))
    return errors


HYPERS_1D = [(0.5, 0.0), (0.9, 0.0), (0.5, 0.3)]


@pytest.mark.parametrize("momentum, dampening", HYPERS_1D)
def test_on_a_quadratic_each_order_gains_a_factor_ten_inside_the_radius(
    momentum, dampening
):
    errors = _quadratic_errors(momentum, dampening, 0.05)
    assert all(later < 0.1 * earlier for earlier, later in zip(errors, errors[1:]))


@pytest.mark.parametrize("momentum, dampening", HYPERS_1D)
def test_on_a_quadratic_the_field_reaches_the_exact_slow_rate_to_round_off(
    momentum, dampening
):
    errors = _quadratic_errors(momentum, dampening, 1e-4)
    assert errors[0] > 1e-6
    assert errors[-1] < 1e-14


def test_exact_slow_rate_refuses_complex_roots():
    with pytest.raises(ValueError, match="complex"):
        heavy_ball.exact_slow_rate(0.1, 10.0, 0.5)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_without_momentum_the_field_is_gds_eom(order):
    lr = 0.05
    sgd = heavy_ball.sgd_field(_quartic, order=order, lr=lr, dampening=0.4)
    gd = eomlib.eom_field(_quartic, lr, order)
    torch.testing.assert_close(sgd(X0), gd(X0), rtol=1e-14, atol=1e-14)


def test_modified_field_dispatches_sgd_to_heavy_ball():
    field = eomlib.modified_field(
        _quartic, torch.optim.SGD, order=2, lr=0.01, momentum=0.5
    )
    direct = heavy_ball.sgd_field(_quartic, order=2, lr=0.01, momentum=0.5)
    torch.testing.assert_close(field(X0), direct(X0), rtol=0, atol=0)


@pytest.mark.parametrize("order", range(4))
def test_field_matches_the_iterates_field_with_slope_order_plus_one(settled, order):
    hyper, runs = settled
    errors = []
    for lr, n, iterates, _ in runs:
        read = eomlib.field_from_iterates(iterates, lr, 5)[n]
        field = heavy_ball.sgd_field(_quartic, order=order, lr=lr, **hyper)
        errors.append(float(torch.linalg.vector_norm(field(iterates[n]) - read)))
    assert fit_slope(LRS, errors) == pytest.approx(order + 1, abs=TOLERANCE)


@pytest.mark.parametrize("order", range(4))
def test_flow_of_the_field_meets_the_next_iterate_with_slope_order_plus_two(
    settled, order
):
    hyper, runs = settled
    errors = []
    for lr, n, iterates, _ in runs:
        field = heavy_ball.sgd_field(_quartic, order=order, lr=lr, **hyper)
        times = torch.tensor([0.0, lr], dtype=torch.float64)
        flow = eomlib.integrate(
            field, iterates[n], times, solver="dopri8", rtol=1e-13, atol=1e-16
        )
        errors.append(float(torch.linalg.vector_norm(flow[-1] - iterates[n + 1])))
    assert fit_slope(LRS, errors) == pytest.approx(order + 2, abs=TOLERANCE)


@pytest.mark.parametrize("order", range(4))
def test_slow_buffer_matches_torchs_buffer_with_slope_order_plus_one(settled, order):
    hyper, runs = settled
    errors = []
    for lr, n, iterates, states in runs:
        buffer = heavy_ball.slow_buffer(_quartic, order=order, lr=lr, **hyper)
        distances = heavy_ball.buffer_distances(
            buffer, iterates[n : n + 1], states[n : n + 1]
        )
        errors.append(float(distances[0]))
    assert fit_slope(LRS, errors) == pytest.approx(order + 1, abs=TOLERANCE)


def test_field_distances_read_the_same_errors_as_by_hand():
    lr, hyper = 0.01, HYPERS["momentum"]
    iterates = eomlib.optimizer_trajectory(
        _quartic, X0, torch.optim.SGD, 20, lr=lr, **hyper
    )
    field = heavy_ball.sgd_field(_quartic, order=1, lr=lr, **hyper)
    distances = heavy_ball.field_distances(field, iterates, lr, 3)
    read = eomlib.field_from_iterates(iterates, lr, 3)
    assert distances.shape == (20 - 3 - 1 + 1,)
    by_hand = torch.linalg.vector_norm(read[7] - field(iterates[7]))
    torch.testing.assert_close(distances[7], by_hand, rtol=1e-14, atol=0)


def test_the_buffer_starts_off_the_manifold_and_settles_like_beta_to_the_k():
    # The fast root beta / z_slow is beta to within lr c lambda / (1 - beta).
    lr, momentum = 0.002, 0.5
    iterates, states = eomlib.optimizer_trajectory(
        _quartic, X0, torch.optim.SGD, 40, state=True, lr=lr, momentum=momentum
    )
    buffer = heavy_ball.slow_buffer(_quartic, order=3, lr=lr, momentum=momentum)
    distances = heavy_ball.buffer_distances(buffer, iterates, states)
    # b_0 = g(params_0) is a factor 1 - beta off the manifold's c/(1-beta) g.
    assert distances[0] > 0.3 * torch.linalg.vector_norm(eomlib.grad(_quartic, X0))
    ratios = distances[1:15] / distances[:14]
    torch.testing.assert_close(
        ratios, torch.full_like(ratios, momentum), rtol=0.05, atol=0
    )


@pytest.mark.parametrize("momentum, tolerance", [(0.5, 1e-3), (0.9, 1e-6), (0.99, 0.1)])
def test_transient_steps_is_the_first_k_with_beta_to_the_k_below_tolerance(
    momentum, tolerance
):
    steps = heavy_ball.transient_steps(momentum, tolerance)
    assert momentum**steps <= tolerance < momentum ** (steps - 1)


def test_transient_steps_is_zero_without_momentum_or_with_a_loose_tolerance():
    assert heavy_ball.transient_steps(0.0, 1e-6) == 0
    assert heavy_ball.transient_steps(0.9, 1.0) == 0


def test_settling_steps_is_the_step_after_the_last_one_above_tolerance():
    distances = [5.0, 1.0, 3.0, 0.1, 0.2, 0.05]
    assert heavy_ball.settling_steps(distances, 0.5) == 3
    assert heavy_ball.settling_steps(distances, 10.0) == 0
    assert heavy_ball.settling_steps([1.0, 2.0], 0.5) == 2


@pytest.mark.parametrize(
    "hyper, message",
    [
        ({"momentum": 1.0}, r"momentum=1\.0"),
        ({"momentum": -0.1}, r"momentum=-0\.1"),
        ({"momentum": 0.5, "dampening": 1.5}, r"dampening=1\.5"),
        ({"momentum": 0.5, "dampening": 0.1, "nesterov": True}, r"dampening=0\.1"),
        ({"momentum": 0.0, "nesterov": True}, r"momentum=0\.0"),
        ({"momentum": 0.5, "order": heavy_ball.MAX_ORDER + 1}, r"order=5"),
        ({"momentum": 0.5, "order": -1}, r"order=-1"),
        ({"momentum": 0.5, "lr": 0.0}, r"lr=0\.0"),
    ],
)
def test_bad_hyper_parameters_give_messages_naming_the_value(hyper, message):
    hyper = {"lr": 0.01, **hyper}
    with pytest.raises(ValueError, match=message):
        heavy_ball.sgd_field(_quartic, **hyper)
    if hyper.get("momentum", 0) > 0:
        with pytest.raises(ValueError, match=message):
            heavy_ball.slow_buffer(_quartic, **hyper)


def test_nesterov_must_be_a_bool():
    with pytest.raises(TypeError, match="nesterov='yes'"):
        heavy_ball.sgd_field(_quartic, lr=0.01, momentum=0.5, nesterov="yes")


def test_slow_buffer_needs_momentum():
    with pytest.raises(ValueError, match="momentum=0.0"):
        heavy_ball.slow_buffer(_quartic, lr=0.01, momentum=0.0)


def test_bad_tolerances_give_messages_naming_the_value():
    with pytest.raises(ValueError, match="tolerance=-1"):
        heavy_ball.settling_steps([1.0], -1)
    with pytest.raises(ValueError, match="tolerance=0"):
        heavy_ball.transient_steps(0.5, 0)
    with pytest.raises(ValueError, match="momentum=1.0"):
        heavy_ball.transient_steps(1.0, 1e-3)


def test_settled_errors_are_the_errors_measured_by_hand():
    lr, n, hyper = 0.01, 120, HYPERS["dampening"]
    errors = heavy_ball.settled_errors(
        _quartic, X0, lr=lr, orders=[0, 2], num_steps=n, **hyper
    )
    iterates = eomlib.optimizer_trajectory(
        _quartic, X0, torch.optim.SGD, n + 7, lr=lr, **hyper
    )
    read = eomlib.field_from_iterates(iterates, lr, 5)[n]
    torch.testing.assert_close(errors["params"], iterates[n], rtol=0, atol=0)
    for order in (0, 2):
        field = heavy_ball.sgd_field(_quartic, order=order, lr=lr, **hyper)
        by_hand = float(torch.linalg.vector_norm(field(iterates[n]) - read))
        assert errors["field"][order] == pytest.approx(by_hand, rel=1e-12)
    assert errors["one_step"][2] < 1e-2 * errors["one_step"][0]


def test_relative_buffer_distances_start_where_torchs_first_buffer_is():
    # torch starts with b_0 = g undamped; against B = c/(1-beta) g that is a
    # relative distance |1 - beta - c| / c (beta without dampening).
    lr, momentum, dampening = 0.01, 0.7, 0.2
    iterates, states = eomlib.optimizer_trajectory(
        _quartic,
        X0,
        torch.optim.SGD,
        3,
        state=True,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
    )
    buffer = heavy_ball.slow_buffer(
        _quartic, order=0, lr=lr, momentum=momentum, dampening=dampening
    )
    distances = heavy_ball.buffer_distances(buffer, iterates, states, relative=True)
    c = 1 - dampening
    expected = abs(1 - momentum - c) / c
    assert float(distances[0]) == pytest.approx(expected, rel=1e-12)
