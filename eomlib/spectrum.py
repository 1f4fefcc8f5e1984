"""The top of the Hessian's spectrum: eigenpairs by Lanczos, and sharpness along GD.

Only Hessian-vector products are taken: :func:`top_eigenpairs` runs the Lanczos
iteration with full reorthogonalisation on ``v -> H v`` (one gradient graph serves
every product), and :func:`track_sharpness` runs GD while it keeps an estimate of
``lambda_max`` up to date with a fixed, small number of products a step, started
each step from the previous step's top eigenvector. :func:`dense_hessian` forms the
whole matrix, for models small enough to hold it, as the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eomlib import _tree
from eomlib._checks import check_choice, check_int, check_lr
from eomlib._tree import Tree
from eomlib.derivatives import (
    AutogradPoint,
    Loss,
    _hessian_operator,
    autograd_applies,
    batched_hvp,
    for_second_order,
    grad,
)
from eomlib.flows import DivergenceError

# Which end of the spectrum "top" means: the largest eigenvalues (the sharpness,
# which sets GD's stability), or the largest in magnitude (negative ones too).
WHICH = ("largest", "magnitude")


@dataclass
class Eigenpairs:
    """Eigenvalues and orthonormal eigenvectors of the Hessian at one point.

    Attributes:
        values: the ``k`` eigenvalues, largest first (by value, or by magnitude for
            ``which="magnitude"``).
        vectors: a ``(k, num_params)`` tensor; row ``i`` is the unit eigenvector of
            ``values[i]``, in the order of ``eomlib._tree.flatten(params)``.
        residuals: ``|H u_i - lambda_i u_i|`` for each pair, as Lanczos bounds it.
        num_hvps: how many Hessian-vector products were taken.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    num_hvps: int

    def vector(self, i: int, like: Tree) -> Tree:
        """Eigenvector ``i`` in the structure of ``like`` (params)."""
        return _tree.unflatten(self.vectors[i], like)


def flat_hessian_operator(loss: Loss, params: Tree):
    """``v -> H v`` on flat vectors, in the order of ``_tree.flatten(params)``; the
    products share one gradient graph (see ``eomlib.derivatives``)."""
    product = _hessian_operator(loss, params)

    def flat(v: torch.Tensor) -> torch.Tensor:
        return _tree.flatten(product(_tree.unflatten(v, params)))

    return flat


def top_eigenpairs(
    loss: Loss,
    params: Tree,
    k: int = 1,
    *,
    which: str = "largest",
    tol: float = 1e-10,
    max_iters: int | None = None,
    start: torch.Tensor | None = None,
    seed: int = 0,
) -> Eigenpairs:
    """The ``k`` top eigenpairs of the Hessian of ``loss`` at ``params``, by Lanczos.

    The Krylov basis ``q_1 .. q_m`` of ``H`` from ``start`` is orthogonalised in full
    against every earlier vector (twice, classical Gram-Schmidt), so no spurious
    copies of converged eigenvalues appear. After each product the tridiagonal
    ``T_m = Q^T H Q`` is diagonalised; the iteration stops when each of the ``k``
    wanted Ritz pairs has a residual ``beta_m |s_mi|`` at most ``tol`` times the
    largest Ritz value in magnitude, or after ``max_iters`` products, or when the
    basis spans the whole space. If the Krylov space closes early (an invariant
    subspace), it continues from a random vector orthogonal to it.

    Args:
        loss: a function of ``params`` returning a 0-d tensor.
        params: a tensor or a dict of tensors.
        k: how many eigenpairs, ``1 <= k <= num_params``.
        which: ``"largest"`` (by value: the sharpness is ``values[0]``) or
            ``"magnitude"``.
        tol: the relative residual at which a pair counts as converged.
        max_iters: the most products; default ``min(num_params, max(300, 4 k))``.
        start: a flat starting vector (a previous eigenvector warm-starts the
            iteration); default a random one from ``seed``.
        seed: the seed of the random vectors.

    Returns:
        :class:`Eigenpairs`, with the number of products it took.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0, -5.0], dtype=torch.float64))
        >>> x0 = torch.zeros(3, dtype=torch.float64)
        >>> pairs = top_eigenpairs(lambda x: 0.5 * x @ A @ x, x0, 2)
        >>> [round(v) for v in pairs.values.tolist()]
        [3, 1]
    """
    _tree.check_floating(params)
    size = _tree.flatten(params).numel()
    _check_k(k, size)
    check_choice(which, "which", WHICH)
    check_lr(tol, "tol")
    if max_iters is None:
        max_iters = min(size, max(300, 4 * k))
    check_int(max_iters, "max_iters", minimum=k)
    operator = flat_hessian_operator(loss, params)
    return lanczos(
        operator,
        size,
        k,
        which=which,
        tol=tol,
        max_iters=max_iters,
        start=start,
        seed=seed,
        like=_tree.flatten(params),
    )


def _check_k(k, size: int) -> int:
    check_int(k, "k", minimum=1)
    if k > size:
        raise ValueError(
            f"k must be at most the number of parameters ({size}); got k={k}"
        )
    return k


def lanczos(
    operator,
    size: int,
    k: int,
    *,
    which: str = "largest",
    tol: float = 1e-10,
    max_iters: int | None = None,
    start: torch.Tensor | None = None,
    seed: int = 0,
    like: torch.Tensor | None = None,
) -> Eigenpairs:
    """Lanczos with full reorthogonalisation on a symmetric ``operator`` of flat
    vectors of length ``size``; see :func:`top_eigenpairs`. ``like`` gives the dtype
    and device (float64 on the CPU by default)."""
    like = torch.zeros((), dtype=torch.float64) if like is None else like
    max_iters = size if max_iters is None else min(max_iters, size)
    generator = torch.Generator().manual_seed(seed)

    def random_vector() -> torch.Tensor:
        v = torch.randn(size, generator=generator, dtype=like.dtype)
        return v.to(like.device)

    q = random_vector() if start is None else start.detach().reshape(-1).clone()
    if q.numel() != size:
        raise ValueError(f"start must have {size} entries; got {q.numel()}")
    q = q.to(dtype=like.dtype, device=like.device)
    if not torch.isfinite(q).all() or q.norm() == 0:
        raise ValueError("start must be a finite, nonzero vector")
    q = q / q.norm()

    basis = torch.empty((max_iters, size), dtype=like.dtype, device=like.device)
    alphas, betas = [], []
    values = vectors = residuals = None
    block = 0  # where the current Krylov block starts, after a restart
    for m in range(1, max_iters + 1):
        basis[m - 1] = q
        w = operator(q)
        alpha = torch.dot(q, w)
        w = w - alpha * q
        if m > 1:
            w = w - betas[-1] * basis[m - 2]
        for _ in range(2):
            w = w - basis[:m].T @ (basis[:m] @ w)
        beta = w.norm()
        alphas.append(alpha)
        betas.append(beta)

        closed = beta <= 10 * torch.finfo(like.dtype).eps * max(abs(a) for a in alphas)
        if m >= k:
            values, coefficients, residuals = _ritz(alphas, betas, k, which)
            scale = values.abs().max().clamp_min(torch.finfo(like.dtype).tiny)
            # A span that closed holds exact eigenpairs, but not necessarily the
            # wanted ones: it restarts, and the Ritz pairs of the new block must
            # converge too before the wanted ones are taken from all blocks.
            converged = not closed and bool((residuals <= tol * scale).all())
            if converged and block > 0:
                size_now = min(k, m - block)
                _, _, fresh = _ritz(alphas[block:], betas[block:], size_now, which)
                converged = bool((fresh <= tol * scale).all())
            if m == max_iters or converged:
                break
        if closed:
            # An invariant subspace: restart orthogonally to everything so far.
            block = m
            betas[-1] = torch.zeros_like(beta)
            w = random_vector()
            for _ in range(2):
                w = w - basis[:m].T @ (basis[:m] @ w)
            q = w / w.norm()
        else:
            q = w / beta
    vectors = coefficients.T @ basis[: len(alphas)]
    return Eigenpairs(values, vectors, residuals, num_hvps=len(alphas))


def _ritz(alphas, betas, k: int, which: str):
    """The ``k`` wanted Ritz values of the tridiagonal matrix, their coefficients in
    the Lanczos basis (columns) and their residual bounds ``|beta_m s_mi|``."""
    m = len(alphas)
    diagonal = torch.stack(alphas)
    T = torch.diag(diagonal)
    if m > 1:
        off = torch.stack(betas[:-1])
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    values, S = torch.linalg.eigh(T)
    key = values if which == "largest" else values.abs()
    order = torch.argsort(key, descending=True)[:k]
    residuals = (betas[-1] * S[-1, order]).abs()
    return values[order], S[:, order], residuals


def dense_hessian(loss: Loss, params: Tree, *, chunk: int = 512) -> torch.Tensor:
    """The Hessian as a ``(num_params, num_params)`` matrix, in the order of
    ``_tree.flatten(params)``: :func:`eomlib.batched_hvp` on the unit vectors,
    ``chunk`` at a time, then symmetrised. For small models only: it holds
    ``num_params^2`` numbers.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> dense_hessian(lambda x: 0.5 * x @ A @ x, torch.zeros(2, dtype=A.dtype))
        tensor([[2., 1.],
                [1., 3.]], dtype=torch.float64)
    """
    _tree.check_floating(params)
    check_int(chunk, "chunk", minimum=1)
    flat = _tree.flatten(params)
    size = flat.numel()
    rows = []
    for first in range(0, size, chunk):
        count = min(chunk, size - first)
        basis = torch.zeros((count, size), dtype=flat.dtype, device=flat.device)
        basis[torch.arange(count), first + torch.arange(count)] = 1
        products = batched_hvp(loss, params, _tree.unflatten_batch(basis, params))
        rows.append(
            torch.cat(
                [leaf.reshape(count, -1) for leaf in _tree.leaves(products)], dim=1
            )
        )
    H = torch.cat(rows)
    return 0.5 * (H + H.T)


@dataclass
class SharpnessTrack:
    """A GD run with its sharpness.

    Attributes:
        lr: the learning rate.
        iterates: the GD iterates ``0..num_steps`` stacked along a leading axis.
        sharpness: the estimate of ``lambda_max`` at iterates ``0..num_steps - 1``
            (the last iterate takes no step and gets none).
        loss: the loss at the same iterates.
        hvps: the number of Hessian-vector products taken at each step; step 0
            includes the cold start.
    """

    lr: float
    iterates: Tree
    sharpness: torch.Tensor
    loss: torch.Tensor
    hvps: torch.Tensor

    @property
    def hvps_per_step(self) -> float:
        """The mean number of products a step after the cold start."""
        rest = self.hvps[1:]
        return float(rest.double().mean()) if rest.numel() else float("nan")


def track_sharpness(
    loss: Loss,
    params: Tree,
    lr: float,
    num_steps: int,
    *,
    hvps_per_step: int = 3,
    start_hvps: int = 100,
    every: int = 1,
    seed: int = 0,
) -> SharpnessTrack:
    """GD from ``params`` with an estimate of ``lambda_max`` at each step.

    Each step builds the gradient with its graph once: the step ``params - lr g``
    uses that gradient, and ``hvps_per_step`` products at the same point give the
    estimate, the top Ritz value of ``H`` on the span of the previous step's top
    vector ``x``, its Krylov vectors ``H x, ...`` and (the last basis vector) the
    change of the top vector at the previous step, as LOBPCG keeps it. As GD moves
    slowly, the warm start carries the iteration on from step to step; the estimate
    is a Ritz value, so it never exceeds the true ``lambda_max`` and approaches it
    from below when the top eigenvector moves faster than the iteration follows.
    Step 0 starts cold, by Lanczos from a random vector, and takes up to
    ``start_hvps`` products (it stops at a relative residual of ``1e-8``). With
    ``every > 1``, the steps in between take no product and repeat the last
    estimate.

    The budget is a bound: step 0 takes at most ``start_hvps`` products, and every
    later step at most ``hvps_per_step`` (fewer where the span of the warm start
    closes, as it can in few dimensions) or none; ``SharpnessTrack.hvps`` records
    the count.

    Args:
        loss: a function of ``params`` returning a 0-d tensor.
        params: the start.
        lr: GD's learning rate.
        num_steps: how many GD steps.
        hvps_per_step: products per estimate after the first, >= 1 (1 is a
            Rayleigh quotient of the previous vector alone).
        start_hvps: the most products of the cold start, >= 1.
        every: estimate at every ``every``-th step.
        seed: the seed of the cold start's random vector.

    Returns:
        :class:`SharpnessTrack`. Raises :class:`eomlib.DivergenceError` if GD's
        parameters stop being finite.
    """
    lr = check_lr(lr)
    check_int(num_steps, "num_steps", minimum=1)
    check_int(hvps_per_step, "hvps_per_step", minimum=1)
    check_int(start_hvps, "start_hvps", minimum=1)
    check_int(every, "every", minimum=1)
    _tree.check_floating(params)

    tracker = SharpnessTracker(
        loss, hvps_per_step=hvps_per_step, start_hvps=start_hvps, seed=seed
    )
    iterates, sharpness, losses, hvps = [params], [], [], []
    for step in range(num_steps):
        if step % every == 0:
            try:
                g, value, used = tracker.update(params)
            except torch.linalg.LinAlgError as error:  # NOTE: the products overflowed
                last = (
                    f"{lr * sharpness[-1]:.3g} at step {step - 1}"
                    if sharpness
                    else None
                )
                raise DivergenceError(
                    f"GD diverged by step {step} with lr={lr:g}: the Hessian-vector "
                    "products are no longer finite"
                    + (f"; lr * lambda_max was {last}" if last else "")
                    + " (GD is stable only below 2)"
                ) from error
        else:
            g, used = grad(loss, params), 0
        losses.append(loss(params).item())
        sharpness.append(value)
        hvps.append(used)
        params = _tree.axpy(-lr, g, params)
        if not torch.isfinite(_tree.flatten(params)).all():
            raise DivergenceError(
                f"GD diverged at step {step + 1} with lr={lr:g}: lr * lambda_max was "
                f"{lr * sharpness[-1]:.3g} at step {step} (GD is stable only below "
                "2)"
            )
        iterates.append(params)
    stacked = _tree.tree_map(lambda *leaves: torch.stack(leaves), *iterates)
    return SharpnessTrack(
        lr,
        stacked,
        torch.tensor(sharpness, dtype=torch.float64),
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(hvps),
    )


class SharpnessTracker:
    """An estimate of ``lambda_max`` at a sequence of nearby points (the iterates of
    a run), for a fixed number of Hessian-vector products each.

    :meth:`update` builds the gradient's graph at the point once, returns the
    gradient (for the optimizer's step) with the estimate, and takes
    ``hvps_per_step`` products through the same graph: a Rayleigh-Ritz step on the
    previous top vector, its Krylov vectors and its last change (see
    :func:`track_sharpness`). The first call starts cold, by Lanczos, with up to
    ``start_hvps`` products.

    Example:
        >>> A = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
        >>> tracker = SharpnessTracker(lambda x: 0.5 * x @ A @ x)
        >>> _, value, used = tracker.update(torch.ones(3, dtype=torch.float64))
        >>> round(value, 6), used
        (2.0, 3)
    """

    def __init__(
        self,
        loss: Loss,
        *,
        hvps_per_step: int = 3,
        start_hvps: int = 100,
        seed: int = 0,
    ):
        self.loss = loss
        self.hvps_per_step = check_int(hvps_per_step, "hvps_per_step", minimum=1)
        self.start_hvps = check_int(start_hvps, "start_hvps", minimum=1)
        self.seed = seed
        self.vector = self.direction = None

    def update(self, params: Tree) -> tuple[Tree, float, int]:
        """``(g, lambda_max estimate, products taken)`` at ``params``."""
        _tree.check_floating(params)
        g, operator = _gradient_and_operator(self.loss, params)
        if self.vector is None:
            flat = _tree.flatten(params)
            pairs = lanczos(
                operator,
                flat.numel(),
                1,
                tol=1e-8,
                max_iters=min(self.start_hvps, flat.numel()),
                seed=self.seed,
                like=flat,
            )
            self.vector = pairs.vectors[0]
            return g, pairs.values[0].item(), pairs.num_hvps
        self.vector, self.direction, value, used = _warm_step(
            operator, self.vector, self.direction, self.hvps_per_step
        )
        return g, value, used


def _warm_step(operator, vector, direction, budget: int):
    """One warm-started estimate: Rayleigh-Ritz on the span of the previous top
    vector, the Krylov vectors ``H x, H^2 x, ...`` and, as the last of ``budget``
    basis vectors when ``budget >= 3``, the previous step's change of the top vector
    (the memory of LOBPCG, which makes successive steps converge like a
    conjugate-gradient method rather than a restarted power method). Takes one
    product per basis vector, ``budget`` in all unless the span closes early."""
    basis, products = [vector / vector.norm()], []
    while len(products) < budget:
        products.append(operator(basis[-1]))
        if len(products) == budget:
            break
        last = budget > 2 and len(products) == budget - 1 and direction is not None
        candidate = direction if last else products[-1]
        stacked = torch.stack(basis)
        for _ in range(2):
            candidate = candidate - stacked.T @ (stacked @ candidate)
        norm = candidate.norm()
        if norm <= 1e-12 * products[-1].norm():
            break
        basis.append(candidate / norm)
    Q, HQ = torch.stack(basis), torch.stack(products)
    M = Q @ HQ.T
    values, S = torch.linalg.eigh(0.5 * (M + M.T))
    new = S[:, -1] @ Q
    change = new - torch.dot(new, basis[0]) * basis[0]
    norm = change.norm()
    direction = change / norm if norm > 0 else None
    return new, direction, values[-1].item(), len(products)


def _gradient_and_operator(loss: Loss, params: Tree):
    """The gradient at ``params`` and ``v -> H v`` on flat vectors, from one graph
    when torch.autograd applies."""
    fast = for_second_order(loss)
    if not autograd_applies(params):
        return grad(loss, params), flat_hessian_operator(loss, params)
    point = AutogradPoint(fast, params)
    g = point.gradient(create_graph=True)

    def operator(v: torch.Tensor) -> torch.Tensor:
        leaves = _tree.leaves(_tree.unflatten(v, params))
        return _tree.flatten(point.tree(point.pullback(g, leaves, False)))

    return point.tree(g), operator


def sharpness_limits(lr: float) -> dict[str, float]:
    """The two thresholds of ``lambda_max`` at a learning rate: ``1 / lr``, where the
    EoM's counter-term series stops converging, and ``2 / lr``, where GD does."""
    lr = check_lr(lr)
    return {"series": 1.0 / lr, "gd": 2.0 / lr}
