"""Networks from a seed, and their losses as functions of a dict of params."""

import pytest
import torch
from torch import nn

import eomlib


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
            "unknown model 'resnet'; allowed: cnn, mlp",
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
