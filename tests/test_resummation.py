"""The principal flow: the EoM's H^j g terms summed to all orders."""

import math

import pytest
import torch

import eomlib
from eomlib.resummation import principal_flow_field, resummed_rate, truncated_rate
from tests.conftest import _tensor_cubic

EIGENVALUES = (2.0, 1.3, 0.7, 0.2, 0.05, -0.3)
TIGHT = {"solver": "dopri8", "rtol": 1e-13, "atol": 1e-16}


def _quadratic(eigenvalues=EIGENVALUES, seed=0):
    """``f = 1/2 x^T A x + b^T x`` with ``A = U diag(eigenvalues) U^T``."""
    generator = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    A = U @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ U.T
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    x0 = torch.randn(n, generator=generator, dtype=torch.float64)
    return (lambda x: 0.5 * x @ A @ x + b @ x), x0, A, U


def _flow(field, x0, lr, num_steps):
    times = lr * torch.arange(num_steps + 1, dtype=x0.dtype)
    return eomlib.integrate(field, x0, times, **TIGHT)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.8, 0.95])
def test_principal_flow_meets_gd_on_a_quadratic_to_round_off_below_one(fraction):
    loss, x0, _, _ = _quadratic()
    lr = fraction / max(EIGENVALUES)
    gd = eomlib.gd_trajectory(loss, x0, lr, 5)
    flow = _flow(principal_flow_field(loss, lr), x0, lr, 5)
    assert eomlib.distance(flow, gd).max().item() <= 1e-12 * x0.norm().item()


def test_truncated_eom_misses_gd_by_its_next_order_where_the_resummation_does_not():
    loss, x0, _, _ = _quadratic()
    lam = max(EIGENVALUES)

    def local_error(field_of_lr, fraction):
        lr = fraction / lam
        gd = eomlib.gd_trajectory(loss, x0, lr, 1)
        return eomlib.distance(_flow(field_of_lr(lr), x0, lr, 1), gd)[-1].item()

    resummed = local_error(lambda lr: principal_flow_field(loss, lr), 0.95)
    for order in range(1, 5):
        eom = lambda lr, order=order: eomlib.eom_field(loss, lr, order)  # noqa: E731
        small, half = local_error(eom, 0.1), local_error(eom, 0.05)
        # Local error O(lr^(order + 2)): the slope between lr and lr / 2.
        assert math.log2(small / half) == pytest.approx(order + 2, abs=0.3), order
        assert local_error(eom, 0.95) > 1e6 * max(resummed, 1e-16), order


@pytest.mark.parametrize("x", [1.5, 1.9, 2.5])
def test_the_real_branch_follows_gds_magnitude_but_not_its_sign(x):
    # Along the first axis lr * lambda = x > 1: GD multiplies the coordinate by
    # 1 - x < 0 each step. The real branch's flow multiplies it by |1 - x| over each
    # time lr: the same magnitude, a sign that never flips. The second axis has
    # lr * lambda = 0.4 < 1, where flow and GD agree.
    lr = 1.0
    A = torch.diag(torch.tensor([x, 0.4], dtype=torch.float64))
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss = lambda p: 0.5 * p @ A @ p  # noqa: E731
    gd = eomlib.gd_trajectory(loss, x0, lr, 6)
    flow = _flow(principal_flow_field(loss, lr), x0, lr, 6)

    signs = torch.tensor([(-1.0) ** k for k in range(7)], dtype=torch.float64)
    torch.testing.assert_close(gd[:, 0].sign(), signs)
    torch.testing.assert_close(flow[:, 0], gd[:, 0].abs(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(flow[:, 1], gd[:, 1], atol=1e-12, rtol=1e-12)


def test_the_real_branch_is_the_real_part_of_the_complex_logarithm():
    x = torch.tensor([-3.0, -0.5, 0.3, 0.99, 1.01, 1.5, 2.0, 3.0], dtype=torch.float64)
    complex_rate = -torch.log(1 - x.to(torch.complex128)) / x
    torch.testing.assert_close(resummed_rate(x), complex_rate.real, atol=1e-14, rtol=0)
    # The imaginary part is -pi / x where x > 1: half a turn per step, GD's flip.
    torch.testing.assert_close(
        complex_rate.imag, torch.where(x > 1, -math.pi / x, 0.0), atol=1e-14, rtol=0
    )


def test_the_resummed_rate_is_the_sum_of_the_truncated_rates():
    x = torch.linspace(-0.5, 0.5, 11, dtype=torch.float64)
    torch.testing.assert_close(
        resummed_rate(x), truncated_rate(x, 60), atol=1e-15, rtol=0
    )
    assert resummed_rate(torch.zeros(1, dtype=torch.float64)).item() == 1.0
    assert resummed_rate(torch.tensor([1.0])).item() == math.inf


@pytest.mark.parametrize("order", [0, 2])
def test_top_k_with_every_eigenpair_equals_the_dense_field(order):
    loss, params = _tensor_cubic()
    n = params.numel()
    dense = principal_flow_field(loss, 0.3, order=order)
    top = principal_flow_field(loss, 0.3, k=n, order=order)
    for shift in (0.0, 0.3, -0.7):
        point = params + shift
        torch.testing.assert_close(top(point), dense(point), atol=1e-10, rtol=0)


def test_top_k_keeps_the_rate_of_the_eom_of_its_order_in_the_other_directions():
    # k = 2, order 1: the two sharpest directions get phi(lr lambda), the other four
    # the EoM_1 rate 1 + lr lambda / 2.
    loss, x0, A, U = _quadratic()
    lr = 0.4
    x = lr * torch.tensor(EIGENVALUES, dtype=torch.float64)
    rates = torch.cat([resummed_rate(x[:2]), truncated_rate(x[2:], 1)])
    expected = -U @ (rates * (U.T @ eomlib.grad(loss, x0)))
    field = principal_flow_field(loss, lr, k=2, order=1)
    torch.testing.assert_close(field(x0), expected, atol=1e-12, rtol=0)


def test_the_raise_branch_refuses_lr_lambda_of_one_or_more():
    loss, x0, _, _ = _quadratic()
    field = principal_flow_field(loss, 0.6, branch="raise")
    with pytest.raises(ValueError, match=r"lr \* lambda = 1.2 >= 1"):
        field(x0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda loss: principal_flow_field(loss, 0.0), r"lr must be positive"),
        (lambda loss: principal_flow_field(loss, -1.0), r"lr must be positive"),
        (lambda loss: principal_flow_field(loss, 0.1, k=0), r"k must be an integer"),
        (lambda loss: principal_flow_field(loss, 0.1, order=-1), r"order"),
        (lambda loss: principal_flow_field(loss, 0.1, branch="complex"), "branch"),
    ],
    ids=["lr=0", "lr<0", "k<1", "order<0", "branch"],
)
def test_bad_input_is_named(call, match):
    loss, _, _, _ = _quadratic()
    with pytest.raises(ValueError, match=match):
        call(loss)


def test_k_beyond_the_number_of_parameters_is_named_at_the_first_call():
    loss, x0, _, _ = _quadratic()
    field = principal_flow_field(loss, 0.1, k=7)
    with pytest.raises(ValueError, match=r"at most the number of parameters \(6\)"):
        field(x0)


def test_on_a_non_quadratic_loss_the_resummation_adds_the_h_power_terms_of_xi_2():
    # phi(lr H) g = g + lr/2 H g + lr^2/3 H^2 g + O(lr^3), so the field minus the
    # EoM of order 1 is -lr^2/3 H^2 g up to O(lr^3): the H^2 g part of xi_2 only.
    loss, params = _tensor_cubic()
    lr = 1e-3
    difference = principal_flow_field(loss, lr)(params) - eomlib.eom_field(loss, lr, 1)(
        params
    )
    g = eomlib.grad(loss, params)
    expected = -(lr**2) / 3 * eomlib.hvp(loss, params, eomlib.hvp(loss, params, g))
    torch.testing.assert_close(difference, expected, atol=0, rtol=1e-2)


def test_the_rate_of_integer_arguments_is_computed_in_floating_point():
    torch.testing.assert_close(
        resummed_rate(torch.tensor([0, 2])),
        resummed_rate(torch.tensor([0.0, 2.0])),
    )
