"""The first counter term against dense float64 ground truths."""

import pytest
import torch
from torch import func

import eomlib
from eomlib import _tree
from tests.conftest import ATOL, dense_grad, dense_hessian


def test_xi_1_is_half_the_hessian_times_the_gradient(case):
    loss, params = case
    (xi_1,) = eomlib.counter_terms(loss, params, 1)
    expected = 0.5 * dense_hessian(loss, params) @ dense_grad(loss, params)
    torch.testing.assert_close(_tree.flatten(xi_1), expected, atol=ATOL, rtol=0)
    _tree.check_same_structure(params, xi_1, ("params", "xi_1"))


def test_xi_1_of_a_quadratic_is_half_its_matrix_squared_times_params():
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    params = torch.tensor([0.5, -1.5], dtype=torch.float64)
    (xi_1,) = eomlib.counter_terms(lambda x: 0.5 * x @ A @ x, params, 1)
    torch.testing.assert_close(xi_1, 0.5 * A @ A @ params, atol=ATOL, rtol=0)


def test_first_order_eom_is_the_gradient_flow_of_the_modified_loss(case):
    # -g - lr xi_1 = -grad(f + lr/4 |g|^2): implicit gradient regularization.
    loss, params = case
    lr = 0.3

    def modified_loss(p):
        g = func.grad(loss)(p)
        return loss(p) + lr / 4 * _tree.dot(g, g)

    field = eomlib.eom_field(loss, lr, order=1)(params)
    expected = _tree.scale(-1.0, func.grad(modified_loss)(params))
    torch.testing.assert_close(
        _tree.flatten(field), _tree.flatten(expected), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize(
    ("order", "error", "message"),
    [
        (0, ValueError, "order must be an integer >= 1; got order=0"),
        (-1, ValueError, "order must be an integer >= 1; got order=-1"),
        (1.0, TypeError, "order must be an integer >= 1; got 1.0"),
        (2, NotImplementedError, "order 2 are not implemented"),
    ],
)
def test_an_order_it_cannot_compute_raises_before_differentiating(
    order, error, message
):
    def loss(x):
        raise AssertionError("the loss must not be evaluated")

    with pytest.raises(error, match=message):
        eomlib.counter_terms(loss, torch.zeros(2), order)
