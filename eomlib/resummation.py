"""The all-order resummation of the EoM's ``H^j g`` terms: the principal flow.

On a quadratic the counter terms are ``xi_j = H^j g / (j + 1)``, so the EoM is
``d params/dt = -sum_j (lr H)^j g / (j + 1) = log(1 - lr H) / (lr H) g``: a power
series in ``lr H`` that converges only while ``lr |lambda| < 1`` for every
eigenvalue. In the Hessian's eigenbasis ``H = sum_i lambda_i u_i u_i^T`` the sum is
known in closed form. With ``x = lr lambda``,

    phi(x) = -log(1 - x) / x = 1 + x/2 + x^2/3 + ...    (phi(0) = 1),

and the *principal flow* is ``d params/dt = -sum_i phi(lr lambda_i) (u_i . g) u_i``:
each eigendirection keeps GF's rate multiplied by ``phi``. It is exact for a
quadratic (its flow over a time ``k lr`` is GD's k-th iterate) for every
``lr lambda < 1``, negative curvature included, where the series itself already
diverges for ``lr lambda <= -1``. On a network it sums every term of the EoM that is a
power of ``H`` applied to ``g``, and leaves out the others, those with third and
higher derivatives (``xi_2 = H^2 g / 3 + T(g, g) / 12``): alone, its field misses
the EoM's by ``O(lr^2)``, as the EoM of order 1 does, a local error ``O(lr^3)``.

:func:`principal_flow_field` therefore resums on top of a truncated EoM: the field is
the EoM of ``order`` (GF for 0) minus, along each eigendirection it knows,
``(phi(x) - p_K(x)) (u . g) u`` with ``p_K(x) = sum_{j=0..K} x^j / (j + 1)``, the part
of ``phi`` that the truncated series misses. With the whole spectrum and ``order=0``
it is the principal flow above; with the top ``k`` eigenpairs, every other direction
keeps exactly the EoM of ``order``'s rate ``p_K(lr lambda)`` (GF's rate 1 for
``order=0``), and every term of that EoM with higher derivatives is kept in full.

Past ``lr lambda = 1``. There ``1 - x < 0`` and ``log(1 - x) = log|1 - x| + i pi``
on the principal branch. The complex rate ``log(1 - x) / lr`` gives, at ``t = k
lr``, ``|1 - x|^k e^{i pi k} = (1 - x)^k``: GD's own factor, sign flip and all; the
imaginary part ``i pi / lr`` is a rotation by half a turn per step, GD's
oscillation across the valley. No real flow can flip a sign, so
:func:`resummed_rate` keeps the real part, ``-log|1 - x| / x``. Its flow tracks the
*magnitude* ``|1 - x|^k`` of GD's offset along that direction and never its sign:
the offset shrinks for ``1 < x < 2``, stays for ``x = 2`` (the rate is 0) and grows
for ``x > 2``, as GD's amplitude does, while GD sits on alternating sides. At
``x = 1`` the rate is infinite (GD lands on the minimum of that direction in one
step). A real flow of this kind describes GD past 1 only through that envelope, and
past 2 only as divergence.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from eomlib import _tree
from eomlib._checks import check_choice, check_int, check_lr
from eomlib._tree import Tree
from eomlib.counter_terms import check_order
from eomlib.derivatives import Loss, grad
from eomlib.flows import eom_field
from eomlib.spectrum import WHICH, _check_k, dense_hessian, top_eigenpairs

Field = Callable[[Tree], Tree]

# What the field does where some lr * lambda >= 1: take the real part of the complex
# logarithm, or refuse.
BRANCHES = ("real", "raise")


def resummed_rate(x: torch.Tensor, *, branch: str = "real") -> torch.Tensor:
    """``phi(x) = -log(1 - x) / x`` elementwise, 1 at ``x = 0``; for ``x > 1`` the
    real branch ``-log|1 - x| / x`` (``branch="raise"`` refuses ``x >= 1`` instead).

    Example:
        >>> resummed_rate(torch.tensor([0.0, 0.5, 1.5, 2.0], dtype=torch.float64))
        tensor([1.0000, 1.3863, 0.4621, -0.0000], dtype=torch.float64)
    """
    check_choice(branch, "branch", BRANCHES)
    x = torch.as_tensor(x)
    if not x.is_floating_point():  # integers and bools: in the default float dtype
        x = x.to(torch.get_default_dtype())
    if branch == "raise" and (x >= 1).any():
        worst = x.max().item()
        raise ValueError(
            f"lr * lambda = {worst:.4g} >= 1: the counter-term series has no real sum "
            "there (GD flips the sign along that direction); pass branch='real' for "
            "the flow of GD's magnitude, or use a smaller lr"
        )
    tiny = x.abs() < 1e-8
    safe = torch.where(tiny, torch.ones_like(x), x)
    below = -torch.log1p(-torch.where(safe < 1, safe, torch.zeros_like(safe))) / safe
    above = -torch.log(torch.where(safe > 1, safe - 1, torch.ones_like(safe))) / safe
    rate = torch.where(safe < 1, below, above)
    rate = torch.where(safe == 1, torch.full_like(x, math.inf), rate)
    return torch.where(tiny, 1 + x / 2 + x**2 / 3, rate)


def truncated_rate(x: torch.Tensor, order: int) -> torch.Tensor:
    """``p_K(x) = sum_{j=0..K} x^j / (j + 1)``: the rate of the EoM of ``order`` K
    along an eigendirection of a quadratic, the series of :func:`resummed_rate` cut
    after ``x^K``.

    Example:
        >>> truncated_rate(torch.tensor([0.5], dtype=torch.float64), 2)
        tensor([1.3333], dtype=torch.float64)
    """
    check_order(order)
    x = torch.as_tensor(x)
    return sum((x**j / (j + 1) for j in range(order + 1)), torch.zeros_like(x))


def principal_flow_field(
    loss: Loss,
    lr: float,
    *,
    k: int | None = None,
    order: int = 0,
    branch: str = "real",
    which: str = "largest",
    tol: float = 1e-12,
    seed: int = 0,
) -> Field:
    """The EoM of ``order`` with the ``H^j g`` terms of every higher order summed in
    closed form along the Hessian's eigendirections.

    ``F = F_K - sum_i (phi(lr lambda_i) - p_K(lr lambda_i)) (u_i . g) u_i``, with
    ``F_K`` the EoM field of ``order`` K (:func:`eomlib.eom_field`; GF for 0),
    ``phi`` of :func:`resummed_rate` and ``p_K`` of :func:`truncated_rate`.

    Args:
        loss: a function of ``params`` returning a 0-d tensor.
        lr: the learning rate.
        k: ``None`` for every eigenpair, from the dense Hessian
            (:func:`eomlib.spectrum.dense_hessian` and ``torch.linalg.eigh``: small
            models only); an integer for the top ``k`` of :func:`top_eigenpairs`
            (Lanczos from the same random vector at every call, so the field is a
            smooth function of params). The other directions keep ``F_K``'s rate.
            NOTE: which ``k`` directions are the top ones changes where
            ``lambda_k`` and ``lambda_(k+1)`` cross, and the field jumps there;
            take ``k`` at a gap of the spectrum, or the dense version.
        order: the EoM that the resummation starts from; 0 is GF.
        branch: ``"real"`` (past ``lr lambda = 1`` the real part of the logarithm:
            the flow of GD's magnitude along that direction, see the module) or
            ``"raise"``.
        which: the eigenpairs of the top-``k`` version, as in :func:`top_eigenpairs`.
        tol: Lanczos's relative residual for the top-``k`` version.
        seed: the seed of Lanczos's starting vector.

    Returns:
        ``params -> d params/dt``. For ``order=0`` and ``k=None`` it is
        ``-phi(lr H) g``, exact on a quadratic: its flow over a time ``lr`` is the GD
        step, for every ``lr lambda < 1``.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 0.5], dtype=torch.float64))
        >>> field = principal_flow_field(lambda x: 0.5 * x @ A @ x, 0.5)
        >>> field(torch.tensor([1.0, 1.0], dtype=torch.float64))
        tensor([-1.3863, -0.5754], dtype=torch.float64)
    """
    lr = check_lr(lr)
    check_order(order)
    check_choice(branch, "branch", BRANCHES)
    check_choice(which, "which", WHICH)
    check_lr(tol, "tol")
    if k is not None:
        check_int(k, "k", minimum=1)
    base = eom_field(loss, lr, order) if order > 0 else None

    def field(params: Tree) -> Tree:
        flat_g = _tree.flatten(grad(loss, params))
        if k is None:
            values, vectors = torch.linalg.eigh(dense_hessian(loss, params))
            vectors = vectors.T
        else:
            _check_k(k, flat_g.numel())
            pairs = top_eigenpairs(loss, params, k, which=which, tol=tol, seed=seed)
            values, vectors = pairs.values, pairs.vectors
        x = lr * values
        tail = resummed_rate(x, branch=branch) - truncated_rate(x, order)
        correction = vectors.T @ (tail * (vectors @ flat_g))
        start = -flat_g if base is None else _tree.flatten(base(params))
        return _tree.unflatten(start - correction, params)

    return field
