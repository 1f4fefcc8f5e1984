"""Adam's and RMSprop's modified flows against torch's own iterates and state."""

import functools
import math

import pytest
import torch

import eomlib
from eomlib.figures import fit_slope
from eomlib.optimizers import adaptive, heavy_ball

LRS = [0.01, 0.005, 0.0025, 0.00125]

# The time at which settled iterates are compared: past the transient of the
# largest lr, and before the run nears the minimum, where g crosses zero. From the
# start below every |g_i| stays above 1 until then; where a g_i comes down to eps
# the higher orders are larger and the slopes on these lrs are further from their
# limits (from (1.5, -1.2), RMSprop's order 1 fits 1.78 here, 2.02 on lrs 8x smaller).
TIME = 0.6
TOL = 1e-8

# Averages short enough for fast tests; eps of the order of the gradients, so that
# D = |g| P lies well inside (0, 1) and the first-order weight is neither limit.
CASES = {
    "Adam": (torch.optim.Adam, {"betas": (0.5, 0.6), "eps": 0.1}),
    "RMSprop": (torch.optim.RMSprop, {"alpha": 0.6, "eps": 0.1}),
}


def _loss(x):
    return 0.25 * (x**4).sum() + 0.5 * x[0] * x[1] + 0.3 * x.sum() + 0.5 * x @ x


def _start(values=(1.5, 1.2)):
    return torch.tensor(values, dtype=torch.float64)


def _settled_run(optimizer, hyper, lr, extra, start=None, **kw):
    """Iterates (and states) up to ``n + extra``, with ``n = round(TIME / lr)``."""
    transient = adaptive.transient_steps(optimizer, TOL, **_memory_hyper(hyper))
    n = round(TIME / lr)
    assert n > transient
    start = _start() if start is None else start
    run = eomlib.optimizer_trajectory(
        _loss, start, optimizer, n + extra, lr=lr, **hyper, **kw
    )
    return n, run


@functools.cache
def _case_run(name, lr):
    """``n``, the iterates to ``n + 4`` and the states of case ``name``, run once."""
    optimizer, hyper = CASES[name]
    return _settled_run(optimizer, hyper, lr, 4, state=True)


def _memory_hyper(hyper):
    return {k: v for k, v in hyper.items() if k in ("betas", "alpha")}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("order", adaptive.ORDERS)
def test_the_field_matches_the_field_read_off_settled_iterates_with_slope_order_plus_1(
    name, order
):
    optimizer, hyper = CASES[name]
    errors = []
    for lr in LRS:
        n, (iterates, _) = _case_run(name, lr)
        read_off = eomlib.field_from_iterates(iterates[n : n + order + 2], lr, order)
        field = eomlib.modified_field(_loss, optimizer, order=order, lr=lr, **hyper)
        errors.append(float((field(iterates[n]) - read_off[0]).norm()))
    assert abs(fit_slope(LRS, errors) - (order + 1)) < 0.3, errors


@pytest.mark.parametrize("name", CASES)
# Order 2 takes nested forward-mode passes at each of the solver's evaluations.
@pytest.mark.parametrize("order", [0, 1, pytest.param(2, marks=pytest.mark.slow)])
def test_one_step_of_the_flow_from_a_settled_iterate_has_local_error_order_plus_2(
    name, order
):
    optimizer, hyper = CASES[name]
    errors = []
    for lr in LRS:
        n, (iterates, _) = _case_run(name, lr)
        field = eomlib.modified_field(_loss, optimizer, order=order, lr=lr, **hyper)
        times = torch.tensor([0.0, lr], dtype=torch.float64)
        flowed = eomlib.integrate(field, iterates[n], times)[-1]
        errors.append(float((flowed - iterates[n + 1]).norm()))
    assert abs(fit_slope(LRS, errors) - (order + 2)) < 0.3, errors


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("order", adaptive.MANIFOLD_ORDERS)
def test_slow_manifold_matches_torchs_settled_state_with_slope_order_plus_1(
    name, order
):
    optimizer, hyper = CASES[name]
    errors = []
    for lr in LRS:
        n, (iterates, states) = _case_run(name, lr)
        stored = states[n - 1][None]  # the state after the step that lands on n
        predicted = adaptive.slow_manifold(
            _loss, iterates[n], optimizer, order=order, lr=lr, **hyper
        )
        errors.append(max(float((predicted[k] - stored[k]).norm()) for k in predicted))
    assert abs(fit_slope(LRS, errors) - (order + 1)) < 0.3, errors


def test_the_gradient_of_the_perturbed_one_norm_is_the_hvp_of_p_g():
    eps = 0.1
    params = _start()

    def psi(x):
        return adaptive.perturbed_one_norm(torch.func.grad(_loss)(x), eps)

    g = eomlib.grad(_loss, params)
    expected = eomlib.hvp(_loss, params, g / (g.abs() + eps))
    torch.testing.assert_close(
        torch.func.grad(psi)(params), expected, rtol=0, atol=1e-14
    )


def test_perturbed_one_norm_is_the_one_norm_for_large_g_and_a_square_for_small():
    g = torch.tensor([3.0, -4.0], dtype=torch.float64)
    large = adaptive.perturbed_one_norm(g, 1e-6)
    small = adaptive.perturbed_one_norm(g, 1e6)
    assert abs(large - 7.0) < 1e-4
    assert abs(small - 25.0 / 2e6) / (25.0 / 2e6) < 1e-5


@pytest.mark.parametrize("name", CASES)
def test_the_rates_of_psi_are_its_gradient_along_the_two_terms_of_the_field(name):
    optimizer, hyper = CASES[name]
    hyper, params = {"lr": 0.01, **hyper}, _start()
    rates = adaptive.perturbed_one_norm_rates(_loss, params, optimizer, **hyper)

    def psi(x):
        return adaptive.perturbed_one_norm(torch.func.grad(_loss)(x), hyper["eps"])

    grad_psi = torch.func.grad(psi)(params)
    f0 = eomlib.modified_field(_loss, optimizer, order=0, **hyper)(params)
    f1 = eomlib.modified_field(_loss, optimizer, order=1, **hyper)(params)
    assert abs(rates["order_0"] - float(grad_psi @ f0)) < 1e-12
    assert abs(rates["first_order"] - float(grad_psi @ (f1 - f0))) < 1e-12
    split = rates["penalty"] + rates["anti_penalty"]
    assert abs(split - rates["first_order"]) < 1e-15
    assert rates["penalty"] <= 0 <= rates["anti_penalty"]


def test_with_beta1_above_beta2_every_coordinate_is_penalized():
    hyper = {"lr": 0.01, "betas": (0.99, 0.9), "eps": 1e-3}
    rates = adaptive.perturbed_one_norm_rates(
        _loss, _start(), torch.optim.Adam, **hyper
    )
    assert rates["anti_penalty"] == 0 and rates["penalty"] < 0


def test_torchs_adam_step_is_the_bias_corrected_moments_over_root_plus_eps():
    betas, eps, lr = (0.5, 0.6), 0.1, 0.01
    iterates, states = eomlib.optimizer_trajectory(
        _loss, _start(), torch.optim.Adam, 5, lr=lr, betas=betas, eps=eps, state=True
    )
    for k in range(1, 6):
        state = states[k - 1][None]
        assert int(state["step"]) == k
        m_hat = state["exp_avg"] / (1 - betas[0] ** k)
        v_hat = state["exp_avg_sq"] / (1 - betas[1] ** k)
        step = -lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(iterates[k] - iterates[k - 1], step)


def test_without_bias_correction_adams_step_would_carry_the_counter_factor():
    # With eps -> 0 the raw moments give (1 - beta1^k) / sqrt(1 - beta2^k) times
    # the corrected step, at order 0.
    betas, lr = (0.5, 0.9), 1e-6
    iterates, states = eomlib.optimizer_trajectory(
        _loss, _start(), torch.optim.Adam, 4, lr=lr, betas=betas, eps=1e-300, state=True
    )
    for k in range(1, 5):
        state = states[k - 1][None]
        raw = -lr * state["exp_avg"] / state["exp_avg_sq"].sqrt()
        factor = (1 - betas[0] ** k) / math.sqrt(1 - betas[1] ** k)
        torch.testing.assert_close(raw, factor * (iterates[k] - iterates[k - 1]))


def test_adams_first_step_is_exactly_minus_lr_p_g():
    hyper = {"lr": 0.05, "betas": (0.5, 0.6), "eps": 0.1}
    iterates = eomlib.optimizer_trajectory(
        _loss, _start(), torch.optim.Adam, 1, **hyper
    )
    expected = adaptive.adam_step(_loss, _start(), 1, **hyper)
    torch.testing.assert_close(iterates[1] - iterates[0], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("step", [2, 3, 6])
def test_adams_early_steps_follow_the_shorter_memory_with_error_slope_three(step):
    betas, eps = (0.5, 0.6), 0.1
    errors = []
    for lr in LRS:
        iterates = eomlib.optimizer_trajectory(
            _loss, _start(), torch.optim.Adam, step, lr=lr, betas=betas, eps=eps
        )
        predicted = adaptive.adam_step(
            _loss, iterates[step - 1], step, lr=lr, betas=betas, eps=eps
        )
        errors.append(float((iterates[step] - iterates[step - 1] - predicted).norm()))
    assert abs(fit_slope(LRS, errors) - 3) < 0.3, errors


def test_adam_leaves_the_settled_flow_in_its_first_steps_and_follows_it_after():
    # One step of the order-1 field from params_{k-1}: O(lr^2) off Adam's k-th step
    # while the memory is short (k = 2), O(lr^3) at the fixed time TIME.
    optimizer, hyper = CASES["Adam"]
    early, late = [], []
    for lr in LRS:
        n, (iterates, _) = _case_run("Adam", lr)
        field = eomlib.modified_field(_loss, optimizer, order=1, lr=lr, **hyper)
        times = torch.tensor([0.0, lr], dtype=torch.float64)
        for k, errors in ((2, early), (n, late)):
            flowed = eomlib.integrate(field, iterates[k - 1], times)[-1]
            errors.append(float((flowed - iterates[k]).norm()))
    assert abs(fit_slope(LRS, early) - 2) < 0.3, early
    assert abs(fit_slope(LRS, late) - 3) < 0.3, late


def test_the_memory_at_step_k_is_the_mean_age_of_the_corrected_weights():
    beta, k = 0.7, 5
    weights = [(1 - beta) * beta**j / (1 - beta**k) for j in range(k)]
    mean_age = sum(j * w for j, w in enumerate(weights))
    a_k, _ = adaptive.memory_coefficients(torch.optim.Adam, step=k, betas=(beta, 0.9))
    assert abs(a_k - mean_age) < 1e-14


def test_transient_steps_is_where_the_memory_deficit_drops_below_tol():
    k = adaptive.transient_steps(torch.optim.Adam, 1e-8, betas=(0.5, 0.9))
    settled = adaptive.memory_coefficients(torch.optim.Adam, betas=(0.5, 0.9))
    at = adaptive.memory_coefficients(torch.optim.Adam, step=k, betas=(0.5, 0.9))
    before = adaptive.memory_coefficients(
        torch.optim.Adam, step=k - 1, betas=(0.5, 0.9)
    )
    assert settled[1] - at[1] < 1e-8 <= settled[1] - before[1]


def test_for_eps_much_larger_than_g_adam_is_heavy_ball_at_lr_over_eps():
    # D -> 0: F = -g/eps - lr/eps^2 (a + 1/2) H g, the field of SGD with momentum
    # beta1 and dampening beta1 (torch's buffer takes (1 - dampening) g, as Adam's
    # m takes (1 - beta1) g) at lr/eps, in the time t = k lr = eps k lr'.
    lr, betas, params = 0.01, (0.7, 0.6), _start()
    for eps in (1e3, 1e5):
        adam = eomlib.modified_field(
            _loss, torch.optim.Adam, lr=lr, betas=betas, eps=eps
        )(params)
        sgd = heavy_ball.sgd_field(
            _loss, lr=lr / eps, momentum=betas[0], dampening=betas[0]
        )(params)
        g = eomlib.grad(_loss, params)
        relative = float((eps * adam - sgd).norm() / sgd.norm())
        assert relative < 10 * float(g.abs().max()) / eps


def test_for_eps_much_smaller_than_g_the_field_is_sign_descent_with_weight_a_minus_b():
    lr, betas, params = 0.01, (0.5, 0.6), _start()
    a, b = adaptive.memory_coefficients(torch.optim.Adam, betas=betas)
    g = eomlib.grad(_loss, params)
    sign = g / g.abs()
    expected = -sign - lr * (a - b) * eomlib.hvp(_loss, params, sign) / g.abs()
    field = eomlib.modified_field(_loss, torch.optim.Adam, lr=lr, betas=betas, eps=1e-9)
    torch.testing.assert_close(field(params), expected, rtol=1e-7, atol=0)


def test_with_eps_much_smaller_than_g_the_field_still_matches_settled_iterates():
    # Along this run every |g_i| stays above 1, so the kink at g_i = 0 is never
    # met and the slope holds with eps -> 0.
    hyper = {"betas": (0.5, 0.6), "eps": 1e-8}
    errors = []
    for lr in LRS:
        n, iterates = _settled_run(torch.optim.Adam, hyper, lr, 3, _start((3, -3)))
        read_off = eomlib.field_from_iterates(iterates[n : n + 3], lr, 1)
        field = eomlib.modified_field(_loss, torch.optim.Adam, order=1, lr=lr, **hyper)
        gs = torch.func.vmap(torch.func.grad(_loss))(iterates)
        assert float(gs.abs().min()) > 1.0
        errors.append(float((field(iterates[n]) - read_off[0]).norm()))
    assert abs(fit_slope(LRS, errors) - 2) < 0.3, errors


def test_weight_decay_is_coupled_like_torchs():
    hyper = {"lr": 0.01, "betas": (0.5, 0.6), "eps": 0.1, "weight_decay": 0.3}
    iterates = eomlib.optimizer_trajectory(
        _loss, _start(), torch.optim.Adam, 1, **hyper
    )
    expected = adaptive.adam_step(_loss, _start(), 1, **hyper)
    torch.testing.assert_close(iterates[1] - iterates[0], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: adaptive.adam_field(_loss, lr=0.1, betas=(0.9, 1.0)),
            ValueError,
            r"betas\[1\] must be in \[0, 1\); got betas\[1\]=1.0",
        ),
        (
            lambda: adaptive.adam_field(_loss, lr=0.1, betas=(-0.1, 0.9)),
            ValueError,
            r"betas\[0\] must be in \[0, 1\)",
        ),
        (
            lambda: adaptive.adam_field(_loss, lr=0.1, betas=0.9),
            TypeError,
            r"betas must be a pair",
        ),
        (
            lambda: adaptive.rmsprop_field(_loss, lr=0.1, alpha=1.5),
            ValueError,
            r"alpha must be in \[0, 1\); got alpha=1.5",
        ),
        (
            lambda: adaptive.adam_field(_loss, lr=0.1, amsgrad=True),
            ValueError,
            r"amsgrad=True is not modelled by the Adam field; allowed: amsgrad=False",
        ),
        (
            lambda: adaptive.rmsprop_field(_loss, lr=0.1, centered=True),
            ValueError,
            r"centered=True is not modelled",
        ),
        (
            lambda: adaptive.adam_field(_loss, lr=0.1, beta=0.9),
            TypeError,
            r"Adam has no hyper-parameter 'beta'; allowed: lr, betas",
        ),
        (
            lambda: adaptive.adam_field(_loss, betas=(0.9, 0.99)),
            TypeError,
            r"the Adam field needs lr=\.\.\.",
        ),
        (
            lambda: adaptive.rmsprop_field(_loss, lr=0.1, order=3),
            ValueError,
            r"order must be one of 0, 1, 2 for Adam and RMSprop; got order=3",
        ),
        (
            lambda: adaptive.slow_manifold(
                _loss, _start(), torch.optim.Adam, lr=0.1, order=2
            ),
            ValueError,
            r"order must be one of 0, 1 for the slow manifold; got order=2",
        ),
        (
            lambda: adaptive.adam_field(_loss, lr=0.1, eps=0.0),
            ValueError,
            r"eps must be positive and finite; got eps=0.0",
        ),
        (
            lambda: adaptive.adam_step(_loss, _start(), 0, lr=0.1),
            ValueError,
            r"step must be an integer >= 1; got step=0",
        ),
        (
            lambda: adaptive.memory_coefficients(torch.optim.RMSprop, step=3),
            ValueError,
            r"step=3: RMSprop has no bias correction",
        ),
        (
            lambda: adaptive.slow_manifold(_loss, _start(), torch.optim.SGD, lr=0.1),
            ValueError,
            r"no slow manifold for .*SGD.*; known: torch.optim.Adam",
        ),
        (
            lambda: adaptive.transient_steps(torch.optim.Adam, tol=2.0),
            ValueError,
            r"tol must be below 1; got tol=2.0",
        ),
    ],
)
def test_bad_input_is_named_in_the_message(call, error, message):
    with pytest.raises(error, match=message):
        call()
