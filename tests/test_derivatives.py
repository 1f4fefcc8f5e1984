"""Hessian-vector products and the sharpness against dense float64 Hessians."""

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eomlib
from eomlib import _tree
from tests.conftest import ATOL, classic_grad_derivative, dense_hessian, random_like


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_hvp_equals_dense_hessian_times_v(case, method):
    loss, params = case
    v = random_like(params)
    expected = dense_hessian(loss, params) @ _tree.flatten(v)
    result = eomlib.hvp(loss, params, v, method=method)
    torch.testing.assert_close(_tree.flatten(result), expected, atol=ATOL, rtol=0)


def test_hvp_keeps_the_structure_of_params(case):
    loss, params = case
    result = eomlib.hvp(loss, params, random_like(params))
    _tree.check_same_structure(params, result, ("params", "hvp"))


def test_grad_and_hvp_returns_the_gradient_too(case):
    loss, params = case
    g, _ = eomlib.grad_and_hvp(loss, params, random_like(params))
    torch.testing.assert_close(
        _tree.flatten(g), _tree.flatten(eomlib.grad(loss, params)), atol=ATOL, rtol=0
    )


@settings(max_examples=25, deadline=None)
@given(
    dim=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    point=st.floats(-2.0, 2.0),
)
def test_hvp_of_a_quadratic_is_its_matrix_times_v(dim, seed, point):
    generator = torch.Generator().manual_seed(seed)
    B = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    A = B + B.T
    v = torch.randn(dim, generator=generator, dtype=torch.float64)
    params = torch.full((dim,), point, dtype=torch.float64)
    result = eomlib.hvp(lambda x: 0.5 * x @ A @ x, params, v)
    torch.testing.assert_close(result, A @ v, atol=ATOL, rtol=0)


class _SoftplusWithoutJvp(torch.autograd.Function):
    """softplus with a backward rule only: forward-mode AD is not defined for it."""

    @staticmethod
    def forward(x):
        return torch.nn.functional.softplus(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(x)


def _loss_without_forward_rule(x):
    return _SoftplusWithoutJvp.apply(x).pow(2).sum()


def test_hvp_falls_back_to_reverse_mode_with_one_notice(caplog):
    params = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
    v = torch.ones(4, dtype=torch.float64)
    expected = dense_hessian(_loss_without_forward_rule, params) @ v

    with caplog.at_level(logging.WARNING, logger="eomlib.derivatives"):
        first = eomlib.hvp(_loss_without_forward_rule, params, v)
        second = eomlib.hvp(_loss_without_forward_rule, params, v)

    torch.testing.assert_close(first, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(second, expected, atol=ATOL, rtol=0)
    notices = [r for r in caplog.records if "using reverse mode" in r.message]
    assert len(notices) == 1


def test_forced_forward_mode_reports_the_missing_rule():
    params = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="jvp"):
        eomlib.hvp(
            lambda x: _SoftplusWithoutJvp.apply(x).sum(),
            params,
            params,
            method="forward",
        )


def test_hvp_rejects_a_vector_of_another_shape():
    params = torch.zeros(3)
    with pytest.raises(ValueError, match=r"params has shape \(3,\) but v has shape"):
        eomlib.hvp(lambda x: (x**2).sum(), params, torch.zeros(4))


def test_hvp_rejects_a_vector_with_other_keys():
    params = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="different keys"):
        eomlib.hvp(lambda p: (p["w"] ** 2).sum(), params, {"b": torch.zeros(2)})


def test_hvp_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'sideways'; allowed"):
        eomlib.hvp(
            lambda x: (x**2).sum(), torch.zeros(2), torch.zeros(2), method="sideways"
        )


def test_top_eigenvalue_is_the_largest_eigenvalue_of_the_dense_hessian():
    problem = eomlib.make_problem("mlp", "digits", seed=1, num_samples=100, hidden=(4,))
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(problem.loss, problem.params))
    expected = eigenvalues[eigenvalues.abs().argmax()].item()
    result = eomlib.top_eigenvalue(
        problem.loss, problem.params, num_iters=500, rtol=1e-12
    )
    assert result == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_grad_derivative_is_the_nested_derivative_of_the_gradient(case, method):
    loss, params = case
    u, w = random_like(params, seed=1), random_like(params, seed=2)
    result = eomlib.grad_derivative(loss, params, [u, w, u], method=method)
    expected = classic_grad_derivative(
        loss, params, [_tree.flatten(u), _tree.flatten(w), _tree.flatten(u)]
    )
    torch.testing.assert_close(_tree.flatten(result), expected, atol=ATOL, rtol=0)


def test_counter_terms_work_through_the_reverse_mode_fallback():
    def loss(x):
        return _SoftplusWithoutJvp.apply(x).pow(3).sum()

    params = torch.linspace(-1.0, 1.0, 3, dtype=torch.float64)
    _, xi_2 = eomlib.counter_terms(loss, params, 2)
    g = classic_grad_derivative(loss, params, [])
    hg = classic_grad_derivative(loss, params, [g])
    expected = classic_grad_derivative(loss, params, [hg]) / 3 + (
        classic_grad_derivative(loss, params, [g, g]) / 12
    )
    torch.testing.assert_close(xi_2, expected, atol=ATOL, rtol=0)
