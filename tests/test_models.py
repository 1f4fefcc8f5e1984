"""Networks from a seed, and their losses as functions of a dict of params."""

import copy

import pytest
import torch
from torch import nn

import eomlib
from eomlib import models


def test_the_same_seed_gives_the_same_network():
    first = eomlib.make_model("mlp", 64, 10, seed=7)
    second = eomlib.make_model("mlp", 64, 10, seed=7)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_building_a_network_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    eomlib.make_model("mlp", 64, 10, seed=0)
    torch.testing.assert_close(torch.rand(3), expected)


def test_float32_and_float64_networks_agree_up_to_rounding():
    low = eomlib.make_model("mlp", 64, 10, seed=1, dtype="float32")
    high = eomlib.make_model("mlp", 64, 10, seed=1, dtype="float64")
    for a, b in zip(low.parameters(), high.parameters(), strict=True):
        torch.testing.assert_close(a.double(), b, atol=0, rtol=0)


def test_the_loss_of_params_is_the_modules_own_cross_entropy():
    problem = eomlib.make_problem(num_samples=30, hidden=(6,))
    expected = nn.functional.cross_entropy(
        problem.model(problem.data.X), problem.data.y
    )
    torch.testing.assert_close(problem.loss(problem.params), expected)


def test_the_cnn_reads_digits_as_images_and_refuses_other_shapes():
    problem = eomlib.make_problem("cnn", num_samples=20, channels=3)
    assert problem.params["1.weight"].shape == (3, 1, 3, 3)
    assert torch.isfinite(problem.loss(problem.params))
    with pytest.raises(ValueError, match="needs square one-channel images; got 10"):
        eomlib.make_model("cnn", 10, 2)


def test_differentiating_the_loss_leaves_the_module_unchanged():
    problem = eomlib.make_problem(num_samples=30, hidden=(6,))
    before = {k: v.clone() for k, v in problem.model.state_dict().items()}
    params = eomlib.gd_trajectory(problem.loss, problem.params, 0.5, 2)
    assert params["0.weight"].shape[0] == 3
    for name, value in problem.model.state_dict().items():
        torch.testing.assert_close(value, before[name], atol=0, rtol=0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: eomlib.make_model("resnet", 64, 10),
            "unknown model 'resnet'; allowed: bn_cnn, bn_mlp, cnn, mlp",
        ),
        (
            lambda: eomlib.make_model("mlp", 64, 10, seed=-1),
            "seed must be an integer >= 0",
        ),
        (
            lambda: eomlib.make_model("mlp", 64, 10, activation="relu6"),
            "unknown activation 'relu6'; allowed: gelu, softplus, tanh",
        ),
        (lambda: eomlib.make_problem("mlp", "svhn"), "unknown dataset 'svhn'"),
    ],
)
def test_bad_model_arguments_are_named_in_the_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.fixture(params=["bn_mlp", "bn_cnn"])
def bn_problem(request):
    options = {"bn_mlp": {"hidden": (5,)}, "bn_cnn": {"channels": 2}}[request.param]
    return eomlib.make_problem(
        request.param,
        "digits",
        seed=2,
        num_samples=40,
        dtype="float64",
        **options,
    )


def test_batchnorm_networks_go_through_hvp_and_counter_terms_leaving_the_module(
    bn_problem,
):
    module = bn_problem.model
    module.eval()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    g = eomlib.grad(bn_problem.loss, bn_problem.params)
    eomlib.hvp(bn_problem.loss, bn_problem.params, g)
    eomlib.counter_terms(bn_problem.loss, bn_problem.params, 3)
    stacked = {n: torch.stack([p, 2 * p]) for n, p in bn_problem.params.items()}
    losses = torch.func.vmap(bn_problem.loss)(stacked)
    torch.testing.assert_close(losses[0], bn_problem.loss(bn_problem.params))
    assert not module.training
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)


def test_batchnorm_normalises_with_the_full_batch_like_training_mode(bn_problem):
    module = bn_problem.model
    module.train()
    expected = nn.functional.cross_entropy(module(bn_problem.data.X), bn_problem.data.y)
    torch.testing.assert_close(bn_problem.loss(bn_problem.params), expected)


def test_third_derivatives_through_batchnorm_match_finite_differences(bn_problem):
    """D^2 g[v, v] against a central difference of Hessian-vector products: the
    fused batch_norm of PyTorch gets this wrong (pytorch/pytorch#186256)."""
    loss, params = bn_problem.loss, bn_problem.params
    v = eomlib.grad(loss, params)
    h = 1e-4
    plus = {n: p + h * v[n] for n, p in params.items()}
    minus = {n: p - h * v[n] for n, p in params.items()}
    hvp_plus = eomlib.hvp(loss, plus, v, method="reverse")
    hvp_minus = eomlib.hvp(loss, minus, v, method="reverse")
    for method in ("forward", "reverse"):
        third = eomlib.grad_derivative(loss, params, [v, v], method=method)
        for n in params:
            difference = (hvp_plus[n] - hvp_minus[n]) / (2 * h)
            scale = difference.abs().max().item() + 1e-12
            assert (third[n] - difference).abs().max().item() < 1e-6 * scale


def test_a_loss_refuses_params_that_do_not_name_the_models_parameters():
    problem = eomlib.make_problem("bn_mlp", num_samples=20, hidden=(3,))
    partial = dict(problem.params)
    partial.pop("0.weight")
    with pytest.raises(KeyError, match=r"missing \['0.weight'\], unknown \[\]"):
        problem.loss(partial)
    with pytest.raises(KeyError, match=r"unknown \['1.running_mean'\]"):
        problem.loss(problem.params | {"1.running_mean": torch.zeros(3)})


def test_batchnorm_needs_a_positive_eps():
    with pytest.raises(ValueError, match="norm_eps must be positive"):
        eomlib.make_model("bn_mlp", 64, 10, norm_eps=0.0)


@pytest.mark.parametrize("name", sorted(eomlib.MODELS))
def test_the_layer_by_layer_forward_is_functional_call(name):
    options = {"hidden": (6, 5)} if "mlp" in name else {"channels": 2, "blocks": 2}
    problem = eomlib.make_problem(name, "digits", seed=2, num_samples=40, **options)
    private = models._with_batch_norms(
        copy.deepcopy(problem.model), models.BatchNormFromPrimitives
    )
    forward = models._layer_by_layer(private)
    assert forward is not None, "every network of MODELS runs layer by layer"
    direct = forward(problem.params, (problem.data.X,))
    reference = torch.func.functional_call(private, problem.params, (problem.data.X,))
    torch.testing.assert_close(direct, reference, atol=0, rtol=0)


def test_other_modules_run_through_functional_call():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, x):
            return self.linear(x) * 2

    data = eomlib.load_dataset("digits", num_samples=20)
    model = Custom().double()
    assert models._layer_by_layer(model) is None
    loss = eomlib.make_loss(model, data)
    params = eomlib.initial_params(model)
    expected = nn.functional.cross_entropy(model(data.X), data.y)
    torch.testing.assert_close(loss(params), expected)


@pytest.mark.parametrize("name", ["bn_mlp", "bn_cnn"])
def test_the_fused_batch_norm_loss_has_the_exact_first_and_second_derivatives(name):
    options = {"hidden": (6, 5)} if "mlp" in name else {"channels": 2, "blocks": 2}
    problem = eomlib.make_problem(name, "digits", seed=2, num_samples=40, **options)
    exact, fused = problem.loss, problem.loss.second_order
    params = problem.params
    v = eomlib.grad(exact, params)
    torch.testing.assert_close(fused(params), exact(params), atol=1e-14, rtol=0)
    for a, b in [
        (eomlib.grad(fused, params), v),
        (eomlib.hvp(fused, params, v), eomlib.hvp(exact, params, v)),
    ]:
        for key in params:
            torch.testing.assert_close(a[key], b[key], atol=1e-12, rtol=0)


def test_gradients_and_products_use_the_fused_version_and_nothing_higher(bn_problem):
    loss, params = bn_problem.loss, bn_problem.params
    fused = loss.second_order
    v = eomlib.grad(fused, params)
    for through, direct in [
        (eomlib.grad(loss, params), v),
        (eomlib.hvp(loss, params, v), eomlib.hvp(fused, params, v)),
        (
            eomlib.counter_terms(loss, params, 1)[0],
            eomlib.counter_terms(fused, params, 1)[0],
        ),
    ]:
        for key in params:
            assert torch.equal(through[key], direct[key])
    # The fused version's third derivatives are wrong: they must not leak in.
    exact_third = eomlib.grad_derivative(loss, params, [v, v])
    fused_third = eomlib.grad_derivative(fused, params, [v, v])
    assert any(not torch.allclose(exact_third[k], fused_third[k]) for k in params)


def test_a_wrapped_batch_norm_loss_keeps_exact_third_derivatives(bn_problem):
    """A wrapper that drops ``second_order`` loses speed, not exactness; weight
    decay keeps it."""
    loss, params = bn_problem.loss, bn_problem.params
    v = eomlib.grad(loss, params)
    decayed = eomlib.with_weight_decay(loss, 0.1)
    assert decayed.second_order is not loss.second_order
    wrapped = lambda p: loss(p)  # noqa: E731
    expected = eomlib.grad_derivative(loss, params, [v, v])
    for key_loss in (decayed, wrapped):
        third = eomlib.grad_derivative(key_loss, params, [v, v])
        for key in params:  # the quadratic decay has no third derivative
            torch.testing.assert_close(third[key], expected[key], atol=1e-12, rtol=0)
    for key, value in eomlib.grad(decayed, params).items():
        torch.testing.assert_close(value, v[key] + 0.1 * params[key])


def _sequential_loss(model, data):
    return eomlib.make_loss(model, data), eomlib.initial_params(model)


def test_a_layer_used_twice_runs_through_functional_call():
    shared = nn.Linear(5, 5)
    model = nn.Sequential(nn.Linear(64, 5), nn.Tanh(), shared, nn.Tanh(), shared)
    model = nn.Sequential(*model, nn.Linear(5, 10)).double()
    assert models._layer_by_layer(model) is None
    data = eomlib.load_dataset("digits", num_samples=20)
    loss, params = _sequential_loss(model, data)
    expected = nn.functional.cross_entropy(model(data.X), data.y)
    torch.testing.assert_close(loss(params), expected)


def test_a_module_with_a_hook_runs_through_functional_call():
    model = nn.Sequential(nn.Linear(64, 5), nn.Tanh(), nn.Linear(5, 10)).double()
    model[1].register_forward_hook(lambda module, args, out: 2 * out)
    assert models._layer_by_layer(model) is None
    data = eomlib.load_dataset("digits", num_samples=20)
    loss, params = _sequential_loss(model, data)
    expected = nn.functional.cross_entropy(model(data.X), data.y)
    torch.testing.assert_close(loss(params), expected)


def test_a_global_forward_hook_is_honoured():
    model = nn.Sequential(nn.Linear(64, 5), nn.Tanh(), nn.Linear(5, 10)).double()
    data = eomlib.load_dataset("digits", num_samples=20)
    loss, params = _sequential_loss(model, data)
    plain = loss(params)
    hook = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: 2 * out if isinstance(module, nn.Tanh) else None
    )
    try:
        doubled = loss(params)
        expected = nn.functional.cross_entropy(model(data.X), data.y)
    finally:
        hook.remove()
    torch.testing.assert_close(doubled, expected)
    assert not torch.allclose(doubled, plain)


def test_a_module_with_an_integer_buffer_is_differentiated_at_every_order():
    # An int64 buffer (a fixed permutation of the pixels) is data, not a parameter:
    # gradients, products and counter terms go through it, leaving it unchanged.
    class Permuted(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("order", torch.randperm(64, generator=_seeded(0)))
            self.linear = nn.Linear(64, 10)

        def forward(self, x):
            return torch.tanh(self.linear(x[:, self.order]))

    data = eomlib.load_dataset("digits", num_samples=20)
    model = Permuted().double()
    before = model.order.clone()
    loss, params = eomlib.make_loss(model, data), eomlib.initial_params(model)

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    dense = torch.autograd.functional.hessian(
        lambda x: loss(eomlib._tree.unflatten(x, params)), flat
    )
    v = eomlib.grad(loss, params)
    for method in ("reverse", "forward"):
        product = eomlib.hvp(loss, params, v, method=method)
        torch.testing.assert_close(
            eomlib._tree.flatten(product),
            dense @ eomlib._tree.flatten(v),
            atol=1e-12,
            rtol=0,
        )
    by_graphs = eomlib.counter_terms(loss, params, 2)
    by_trees = eomlib.counter_terms(loss, params, 2, method="forward")
    for a, b in zip(by_graphs, by_trees):
        torch.testing.assert_close(
            eomlib._tree.flatten(a), eomlib._tree.flatten(b), atol=1e-12, rtol=0
        )
    assert model.order.dtype == torch.int64 and torch.equal(model.order, before)


def _seeded(seed):
    return torch.Generator().manual_seed(seed)
