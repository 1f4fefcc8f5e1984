"""Hessian-vector products and the sharpness against dense float64 Hessians."""

import logging
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.function import once_differentiable

import eomlib
from eomlib import _tree
from eomlib.derivatives import SecondDerivativeError
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


def test_auto_mode_needs_no_forward_mode_rule(caplog):
    params = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
    v = torch.ones(4, dtype=torch.float64)
    expected = dense_hessian(_loss_without_forward_rule, params) @ v

    with caplog.at_level(logging.WARNING, logger="eomlib.derivatives"):
        result = eomlib.hvp(_loss_without_forward_rule, params, v)

    torch.testing.assert_close(result, expected, atol=ATOL, rtol=0)
    assert not caplog.records


class _SoftplusGradWithoutDoubleBackward(torch.autograd.Function):
    """softplus' derivative, ``go * sigmoid(x)``, with a forward-mode rule but no
    backward: the softplus below can be differentiated twice only in forward mode."""

    @staticmethod
    def forward(go, x):
        return go * torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, _):
        raise NotImplementedError(
            "the double backward of this softplus is not implemented"
        )

    @staticmethod
    def jvp(ctx, go_dot, x_dot):
        go, x = ctx.saved_tensors
        s = torch.sigmoid(x)
        return go_dot * s + go * s * (1 - s) * x_dot


class _SoftplusWithoutDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return torch.nn.functional.softplus(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, go):
        (x,) = ctx.saved_tensors
        return _SoftplusGradWithoutDoubleBackward.apply(go, x)

    @staticmethod
    def jvp(ctx, x_dot):
        (x,) = ctx.saved_tensors
        return x_dot * torch.sigmoid(x)


def _loss_without_double_backward(x):
    return _SoftplusWithoutDoubleBackward.apply(x).pow(2).sum()


def _softplus_loss(x):
    return torch.nn.functional.softplus(x).pow(2).sum()


def test_hvp_falls_back_to_forward_mode_with_one_notice(caplog):
    params = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
    v = torch.ones(4, dtype=torch.float64)
    expected = dense_hessian(_softplus_loss, params) @ v

    with caplog.at_level(logging.WARNING, logger="eomlib.derivatives"):
        first = eomlib.hvp(_loss_without_double_backward, params, v)
        second = eomlib.hvp(_loss_without_double_backward, params, v)

    torch.testing.assert_close(first, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(second, expected, atol=ATOL, rtol=0)
    notices = [r for r in caplog.records if "using forward mode" in r.message]
    assert len(notices) == 1


def test_forced_reverse_mode_reports_the_missing_double_backward():
    params = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="double backward"):
        eomlib.hvp(
            lambda x: _SoftplusWithoutDoubleBackward.apply(x).sum(),
            params,
            params,
            method="reverse",
        )


class _OnceDifferentiableSoftplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.softplus(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, go):
        (x,) = ctx.saved_tensors
        return go * torch.sigmoid(x)


@pytest.mark.parametrize(
    "loss",
    [
        # The backward's input requires grad: autograd leaves an error node.
        lambda x: _OnceDifferentiableSoftplus.apply(x).pow(2).sum(),
        # It does not: the gradient carries no graph at all.
        lambda x: _OnceDifferentiableSoftplus.apply(x).sum(),
    ],
    ids=["squared", "summed"],
)
@pytest.mark.parametrize(
    "derivative",
    [
        lambda loss, x: eomlib.hvp(loss, x, x),
        lambda loss, x: eomlib.batched_hvp(loss, x, x[None]),
        lambda loss, x: eomlib.counter_terms(loss, x, 2),
        lambda loss, x: eomlib.top_eigenvalue(loss, x),
    ],
    ids=["hvp", "batched_hvp", "counter_terms", "top_eigenvalue"],
)
def test_a_once_differentiable_operation_raises_instead_of_giving_zeros(
    loss, derivative
):
    # autograd reports such an input as unused, which would read as H = 0.
    params = torch.linspace(-1.0, 1.0, 3, dtype=torch.float64)
    with pytest.raises(SecondDerivativeError, match="once_differentiable"):
        derivative(loss, params)


def test_a_once_differentiable_operation_still_has_a_gradient():
    params = torch.linspace(-1.0, 1.0, 3, dtype=torch.float64)
    g = eomlib.grad(lambda x: _OnceDifferentiableSoftplus.apply(x).sum(), params)
    torch.testing.assert_close(g, torch.sigmoid(params))


def test_a_loss_linear_in_some_parameters_has_zero_hessian_rows():
    params = {
        "w": torch.ones(2, dtype=torch.float64),
        "b": torch.ones(2, dtype=torch.float64),
    }
    v = {
        "w": torch.ones(2, dtype=torch.float64),
        "b": torch.ones(2, dtype=torch.float64),
    }
    result = eomlib.hvp(lambda p: (p["w"] ** 3).sum() + p["b"].sum(), params, v)
    torch.testing.assert_close(result["w"], 6 * torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(result["b"], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("method", ["auto", "forward"])
def test_batched_hvp_is_one_hvp_per_vector(case, method):
    loss, params = case
    vectors = [random_like(params, seed=s) for s in range(3)]
    stacked = _tree.tree_map(lambda *leaves: torch.stack(leaves), *vectors)
    result = eomlib.batched_hvp(loss, params, stacked, method=method)
    for i, v in enumerate(vectors):
        row = _tree.tree_map(lambda leaf, i=i: leaf[i], result)
        expected = eomlib.hvp(loss, params, v, method="forward")
        torch.testing.assert_close(
            _tree.flatten(row), _tree.flatten(expected), atol=ATOL, rtol=0
        )


def test_hvp_composes_with_torch_func_transforms(case):
    # Inside vmap and grad, eomlib runs through torch.func rather than autograd.
    loss, params = case
    v = random_like(params, seed=1)
    stacked = _tree.tree_map(lambda leaf: torch.stack([leaf, 2 * leaf]), params)
    batched = torch.func.vmap(lambda p: eomlib.hvp(loss, p, v))(stacked)
    for i, point in enumerate([params, _tree.scale(2.0, params)]):
        row = _tree.tree_map(lambda leaf, i=i: leaf[i], batched)
        expected = dense_hessian(loss, point) @ _tree.flatten(v)
        torch.testing.assert_close(_tree.flatten(row), expected, atol=ATOL, rtol=0)

    # d/ds <v, H(params + s v) v> at s = 0 is D^2 g[v, v] . v
    def curvature(s):
        point = _tree.tree_map(lambda p, w: p + s * w, params, v)

        return _tree.dot(v, eomlib.hvp(loss, point, v))

    zero = torch.zeros((), dtype=torch.float64)
    slope = torch.func.grad(curvature)(zero)
    expected = classic_grad_derivative(loss, params, [_tree.flatten(v)] * 2)
    torch.testing.assert_close(slope, expected @ _tree.flatten(v), atol=ATOL, rtol=0)


def test_grad_keeps_the_callers_graph():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    g = eomlib.grad(lambda p: (p**3).sum(), x)  # 3 x^2
    (dg,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(dg, 6 * x.detach())


def test_forced_forward_mode_names_the_operation_without_a_rule():
    params = torch.zeros(3, dtype=torch.float64)
    calls = [
        lambda: eomlib.hvp(
            _loss_without_forward_rule, params, params, method="forward"
        ),
        lambda: eomlib.counter_terms(
            _loss_without_forward_rule, params, 2, method="forward"
        ),
        lambda: eomlib.grad_derivative(
            _loss_without_forward_rule, params, [params, params], method="forward"
        ),
    ]
    for call in calls:
        with pytest.raises(NotImplementedError) as raised:
            call()
        message = str(raised.value)
        assert re.search(r"some have none: [\w.]*\._SoftplusWithoutJvp\. ", message)
        assert "method='reverse' (or 'auto') needs backward rules only" in message
        assert message.count("torch said") == 1


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


def test_counter_terms_work_without_a_double_backward():
    # xi_1 through the forward-mode fallback: second derivatives only.
    params = torch.linspace(-1.0, 1.0, 3, dtype=torch.float64)
    (xi_1,) = eomlib.counter_terms(_loss_without_double_backward, params, 1)
    g = classic_grad_derivative(_softplus_loss, params, [])
    expected = classic_grad_derivative(_softplus_loss, params, [g]) / 2
    torch.testing.assert_close(xi_1, expected, atol=ATOL, rtol=0)


def test_counter_terms_work_without_a_forward_rule():
    def loss(x):
        return _SoftplusWithoutJvp.apply(x).pow(3).sum()

    def reference(x):
        return torch.nn.functional.softplus(x).pow(3).sum()

    params = torch.linspace(-1.0, 1.0, 3, dtype=torch.float64)
    _, xi_2 = eomlib.counter_terms(loss, params, 2)
    g = classic_grad_derivative(reference, params, [])
    hg = classic_grad_derivative(reference, params, [g])
    expected = classic_grad_derivative(reference, params, [hg]) / 3 + (
        classic_grad_derivative(reference, params, [g, g]) / 12
    )
    torch.testing.assert_close(xi_2, expected, atol=ATOL, rtol=0)
