"""Scale and translation symmetries, and the norm dynamics they imply.

The identities are checked on random losses built to have each symmetry, and on the
BatchNorm networks of ``eomlib.models``; the EoM's one-step norm change is checked
to converge to GD's at the rate its order promises.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eomlib
from eomlib import symmetries as sym
from eomlib.figures import fit_slope

SOLVE = {"solver": "dopri8", "rtol": 1e-13, "atol": 1e-16}


def scale_invariant_case(seed: int):
    """A smooth loss of ``w / |w|`` and a free ``v``: ``w`` is scale-invariant."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    B = torch.randn(6, 3, generator=gen, dtype=torch.float64)

    def loss(params):
        u = params["w"] / params["w"].norm()
        return torch.tanh(A @ u).pow(2).sum() + torch.sin(u @ B @ params["v"]).sum()

    params = {
        "w": torch.randn(6, generator=gen, dtype=torch.float64),
        "v": torch.randn(3, generator=gen, dtype=torch.float64),
    }
    return loss, params


def translation_invariant_case(seed: int):
    """Softmax cross-entropy of a linear layer on random features and labels."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=gen)

    def loss(params):
        logits = torch.tanh(X) @ params["W"].T + params["b"]
        return torch.nn.functional.cross_entropy(logits, y)

    params = {
        "W": torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "b": torch.randn(3, generator=gen, dtype=torch.float64),
    }
    return loss, params


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_scale_invariant_weights_are_orthogonal_to_g_and_w_dot_hg_is_minus_g_sq(seed):
    loss, params = scale_invariant_case(seed)
    rows = sym.identities(loss, params, sym.Symmetries(scale=("w",), translation=()))
    assert [r["identity"] for r in rows] == ["w·g = 0", "w·Hg = −|g_w|²"]
    for row in rows:
        assert row["relative gap"] < 1e-13, row


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_the_class_sums_of_g_and_hg_vanish_for_the_softmax_layer(seed):
    loss, params = translation_invariant_case(seed)
    symmetries = sym.Symmetries(scale=(), translation=("W", "b"))
    for row in sym.identities(loss, params, symmetries):
        assert row["relative gap"] < 1e-13, row
    v = {name: torch.randn_like(p) for name, p in params.items()}
    Hv = eomlib.hvp(loss, params, v)
    assert Hv["W"].sum(0).abs().max() < 1e-14
    assert Hv["b"].sum().abs() < 1e-14


def test_a_gd_step_grows_a_scale_invariant_norm_by_exactly_lr_sq_g_sq():
    loss, params = scale_invariant_case(0)
    for lr in (0.01, 0.3, 2.0):
        changes = sym.one_step_changes(loss, params, lr, [], {"w": ["w"]})["w"]
        g_sq = eomlib.grad(loss, params)["w"].pow(2).sum().item()
        assert changes["GD"] == pytest.approx(lr**2 * g_sq, rel=1e-12)


def test_gf_keeps_a_scale_invariant_norm_and_eom1_grows_it_at_lr_g_sq():
    loss, params = scale_invariant_case(1)
    lr = 0.1
    rates = sym.norm_rates(loss, params, lr, [0, 1], {"w": ["w"]})["w"]
    g_sq = eomlib.grad(loss, params)["w"].pow(2).sum().item()
    assert abs(rates[0]) < 1e-14
    assert rates[1] == pytest.approx(lr * g_sq, rel=1e-12)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_the_eoms_one_step_norm_change_meets_gds_at_rate_lr_to_the_k_plus_2(order):
    loss, params = scale_invariant_case(2)
    lrs = [0.02, 0.01, 0.005, 0.0025]
    gaps = []
    for lr in lrs:
        changes = sym.one_step_changes(loss, params, lr, [order], {"w": ["w"]}, **SOLVE)
        changes = changes["w"]
        gaps.append(abs(changes[order] - changes["GD"]))
    floor = 1e3 * torch.finfo(torch.float64).eps * sym.sq_norm(params, ["w"])
    assert fit_slope(lrs, gaps, floor) == pytest.approx(order + 2, abs=0.15)


def test_with_weight_decay_gd_shrinks_the_class_sum_by_one_minus_lr_lambda():
    loss, params = translation_invariant_case(4)
    lr, lam = 0.2, 0.3
    trajectory = eomlib.gd_trajectory(sym.with_weight_decay(loss, lam), params, lr, 5)
    sums = trajectory["W"].sum(dim=1)
    torch.testing.assert_close(
        sums[1:], (1 - lr * lam) * sums[:-1], rtol=1e-13, atol=1e-15
    )


def test_the_eoms_class_sum_rate_is_the_series_of_log_one_minus_lr_lambda():
    loss, params = translation_invariant_case(5)
    lr, lam = 0.2, 0.3
    rates = sym.class_sum_rates(
        sym.with_weight_decay(loss, lam), params, lr, range(5), "W"
    )
    for order, rate in rates.items():
        assert rate == pytest.approx(
            sym.class_sum_rate_series(lr, lam, order), rel=1e-12
        )
    assert sym.class_sum_rate_series(lr, lam, 0) == -lam
    assert sym.class_sum_rate_series(lr, lam, 40) == pytest.approx(
        sym.class_sum_rate_series(lr, lam, None), rel=1e-14
    )


def test_the_first_order_equilibrium_root_is_its_closed_form():
    loss, params = scale_invariant_case(6)
    lr, lam = 0.1, 0.05
    decayed = sym.with_weight_decay(loss, lam)
    g_hat_sq = sym.scale_free_grad_sq(loss, params, "w")
    closed = sym.equilibrium_sq_norm(g_hat_sq, lr, lam, "eom1")
    root = sym.flow_equilibrium_sq_norm(decayed, params, "w", lr, 1, guess=closed)
    assert root == pytest.approx(closed, rel=1e-10)


def test_gds_norm_map_is_fixed_at_its_closed_form_equilibrium():
    loss, params = scale_invariant_case(7)
    lr, lam = 0.1, 0.05
    g_hat_sq = sym.scale_free_grad_sq(loss, params, "w")
    fixed = sym.equilibrium_sq_norm(g_hat_sq, lr, lam, "gd")
    at_fixed = dict(params, w=math.sqrt(fixed) * params["w"] / params["w"].norm())
    step = sym.one_step(sym.with_weight_decay(loss, lam), at_fixed, lr, None)
    assert sym.sq_norm(step, ["w"]) == pytest.approx(fixed, rel=1e-12)


def test_without_weight_decay_there_is_no_equilibrium_and_the_error_says_why():
    loss, params = scale_invariant_case(8)
    with pytest.raises(ValueError, match="with_weight_decay"):
        sym.flow_equilibrium_sq_norm(loss, params, "w", 0.1, 1, guess=1.0)


def test_bad_weight_decays_learning_rates_and_names_are_refused():
    loss, params = scale_invariant_case(0)
    assert sym.with_weight_decay(loss, 0) is loss
    with pytest.raises(ValueError, match="weight_decay must be finite and >= 0"):
        sym.with_weight_decay(loss, -0.1)
    with pytest.raises(TypeError, match="weight_decay must be a real number"):
        sym.with_weight_decay(loss, False)
    with pytest.raises(ValueError, match="unknown dynamics 'adam'"):
        sym.equilibrium_sq_norm(1.0, 0.1, 0.1, "adam")
    with pytest.raises(ValueError, match="no fixed point"):
        sym.equilibrium_sq_norm(1.0, 1.0, 2.5, "gd")
    with pytest.raises(ValueError, match="no real exponential rate"):
        sym.class_sum_rate_series(1.0, 1.0, None)
    with pytest.raises(ValueError, match="lr must be positive"):
        sym.class_sum_rate_series(0.0, 0.1, 2)
    with pytest.raises(ValueError, match="order"):
        sym.class_sum_rate_series(0.1, 0.1, -1)
    with pytest.raises(ValueError, match="guess must be positive"):
        sym.flow_equilibrium_sq_norm(loss, params, "w", 0.1, 1, guess=0.0)


@pytest.mark.parametrize(
    ("model", "options", "scale"),
    [
        ("bn_mlp", {"hidden": (5, 4)}, ("0.weight", "3.weight")),
        ("bn_cnn", {"channels": 2, "blocks": 2}, ("1.weight", "5.weight")),
    ],
)
def test_batchnorm_networks_have_the_symmetries_that_find_symmetries_names(
    model, options, scale
):
    problem = eomlib.make_problem(
        model, "digits", seed=1, num_samples=40, dtype="float64", **options
    )
    symmetries = sym.find_symmetries(problem.model)
    assert symmetries.scale == scale
    assert len(symmetries.translation) == 2
    for row in sym.identities(problem.loss, problem.params, symmetries):
        assert row["relative gap"] < 1e-12, row


def test_networks_without_batchnorm_have_no_scale_invariant_weights():
    model = eomlib.make_model("mlp", 64, 10, hidden=(4,))
    assert sym.find_symmetries(model) == sym.Symmetries((), ("2.weight", "2.bias"))


def test_a_linear_layer_followed_by_an_activation_is_not_called_translation_invariant():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    assert sym.find_symmetries(model).translation == ()
