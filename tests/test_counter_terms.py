"""Counter terms of orders 1 to 4 against truths that do not depend on eomlib."""

import pytest
import sympy as sp
import torch
from torch import func

import eomlib
from eomlib import _tree, bseries, symbolic
from eomlib.counter_terms import evaluation_plan, split
from tests.conftest import ATOL, classic_grad_derivative, dense_grad, dense_hessian


def test_xi_1_is_half_the_hessian_times_the_gradient(case):
    loss, params = case
    (xi_1,) = eomlib.counter_terms(loss, params, 1)
    expected = 0.5 * dense_hessian(loss, params) @ dense_grad(loss, params)
    torch.testing.assert_close(_tree.flatten(xi_1), expected, atol=ATOL, rtol=0)
    _tree.check_same_structure(params, xi_1, ("params", "xi_1"))


def test_xi_2_and_xi_3_are_the_reference_formulas(case):
    # xi_2 = 1/3 H^2 g + 1/12 T(g, g)
    # xi_3 = 1/4 H^3 g + 1/12 H T(g, g) + 1/12 T(Hg, g)
    loss, params = case
    _, xi_2, xi_3 = eomlib.counter_terms(loss, params, 3)

    def d(*vectors):
        return classic_grad_derivative(loss, params, vectors)

    g = d()
    hg, tgg = d(g), d(g, g)
    expected_2 = d(hg) / 3 + tgg / 12
    expected_3 = d(d(hg)) / 4 + d(tgg) / 12 + d(hg, g) / 12
    torch.testing.assert_close(_tree.flatten(xi_2), expected_2, atol=ATOL, rtol=0)
    torch.testing.assert_close(_tree.flatten(xi_3), expected_3, atol=ATOL, rtol=0)


@pytest.mark.parametrize("structure", ["tensor", "dict"])
def test_for_a_quadratic_xi_k_is_a_power_of_the_matrix_times_params(structure):
    # f = 1/2 params^T A params: GD is params -> (1 - lr A) params, so the EoM field
    # is log(1 - lr A)/lr params and xi_k = A^(k+1) params / (k+1).
    generator = torch.Generator().manual_seed(0)
    B = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    A = (B @ B.T) / 5
    flat = torch.randn(5, generator=generator, dtype=torch.float64)
    if structure == "tensor":
        params, loss = flat, lambda p: 0.5 * p @ A @ p
    else:
        params = {"w": flat[:3].reshape(3, 1), "b": flat[3:]}
        loss = lambda p: 0.5 * _tree.flatten(p) @ A @ _tree.flatten(p)  # noqa: E731

    xis = eomlib.counter_terms(loss, params, 4)
    for k, xi in enumerate(xis, start=1):
        expected = torch.linalg.matrix_power(A, k + 1) @ flat / (k + 1)
        torch.testing.assert_close(_tree.flatten(xi), expected, atol=ATOL, rtol=0)


LOSSES_1D = {
    "quartic": lambda x: x**4 / 4 - x**2 / 2,
    "log-cosh": lambda x: sp.log(sp.cosh(x)) + x**3 / 6,
    "sine": lambda x: sp.sin(x) + x**2 / 2,
}


@pytest.mark.parametrize("name", sorted(LOSSES_1D))
@pytest.mark.parametrize("point", [-0.7, 0.3, 1.1])
def test_one_dimensional_losses_match_the_sympy_series(name, point):
    symbolic_loss = LOSSES_1D[name](symbolic.x)
    expected = [
        float(symbolic.for_loss(xi, symbolic_loss).subs(symbolic.x, point))
        for xi in symbolic.counter_terms_1d(4)
    ]
    loss = _lambdify_torch(symbolic_loss)
    params = torch.tensor([point], dtype=torch.float64)
    xis = eomlib.counter_terms(lambda p: loss(p).sum(), params, 4)
    for xi, value in zip(xis, expected, strict=True):
        assert xi.item() == pytest.approx(value, rel=1e-10, abs=1e-12)


def _lambdify_torch(expression):
    functions = {"log": torch.log, "cosh": torch.cosh, "sin": torch.sin}
    return sp.lambdify(symbolic.x, expression, modules=[functions, "math"])


def test_xi_2_is_not_a_gradient_while_xi_1_is():
    # xi_1 = grad(|g|^2 / 4) has a symmetric Jacobian; xi_2 in general does not, so
    # from order 2 on the EoM is no gradient flow of any modified loss.
    def loss(p):
        return torch.sin(p[0]) * p[1] ** 2 + p[0] ** 3 / 3 + torch.exp(0.5 * p[1])

    params = torch.tensor([0.4, -0.8], dtype=torch.float64)
    for order, symmetric in ((1, True), (2, False)):
        jacobian = func.jacrev(lambda p, k=order: eomlib.counter_terms(loss, p, k)[-1])(
            params
        )
        asymmetry = (jacobian - jacobian.T).abs().max().item()
        assert (asymmetry < 1e-12) == symmetric, (order, asymmetry)


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
    ],
)
def test_a_bad_order_raises_before_differentiating(order, error, message):
    def loss(x):
        raise AssertionError("the loss must not be evaluated")

    with pytest.raises(error, match=message):
        eomlib.counter_terms(loss, torch.zeros(2), order)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_shared_reverse_graphs_give_the_tree_by_tree_forward_values(case, order):
    loss, params = case
    shared = eomlib.counter_terms(loss, params, order, method="reverse")
    by_tree = eomlib.counter_terms(loss, params, order, method="forward")
    for k, (a, b) in enumerate(zip(shared, by_tree), start=1):
        scale = _tree.flatten(b).abs().max().item()
        torch.testing.assert_close(
            _tree.flatten(a),
            _tree.flatten(b),
            atol=1e-12 * max(scale, 1),
            rtol=0,
            msg=f"xi_{k}",
        )


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_every_evaluated_tree_has_its_prefix_and_last_child_before_it(order):
    plan = evaluation_plan(order)
    position = {tree: i for i, tree in enumerate(plan.trees)}
    for tree in plan.trees[1:]:
        prefix, last = split(tree)
        assert position[prefix] < position[tree] and position[last] < position[tree]
        assert prefix in plan.graphs
    for direct, groups in zip(plan.direct, plan.sums):
        for _, tree in direct:
            assert tree in position
        for prefix, items in groups.items():
            assert prefix in plan.graphs
            assert all(last in position for _, last in items)
    # every tree of xi_k is accounted for exactly once
    for k, (direct, groups) in enumerate(zip(plan.direct, plan.sums), start=1):
        rebuilt = {tree: c for c, tree in direct}
        for prefix, items in groups.items():
            for c, last in items:
                rebuilt[tuple(sorted((*prefix, last)))] = c
        assert rebuilt == bseries.counter_term_trees(k)
