"""eomlib.modified_field: a torch.optim class and its hyper-parameters give a field."""

import pytest
import torch

import eomlib
from eomlib.optimizers import adaptive, heavy_ball, minibatch


def _loss(x):
    return 0.5 * (x * x).sum() + 0.1 * (x**4).sum()


X = torch.tensor([1.0, -0.5], dtype=torch.float64)


@pytest.mark.parametrize(
    ("optimizer", "hyper", "expected"),
    [
        (torch.optim.SGD, {"lr": 0.1}, lambda: eomlib.eom_field(_loss, 0.1, 2)),
        (
            torch.optim.SGD,
            {"lr": 0.1, "momentum": 0.5, "nesterov": True},
            lambda: heavy_ball.sgd_field(
                _loss, order=2, lr=0.1, momentum=0.5, nesterov=True
            ),
        ),
    ],
)
def test_sgd_goes_to_gds_eom_or_to_the_heavy_ball_field(optimizer, hyper, expected):
    field = eomlib.modified_field(_loss, optimizer, order=2, **hyper)
    torch.testing.assert_close(field(X), expected()(X), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("optimizer", "hyper", "builder"),
    [
        (
            torch.optim.Adam,
            {"lr": 0.01, "betas": (0.8, 0.9), "eps": 0.1},
            adaptive.adam_field,
        ),
        (
            torch.optim.RMSprop,
            {"lr": 0.01, "alpha": 0.9, "eps": 0.1},
            adaptive.rmsprop_field,
        ),
    ],
)
def test_adam_and_rmsprop_go_to_their_adaptive_fields(optimizer, hyper, builder):
    field = eomlib.modified_field(_loss, optimizer, order=1, **hyper)
    torch.testing.assert_close(
        field(X), builder(_loss, order=1, **hyper)(X), rtol=0, atol=0
    )


def test_a_batch_size_asks_for_the_field_of_shuffled_minibatches():
    problem = eomlib.make_problem(
        "mlp", "digits", num_samples=6, hidden=[3], dtype="float64", seed=0
    )
    field = eomlib.modified_field(problem, torch.optim.SGD, lr=0.2, batch_size=3)
    expected = minibatch.minibatch_field(problem, 0.2, 3)
    for a, b in zip(
        field(problem.params).values(), expected(problem.params).values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("optimizer", "hyper", "error", "message"),
    [
        (torch.optim.LBFGS, {"lr": 0.1}, ValueError, "no modified field for .*LBFGS"),
        (
            torch.optim.Adam,
            {"lr": 0.1, "batch_size": 2},
            ValueError,
            "batch_size=... has a derived field only for torch.optim.SGD",
        ),
        (torch.optim.SGD, {"lr": -0.1}, ValueError, "lr must be positive"),
        (
            torch.optim.SGD,
            {"lr": 0.1, "momentum": 1.0},
            ValueError,
            r"momentum must be in \[0, 1\); got momentum=1.0",
        ),
    ],
)
def test_an_optimizer_without_a_field_or_a_bad_hyper_parameter_is_named(
    optimizer, hyper, error, message
):
    with pytest.raises(error, match=message):
        eomlib.modified_field(_loss, optimizer, **hyper)


def test_torchs_own_sgd_defaults_are_accepted_and_weight_decay_is_the_decayed_loss():
    hyper = torch.optim.SGD([torch.nn.Parameter(X.clone())], lr=0.1, momentum=0.5)
    hyper = dict(hyper.defaults, weight_decay=0.3)
    field = eomlib.modified_field(_loss, torch.optim.SGD, order=2, **hyper)
    decayed = eomlib.with_weight_decay(_loss, 0.3)
    expected = heavy_ball.sgd_field(decayed, order=2, lr=0.1, momentum=0.5)
    torch.testing.assert_close(field(X), expected(X), rtol=0, atol=0)


def test_plain_sgd_takes_any_order_of_gds_eom():
    field = eomlib.modified_field(_loss, torch.optim.SGD, order=5, lr=0.1)
    torch.testing.assert_close(field(X), eomlib.eom_field(_loss, 0.1, 5)(X))


@pytest.mark.parametrize(
    ("hyper", "error", "message"),
    [
        (
            {"momentum": 0.5},
            TypeError,
            r"the SGD field needs lr=\.\.\.; got \['momentum'\]",
        ),
        (
            {"lr": 0.1, "betas": (0.9, 0.99)},
            TypeError,
            "SGD has no hyper-parameter 'betas'",
        ),
        ({"lr": 0.1, "maximize": True}, ValueError, "maximize=True is not modelled"),
    ],
)
def test_sgds_keywords_are_torchs_and_the_rest_is_named(hyper, error, message):
    with pytest.raises(error, match=message):
        eomlib.modified_field(_loss, torch.optim.SGD, **hyper)


def test_a_problem_without_a_batch_size_is_sent_back_for_its_loss():
    problem = eomlib.make_problem("mlp", "digits", num_samples=6, hidden=[3])
    with pytest.raises(TypeError, match="pass problem.loss, or batch_size"):
        eomlib.modified_field(problem, torch.optim.Adam, lr=0.1)
