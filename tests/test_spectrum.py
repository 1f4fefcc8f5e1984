"""Top Hessian eigenpairs by Lanczos, the dense Hessian, and sharpness along GD."""

import pytest
import torch
from torch import func

import eomlib
from eomlib import _tree, spectrum


@pytest.fixture(scope="module")
def mlp():
    problem = eomlib.make_problem(
        "mlp", "digits", seed=1, num_samples=40, hidden=(4,), dtype="float64"
    )
    return problem.loss, problem.params


def _dense_by_torch_func(loss, params):
    flat = _tree.flatten(params)
    return func.hessian(lambda x: loss(_tree.unflatten(x, params)))(flat)


def test_dense_hessian_equals_torch_func_hessian(mlp):
    loss, params = mlp
    expected = _dense_by_torch_func(loss, params)
    torch.testing.assert_close(
        spectrum.dense_hessian(loss, params, chunk=100), expected, atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("which", ["largest", "magnitude"])
def test_lanczos_top_k_matches_eigh_of_the_dense_hessian(mlp, which):
    loss, params = mlp
    values, vectors = torch.linalg.eigh(_dense_by_torch_func(loss, params))
    key = values if which == "largest" else values.abs()
    order = torch.argsort(key, descending=True)[:5]

    pairs = spectrum.top_eigenpairs(loss, params, 5, which=which, tol=1e-12)

    torch.testing.assert_close(pairs.values, values[order], atol=1e-10, rtol=0)
    overlaps = (pairs.vectors @ vectors[:, order]).diagonal().abs()
    torch.testing.assert_close(
        overlaps, torch.ones(5, dtype=overlaps.dtype), atol=1e-7, rtol=0
    )
    assert pairs.num_hvps < _tree.flatten(params).numel()


def test_lanczos_with_every_eigenpair_recovers_the_whole_spectrum():
    # Repeated eigenvalues close the Krylov space early; the restart finds the rest.
    A = torch.diag(torch.tensor([3.0, 3.0, 1.0, -2.0, -2.0, 0.5], dtype=torch.float64))
    pairs = spectrum.top_eigenpairs(
        lambda x: 0.5 * x @ A @ x, torch.zeros(6, dtype=A.dtype), 6
    )
    torch.testing.assert_close(
        pairs.values, A.diagonal().sort(descending=True).values, atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        pairs.vectors @ pairs.vectors.T, torch.eye(6, dtype=A.dtype), atol=1e-12, rtol=0
    )


def test_the_tracker_takes_at_most_its_budget_of_hvps_a_step(mlp, monkeypatch):
    loss, params = mlp
    counted = []
    original = spectrum.AutogradPoint.pullback

    def counting(self, outputs, vectors, create_graph, **options):
        counted.append(1)
        return original(self, outputs, vectors, create_graph, **options)

    monkeypatch.setattr(spectrum.AutogradPoint, "pullback", counting)
    per_step = []
    gradient_and_operator = spectrum._gradient_and_operator

    def counting_steps(loss_, params_):
        per_step.append(len(counted))
        return gradient_and_operator(loss_, params_)

    monkeypatch.setattr(spectrum, "_gradient_and_operator", counting_steps)
    track = spectrum.track_sharpness(
        loss, params, 0.5, 12, hvps_per_step=2, start_hvps=30
    )
    per_step.append(len(counted))
    # Each step also takes one pullback for its gradient.
    products = [b - a - 1 for a, b in zip(per_step, per_step[1:])]

    assert products[0] <= 30
    assert all(count <= 2 for count in products[1:])
    assert track.hvps.tolist() == products


def test_the_warm_started_tracker_stays_within_a_percent_of_lanczos_along_gd(mlp):
    # lr * lambda_max passes 1 on this run, so the top eigenvector keeps moving.
    loss, params = mlp
    track = spectrum.track_sharpness(loss, params, 0.5, 60, hvps_per_step=3)
    for step in (5, 20, 40, 59):
        point = _tree.tree_map(lambda x, step=step: x[step], track.iterates)
        exact = spectrum.top_eigenpairs(loss, point, 1, tol=1e-12).values[0].item()
        estimate = track.sharpness[step].item()
        # A Ritz value: never above lambda_max, and close below it.
        assert exact - 1e-2 * exact <= estimate <= exact + 1e-10, step
    assert track.hvps_per_step == 3


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda L, p: spectrum.top_eigenpairs(L, p, 0), r"k must be an integer >= 1"),
        (lambda L, p: spectrum.top_eigenpairs(L, p, 10**6), r"at most the number"),
        (lambda L, p: spectrum.top_eigenpairs(L, p, 2, which="smallest"), "which"),
        (
            lambda L, p: spectrum.track_sharpness(L, p, 0.1, 5, hvps_per_step=0),
            "hvps_per_step",
        ),
        (lambda L, p: spectrum.track_sharpness(L, p, -0.1, 5), "lr"),
    ],
    ids=["k<1", "k>n", "which", "hvps_per_step", "lr<=0"],
)
def test_bad_input_is_named(mlp, call, match):
    loss, params = mlp
    with pytest.raises(ValueError, match=match):
        call(loss, params)


@pytest.mark.parametrize(("which", "expected"), [("largest", 3.0), ("magnitude", -5.0)])
def test_a_start_in_an_invariant_subspace_still_finds_the_top_eigenvalue(
    which, expected
):
    # The start is an eigenvector of 1: its Krylov space closes at once, holding an
    # exact but unwanted eigenpair, and Lanczos must restart to find the others.
    A = torch.diag(torch.tensor([3.0, 1.0, -5.0], dtype=torch.float64))
    start = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    found = eomlib.top_eigenpairs(
        lambda x: 0.5 * x @ A @ x,
        torch.zeros(3, dtype=torch.float64),
        1,
        start=start,
        which=which,
    )
    torch.testing.assert_close(
        found.values, torch.tensor([expected], dtype=torch.float64)
    )


def test_tracking_a_diverging_run_stops_with_a_divergence_error():
    def loss(x):
        return (x**2).sum() + 0.1 * (x**4).sum()

    with pytest.raises(eomlib.DivergenceError, match="GD diverged by step"):
        eomlib.track_sharpness(loss, torch.ones(2, dtype=torch.float64), 5.0, 200)
