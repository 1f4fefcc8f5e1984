"""Shared cases: small losses whose dense float64 Hessians serve as ground truth,
and the book built once for the tests that read it."""

import shutil
from pathlib import Path

import pytest
import torch
from torch import func

import eomlib
from eomlib import _tree, runner

ROOT = Path(__file__).resolve().parents[1]

# One tolerance for every comparison against a dense float64 ground truth.
ATOL = 1e-10


def _cubic(x):
    A = torch.arange(1.0, 1.0 + x.numel() ** 2, dtype=x.dtype).reshape(x.numel(), -1)
    A = (A + A.T) / A.numel()
    return 0.5 * x @ A @ x + (x**3).sum() / 6 + torch.sin(x).sum()


def _tensor_cubic():
    return _cubic, torch.linspace(-1.0, 1.0, 7, dtype=torch.float64)


def _dict_mlp_digits():
    problem = eomlib.make_problem(
        "mlp", "digits", seed=3, num_samples=50, hidden=(5,), dtype="float64"
    )
    return problem.loss, problem.params


def _dict_cnn_digits():
    problem = eomlib.make_problem(
        "cnn", "digits", seed=4, num_samples=30, channels=2, dtype="float64"
    )
    return problem.loss, problem.params


CASES = {
    "tensor-cubic": _tensor_cubic,
    "dict-mlp-digits": _dict_mlp_digits,
    "dict-cnn-digits": _dict_cnn_digits,
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    """A (loss, params) pair: a tensor and a dict of tensors."""
    return CASES[request.param]()


def dense_hessian(loss, params):
    """The Hessian of ``loss`` at ``params`` as a dense matrix.

    Formed row by row with classic double backward (torch.autograd), not with
    torch.func, so that it does not share the code under test.
    """
    flat = _tree.flatten(params).detach()
    return torch.autograd.functional.hessian(
        lambda v: loss(_tree.unflatten(v, params)), flat
    )


def dense_grad(loss, params):
    flat = _tree.flatten(params)
    return func.grad(lambda v: loss(_tree.unflatten(v, params)))(flat)


def random_like(params, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return _tree.tree_map(
        lambda p: torch.randn(p.shape, generator=generator, dtype=p.dtype), params
    )


def classic_grad_derivative(loss, params, vectors):
    """``D^m g[v_1, ..., v_m]`` by classic double backward (torch.autograd), flat.

    Independent of torch.func: each level differentiates the inner product of the
    previous level with the next vector.
    """
    flat = _tree.flatten(params).detach().requires_grad_(True)
    (value,) = torch.autograd.grad(
        loss(_tree.unflatten(flat, params)), flat, create_graph=True
    )
    for v in vectors:
        (value,) = torch.autograd.grad(value @ v, flat, create_graph=True)
    return value.detach()


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """A scratch copy of the book with every notebook executed in the quick
    profile and the HTML built, once per test session (minutes)."""
    root = tmp_path_factory.mktemp("book")
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, root / name)
    for name in ("book", "notebooks", "results"):
        shutil.copytree(ROOT / name, root / name)
    runner.run(root, profile="quick")
    return root
