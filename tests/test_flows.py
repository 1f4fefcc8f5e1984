"""GD trajectories, fields, integration, and the local error of GF and the EoM."""

import sys

import numpy as np
import pytest
import torch

import eomlib
from eomlib import _tree
from tests.conftest import ATOL, _tensor_cubic


def _quadratic(eigenvalues=(1.0, 0.25), dtype=torch.float64):
    A = torch.diag(torch.tensor(eigenvalues, dtype=dtype))
    return A, (lambda x: 0.5 * x @ A @ x), torch.tensor([1.0, -2.0], dtype=dtype)


def test_gd_trajectory_takes_gradient_steps(case):
    loss, params = case
    trajectory = eomlib.gd_trajectory(loss, params, 0.1, 3)
    step = _tree.axpy(-0.1, eomlib.grad(loss, params), params)

    first = _tree.tree_map(lambda x: x[0], trajectory)
    second = _tree.tree_map(lambda x: x[1], trajectory)
    torch.testing.assert_close(_tree.flatten(first), _tree.flatten(params))
    torch.testing.assert_close(_tree.flatten(second), _tree.flatten(step))
    assert _tree.leaves(trajectory)[0].shape[0] == 4


def test_gd_on_a_quadratic_is_a_matrix_power():
    A, loss, params = _quadratic()
    trajectory = eomlib.gd_trajectory(loss, params, 0.5, 10)
    expected = torch.linalg.matrix_power(torch.eye(2, dtype=A.dtype) - 0.5 * A, 10)
    torch.testing.assert_close(trajectory[-1], expected @ params, atol=ATOL, rtol=0)


def test_divergent_gd_names_the_step_and_the_learning_rate():
    # lr * lambda_max = 100 > 2: each step multiplies the first coordinate by -99.
    _, loss, params = _quadratic((100.0, 1.0), dtype=torch.float32)
    with pytest.raises(eomlib.DivergenceError, match=r"diverged at step 20 with lr=1"):
        eomlib.gd_trajectory(loss, params, 1.0, 1000)


def test_divergent_gd_reports_the_measured_lr_times_lambda_max():
    _, loss, params = _quadratic((100.0, 1.0), dtype=torch.float32)
    with pytest.raises(eomlib.DivergenceError) as raised:
        eomlib.gd_trajectory(loss, params, 1.0, 1000)
    message = str(raised.value)
    assert "lr * lambda_max = 100 " in message and "stable only below 2" in message
    assert "use lr < 0.02" in message


def test_the_series_check_stops_a_comparison_before_any_eom_is_integrated():
    # lr * lambda_max = 1.5: GD converges (|1 - 1.5| < 1) but flips sign each step,
    # so no real flow passes through its iterates and the series of log diverges.
    _, loss, params = _quadratic((1.5, 0.1))
    integrated = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(eomlib.flows, "integrate", lambda *a, **k: integrated.append(1))
        with pytest.raises(eomlib.SeriesDivergenceError) as raised:
            eomlib.compare_with_gd(loss, params, 1.0, 10, (0, 1))
    assert not integrated
    message = str(raised.value)
    assert "diverges at GD step 0 with lr=1" in message
    assert "lr * |lambda|_max = 1.5 >= 1" in message and "use lr < 0.667" in message
    assert isinstance(raised.value, eomlib.DivergenceError)


def test_the_series_check_can_be_turned_off_and_passes_below_one():
    _, loss, params = _quadratic((1.5, 0.1))
    comparison = eomlib.compare_with_gd(loss, params, 1.0, 2, (1,), check_series=False)
    assert torch.isfinite(comparison.distances[1]).all()

    _, loss, params = _quadratic((0.8, 0.1))
    gd = eomlib.gd_trajectory(loss, params, 1.0, 4)
    measured = eomlib.flows.check_series_converges(loss, gd, 1.0)
    assert [step for step, _ in measured] == [0, 2, 4]
    assert all(value == pytest.approx(0.8, rel=1e-3) for _, value in measured)


def test_gf_alone_needs_no_series_check():
    _, loss, params = _quadratic((1.5, 0.1))
    comparison = eomlib.compare_with_gd(loss, params, 1.0, 3, (0,))
    assert comparison.distances[0].shape == (4,)


def test_gradient_flow_of_a_quadratic_is_a_matrix_exponential():
    A, loss, params = _quadratic()
    times = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    solution = eomlib.integrate(eomlib.eom_field(loss, 1.0, 0), params, times)
    expected = torch.stack([torch.linalg.matrix_exp(-t * A) @ params for t in times])
    torch.testing.assert_close(solution, expected, atol=1e-9, rtol=0)


def test_integrate_keeps_the_structure_of_dict_params(case):
    loss, params = case
    solution = eomlib.eom_trajectory(loss, params, 0.05, 2, order=1)
    final = _tree.tree_map(lambda x: x[-1], solution)
    _tree.check_same_structure(params, final, ("params", "solution"))


def test_eom_field_of_order_zero_is_minus_the_gradient(case):
    loss, params = case
    field = eomlib.eom_field(loss, 0.1, 0)(params)
    torch.testing.assert_close(
        _tree.flatten(field),
        -_tree.flatten(eomlib.grad(loss, params)),
        atol=ATOL,
        rtol=0,
    )


@pytest.mark.parametrize(
    ("lr", "error", "message"),
    [
        (-0.1, ValueError, "lr must be positive and finite; got lr=-0.1"),
        (0.0, ValueError, "lr must be positive and finite; got lr=0.0"),
        (float("nan"), ValueError, "lr must be positive and finite"),
        ("0.1", TypeError, "lr must be a positive real number; got '0.1'"),
    ],
)
def test_eom_field_rejects_a_bad_learning_rate(lr, error, message):
    _, loss, _ = _quadratic()
    with pytest.raises(error, match=message):
        eomlib.eom_field(loss, lr, 1)


def test_eom_field_rejects_an_unknown_method_when_built():
    _, loss, _ = _quadratic()
    with pytest.raises(ValueError, match="unknown method 'taylor'; allowed: autodiff"):
        eomlib.eom_field(loss, 0.1, 2, method="taylor")


def test_compare_with_gd_checks_orders_before_running_gd():
    def loss(x):
        raise AssertionError("GD must not start")

    with pytest.raises(ValueError, match="order must be an integer >= 0"):
        eomlib.compare_with_gd(loss, torch.zeros(2), 0.1, 10, orders=(0, -1))


def test_distance_is_zero_at_the_shared_start(case):
    loss, params = case
    comparison = eomlib.compare_with_gd(loss, params, 0.05, 3)
    for distances in comparison.distances.values():
        assert distances.shape == (4,)
        assert distances[0].item() == 0.0


def _small_network():
    return eomlib.make_problem(
        "mlp", "digits", seed=0, num_samples=200, hidden=(8,), dtype="float64"
    )


def _slope(lrs, values):
    return np.polyfit(np.log(lrs), np.log(values), 1)[0]


def test_local_error_of_the_eom_has_the_predicted_order():
    # The EoM of order K meets one GD step up to O(lr^(K+2)): GF (K = 0) misses it
    # by O(lr^2), the first-order EoM by O(lr^3), and so on.
    problem = _small_network()
    lrs = [0.05, 0.1, 0.2, 0.4]
    orders = (0, 1, 2)
    local = {order: [] for order in orders}
    for lr in lrs:
        comparison = eomlib.compare_with_gd(
            problem.loss, problem.params, lr, 1, orders=orders, rtol=1e-12, atol=1e-14
        )
        for order in orders:
            local[order].append(comparison.distances[order][1].item())
    for order in orders:
        assert _slope(lrs, local[order]) == pytest.approx(order + 2, abs=0.3)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_the_two_methods_agree_to_the_order_of_the_truncation(order):
    # Autodiff counter terms and the logarithm of the GD step differ by
    # O(lr^(order+1)) in the field (an asymptotic statement: small lrs).
    problem = _small_network()
    lrs = [0.0125, 0.025, 0.05]
    gaps = []
    for lr in lrs:
        fields = [
            eomlib.eom_field(problem.loss, lr, order, method=method)(problem.params)
            for method in ("autodiff", "iterates")
        ]
        gaps.append((_tree.flatten(fields[0]) - _tree.flatten(fields[1])).norm().item())
    assert _slope(lrs, gaps) == pytest.approx(order + 1, abs=0.3)


def test_the_iterates_field_of_order_zero_is_minus_the_gradient(case):
    loss, params = case
    field = eomlib.eom_field(loss, 0.1, 0, method="iterates")(params)
    torch.testing.assert_close(
        _tree.flatten(field),
        -_tree.flatten(eomlib.grad(loss, params)),
        atol=1e-12,
        rtol=0,
    )


@pytest.mark.parametrize("order", [1, 3])
def test_the_iterates_field_is_the_same_inside_vmap(order):
    # Under a torch.func transform the field takes its functional path; a batch of
    # one point must give what the direct autograd path gives at that point.
    problem = _small_network()
    field = eomlib.eom_field(problem.loss, 0.05, order, method="iterates")
    batched = torch.func.vmap(field)(
        _tree.tree_map(lambda x: x.unsqueeze(0), problem.params)
    )
    torch.testing.assert_close(
        _tree.flatten(_tree.tree_map(lambda x: x[0], batched)),
        _tree.flatten(field(problem.params)),
        atol=1e-12,
        rtol=1e-10,
    )


def test_on_a_quadratic_the_iterates_field_is_a_truncated_logarithm():
    # GD is (1 - lr A); the forward differences of its iterates are (-lr A)^m params,
    # so the field is -sum_{m<=K+1} (lr A)^m / (m lr) params.
    A, loss, params = _quadratic((1.0, 0.25))
    lr, order = 0.3, 3
    field = eomlib.eom_field(loss, lr, order, method="iterates")(params)
    expected = -sum(
        torch.linalg.matrix_power(lr * A, m) @ params / (m * lr)
        for m in range(1, order + 2)
    )
    torch.testing.assert_close(field, expected, atol=ATOL, rtol=0)


def test_discretization_errors_are_one_step_or_a_fixed_time():
    _, loss, params = _quadratic()
    local = eomlib.discretization_errors(loss, params, [0.1, 0.2], (0, 1))
    direct = eomlib.compare_with_gd(loss, params, 0.2, 1, (0, 1))
    assert local[1][1] == pytest.approx(direct.distances[1][1].item(), rel=1e-9)

    at_time = eomlib.discretization_errors(loss, params, [0.1], (0,), horizon=0.5)
    five_steps = eomlib.compare_with_gd(loss, params, 0.1, 5, (0,))
    assert at_time[0][0] == pytest.approx(five_steps.distances[0][-1].item(), rel=1e-9)


def test_global_error_of_gf_on_a_quadratic_is_the_gap_to_the_exponential():
    A, loss, params = _quadratic((1.0, 0.5))
    lr, horizon = 0.1, 1.0
    (error,) = eomlib.discretization_errors(loss, params, [lr], (0,), horizon=horizon)[
        0
    ]
    gd = torch.linalg.matrix_power(torch.eye(2, dtype=A.dtype) - lr * A, 10) @ params
    gf = torch.linalg.matrix_exp(-horizon * A) @ params
    assert error == pytest.approx((gd - gf).norm().item(), rel=1e-8)


def test_roundoff_floor_is_machine_epsilon_times_the_norm():
    params = {"w": torch.tensor([3.0, 4.0], dtype=torch.float32)}
    assert eomlib.roundoff_floor(params) == pytest.approx(5 * 2.0**-23)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rtol": 1e-10}, ValueError, "rtol=1e-10 is below what float32 resolves"),
        ({"rtol": -1.0}, ValueError, "rtol must be positive and finite"),
        ({"atol": 0.0}, ValueError, "atol must be positive and finite"),
        ({"solver": "rk45", "rtol": 1e-5}, ValueError, "unknown solver 'rk45'"),
    ],
)
def test_integrate_refuses_tolerances_and_solvers_it_cannot_honour(
    kwargs, error, message
):
    _, loss, params = _quadratic(dtype=torch.float32)
    field = eomlib.eom_field(loss, 0.1, 0)
    with pytest.raises(error, match=message):
        eomlib.integrate(field, params, torch.tensor([0.0, 1.0]), **kwargs)


def test_flow_fields_of_every_order_are_minus_g_minus_the_lr_series_of_xi():
    loss, params = _tensor_cubic()
    lr = 0.1
    fields = eomlib.flows.flow_fields(loss, params, lr, [0, 2, 3])
    assert sorted(fields) == [0, 2, 3]
    g = eomlib.grad(loss, params)
    xis = eomlib.counter_terms(loss, params, 3)
    for order, field in fields.items():
        expected = -g - sum(lr**k * xis[k - 1] for k in range(1, order + 1))
        torch.testing.assert_close(field, expected, rtol=1e-13, atol=1e-15)


def test_flow_fields_needs_at_least_one_order():
    loss, params = _tensor_cubic()
    with pytest.raises(ValueError, match="at least one order"):
        eomlib.flows.flow_fields(loss, params, 0.1, [])


def test_progress_bars_show_in_a_terminal_and_stay_quiet_elsewhere(capsys, monkeypatch):
    _, loss, params = _quadratic()
    monkeypatch.delenv("CI", raising=False)
    eomlib.gd_trajectory(loss, params, 0.1, 3)  # pytest's stderr is no terminal
    eomlib.eom_trajectory(loss, params, 0.1, 3, 1)
    assert capsys.readouterr().err == ""

    eomlib.gd_trajectory(loss, params, 0.1, 3, progress=True)
    eomlib.eom_trajectory(loss, params, 0.1, 3, 1, progress=True)
    err = capsys.readouterr().err
    assert "GD lr=0.1" in err and "dopri5 to t=0.3" in err

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert eomlib.flows.show_progress(None)
    monkeypatch.setenv("CI", "true")
    assert not eomlib.flows.show_progress(None)


def test_torch_sgd_without_momentum_is_gd_to_the_bit(case):
    loss, params = case
    sgd = eomlib.optimizer_trajectory(loss, params, torch.optim.SGD, 4, lr=0.1)
    gd = eomlib.gd_trajectory(loss, params, 0.1, 4)
    for a, b in zip(_tree.leaves(sgd), _tree.leaves(gd)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_an_optimizer_trajectory_can_carry_the_optimizers_state():
    _, loss, params = _quadratic()
    iterates, states = eomlib.optimizer_trajectory(
        loss, params, torch.optim.SGD, 3, lr=0.1, momentum=0.9, state=True
    )
    assert iterates.shape == (4, 2) and len(states) == 3
    # Heavy ball: the buffer after the first step is the first gradient.
    torch.testing.assert_close(
        states[0][None]["momentum_buffer"], eomlib.grad(loss, params)
    )


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda loss, x: eomlib.optimizer_trajectory(loss, x, "adam", 3, lr=0.1),
            TypeError,
            "optimizer must be a torch.optim.Optimizer class .* got 'adam'",
        ),
        (
            lambda loss, x: eomlib.optimizer_trajectory(loss, x, torch.optim.SGD, 3),
            TypeError,
            r"SGD needs lr=\.\.\.; got \[\]",
        ),
        (
            lambda loss, x: eomlib.optimizer_trajectory(
                loss, x, torch.optim.Adam, 3, lr=0.1, betas=(0.9, 1.5)
            ),
            ValueError,
            r"Adam\(.*\): Invalid beta parameter at index 1: 1.5",
        ),
    ],
)
def test_a_bad_optimizer_or_hyper_parameter_is_named(call, error, message):
    _, loss, params = _quadratic()
    with pytest.raises(error, match=message):
        call(loss, params)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_the_field_read_off_gd_iterates_is_the_truncated_logarithm(order):
    # On a quadratic the GD map is (1 - lr A), and reading the field off its orbit
    # gives the same truncated series as the iterates field computed from gradients.
    A, loss, params = _quadratic((1.0, 0.25))
    lr = 0.3
    gd = eomlib.gd_trajectory(loss, params, lr, order + 3)
    fields = eomlib.field_from_iterates(gd, lr, order)
    expected = eomlib.eom_field(loss, lr, order, method="iterates")
    assert fields.shape == (3, 2)
    for k in range(3):
        torch.testing.assert_close(fields[k], expected(gd[k]), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("iterates", "error", "message"),
    [
        (
            {"a": torch.ones(6, 2), "b": torch.ones(2, 2)},
            ValueError,
            r"every leaf of iterates must hold the same number of iterates .* \[2, 6\]",
        ),
        ([torch.ones(6)], TypeError, "iterates must be a tensor or a dict of tensors"),
        ({}, ValueError, "iterates must hold at least one tensor"),
        (torch.ones(2, dtype=torch.float64), ValueError, "order 1 needs at least 3"),
    ],
)
def test_iterates_of_a_bad_shape_are_named_before_any_field_is_read(
    iterates, error, message
):
    with pytest.raises(error, match=message):
        eomlib.field_from_iterates(iterates, 0.1, 1)
