"""SGD on shuffled minibatches: the modified loss of the mean iterate over an epoch.

An epoch of ``torch.optim.SGD`` (momentum 0) on ``N`` examples with batch size ``B``
draws a uniformly random permutation of the examples, cuts it into ``m = N / B``
consecutive batches (the distribution of ``DataLoader(shuffle=True)``, though not
its stream of random numbers), and takes one step ``params - lr g_a`` on the mean
loss ``f_a`` of each batch in turn. ``B`` must divide ``N`` here, so every batch has
``B`` examples and the batch losses average to the full-batch loss ``f``; a last
smaller batch, or ``drop_last``, would change ``f`` itself from one epoch to the
next.

Expanded in ``lr``, one epoch in the batch order ``1..m`` moves the params by
``-lr sum_i g_i + lr^2 sum_{j<i} H_i g_j + O(lr^3)``. Averaged over the order,
``E sum_{j<i} H_i g_j = (m^2 H g - sum_i H_i g_i) / 2``, and the flow that meets the
mean iterate after a time ``m lr`` up to ``O(lr^3)`` is ``-grad f_SGD`` with

    f_SGD = f + lr / (4 m) sum_i |g_i|^2
          = f + lr/4 |g|^2 + lr / (4 m) sum_i |g_i - g|^2,

GD's own penalty (its EoM of order 1) plus a penalty on the minibatch noise.
Averaged also over the partition into batches, ``E |g_i - g|^2`` is that of the mean
of ``B`` examples drawn without replacement, and the noise penalty becomes
``lr/4 (N - B) / (B (N - 1)) (1/N) sum_n |grad l_n - g|^2``: scaled by ``lr / B``.
The single shuffles spread around their mean by ``O(lr^2)``, the order of the
penalty's own effect on an epoch, so it shows only in the mean over many shuffles.

The losses here are those of :func:`eomlib.make_loss` on a subset of the data: the
mean cross-entropy of a network without BatchNorm, whose per-example losses are
independent of each other. A BatchNorm network couples the examples of a batch, so
its batch loss is not a mean of per-example losses, and it is refused.
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import func, nn

from eomlib import _tree
from eomlib._checks import check_fraction, check_int, check_lr
from eomlib._tree import Tree
from eomlib.derivatives import Loss, grad
from eomlib.flows import DivergenceError, Field
from eomlib.models import Problem

# Orderings that every_epoch runs at most: N! / (B!)^m grows fast.
MAX_ORDERINGS = 20_000


def check_batch_size(batch_size, num_samples: int) -> int:
    """A batch size from 1 to ``num_samples`` that divides ``num_samples``."""
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    if batch_size > num_samples or num_samples % batch_size:
        divisors = [b for b in range(1, num_samples + 1) if num_samples % b == 0]
        shown = ", ".join(map(str, divisors[:12])) + (
            ", ..." if len(divisors) > 12 else ""
        )
        raise ValueError(
            f"batch_size must divide the number of examples, {num_samples}, so that "
            f"every batch is full; got batch_size={batch_size}; allowed: {shown}"
        )
    return batch_size


def check_problem(problem) -> Problem:
    """A :class:`eomlib.Problem` whose network has no BatchNorm layer."""
    if not isinstance(problem, Problem):
        raise TypeError(
            f"problem must be an eomlib.Problem (eomlib.make_problem); got {problem!r}"
        )
    for module in problem.model.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            raise ValueError(
                f"minibatch SGD here needs a network whose batch loss is the mean of "
                f"per-example losses; {type(module).__name__} couples the examples of "
                "a batch or is random, so use a model without it (e.g. model='mlp')"
            )
    return problem


def _forward(problem: Problem) -> Callable:
    """``(params, X) -> logits`` on a private copy of the network."""
    private = copy.deepcopy(problem.model)
    return lambda params, X: func.functional_call(private, params, (X,))


def batch_loss(problem: Problem) -> Callable[[Tree, torch.Tensor], torch.Tensor]:
    """``(params, indices) -> f_a``: the mean cross-entropy over the examples
    ``indices``, the value of ``eomlib.make_loss`` on that subset of the data."""
    forward = _forward(check_problem(problem))
    X, y = problem.data.X, problem.data.y

    def loss(params: Tree, indices: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(forward(params, X[indices]), y[indices])

    return loss


def shuffled_batches(
    num_samples: int, batch_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """One epoch's batches: a random permutation of ``0..N-1`` cut into consecutive
    runs of ``batch_size``, the batches of ``DataLoader(shuffle=True)`` in
    distribution.

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> [b.tolist() for b in shuffled_batches(6, 2, generator)]
        [[2, 5], [3, 0], [1, 4]]
    """
    batch_size = check_batch_size(batch_size, num_samples)
    return list(torch.randperm(num_samples, generator=generator).split(batch_size))


def all_orderings(num_samples: int, batch_size: int) -> Iterator[tuple[tuple, ...]]:
    """Every epoch as a sequence of batches (each a sorted tuple of examples), once.

    A uniformly random permutation of the examples gives each of these
    ``N! / (B!)^m`` sequences with the same probability, so their plain mean is the
    exact expectation over shuffles.

    Example:
        >>> len(list(all_orderings(4, 2)))  # 4! / (2! 2!)
        6
    """
    batch_size = check_batch_size(batch_size, num_samples)

    def extend(left: tuple) -> Iterator[tuple]:
        if not left:
            yield ()
            return
        for batch in itertools.combinations(left, batch_size):
            rest = tuple(n for n in left if n not in batch)
            for tail in extend(rest):
                yield (batch, *tail)

    return extend(tuple(range(num_samples)))


def count_orderings(num_samples: int, batch_size: int) -> int:
    """``N! / (B!)^(N/B)``: how many sequences :func:`all_orderings` yields."""
    batch_size = check_batch_size(batch_size, num_samples)
    return math.factorial(num_samples) // math.factorial(batch_size) ** (
        num_samples // batch_size
    )


def sgd_epochs(
    problem: Problem,
    lr: float,
    batch_size: int,
    *,
    num_epochs: int = 1,
    generator: torch.Generator | None = None,
    batches: Iterable[Iterable[Iterable[int]]] | None = None,
    params: Tree | None = None,
) -> Tree:
    """Run ``torch.optim.SGD(lr=lr)`` (momentum 0) on shuffled minibatches.

    Args:
        problem: the network and data (no BatchNorm; see :func:`check_problem`).
        lr: the learning rate.
        batch_size: examples per batch; it must divide the number of examples.
        num_epochs: how many epochs, each with a fresh shuffle.
        generator: the source of the shuffles (:func:`shuffled_batches`); a given
            seed gives the same iterates bit for bit.
        batches: instead of shuffling, the batches of each epoch given explicitly,
            one sequence of index lists per epoch (``num_epochs`` is then their
            number).
        params: the start; ``problem.params`` by default. Never changed.

    Returns:
        The params at the start and after each epoch, stacked along a new leading
        axis. Raises :class:`eomlib.DivergenceError` at a non-finite iterate.
    """
    check_problem(problem)
    lr = check_lr(lr)
    num_samples = len(problem.data)
    batch_size = check_batch_size(batch_size, num_samples)
    params = problem.params if params is None else params
    _tree.check_floating(params)
    device = problem.data.X.device
    if batches is None:
        check_int(num_epochs, "num_epochs", minimum=1)
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator; got generator={generator!r}"
            )
        epochs = (
            shuffled_batches(num_samples, batch_size, generator)
            for _ in range(num_epochs)
        )
    else:
        epochs = [[_indices(b) for b in epoch] for epoch in batches]
        for epoch in epochs:
            _check_epoch(epoch, num_samples, batch_size)

    return _run_sgd(batch_loss(problem), params, lr, batch_size, epochs, device)


def _run_sgd(loss, params: Tree, lr: float, batch_size: int, epochs, device) -> Tree:
    """The epochs of ``torch.optim.SGD`` on ``loss(params, indices)``."""
    leaves = [leaf.detach().clone().requires_grad_() for leaf in _tree.leaves(params)]
    engine = torch.optim.SGD(leaves, lr=lr, momentum=0.0)
    ends = [params]
    for epoch in epochs:
        for indices in epoch:
            with torch.enable_grad():
                value = loss(_tree.rebuild(leaves, params), indices.to(device))
            for leaf, g in zip(leaves, torch.autograd.grad(value, leaves)):
                leaf.grad = g
            engine.step()
        end = _tree.rebuild([leaf.detach().clone() for leaf in leaves], params)
        if not torch.isfinite(_tree.flatten(end)).all():
            raise DivergenceError(
                f"SGD diverged in epoch {len(ends)} with lr={lr:g}, "
                f"batch_size={batch_size}: the params are no longer finite; use a "
                "smaller learning rate"
            )
        ends.append(end)
    return _tree.tree_map(lambda *x: torch.stack(x), *ends)


def _indices(batch) -> torch.Tensor:
    """One batch of example indices, integers only (a float is refused, not
    truncated)."""
    values = list(batch)
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
        if not all(
            isinstance(v, torch.Tensor) and not v.is_floating_point() for v in values
        ):
            raise TypeError(f"batch indices must be integers; got {values!r}")
    return torch.as_tensor(values, dtype=torch.long)


def _check_epoch(epoch: list[torch.Tensor], num_samples: int, batch_size: int):
    seen = torch.cat(epoch).sort().values if epoch else torch.empty(0)
    sizes = {len(b) for b in epoch}
    if sizes != {batch_size} or not torch.equal(seen, torch.arange(num_samples)):
        raise ValueError(
            f"each epoch in batches must split the {num_samples} examples into "
            f"batches of batch_size={batch_size}, each example once; got batch sizes "
            f"{sorted(sizes)} covering {seen.unique().numel()} distinct examples"
        )


def every_epoch(
    problem: Problem,
    lr: float,
    batch_size: int,
    *,
    params: Tree | None = None,
    partition=None,
) -> Tree:
    """The params after one epoch of :func:`sgd_epochs` in every ordering of
    :func:`all_orderings`, stacked along a leading axis (in that order); with
    ``partition``, in every order of its fixed batches instead. Only for tiny data:
    at most ``MAX_ORDERINGS`` orderings."""
    num_samples = len(check_problem(problem).data)
    lr = check_lr(lr)
    if partition is None:
        count = count_orderings(num_samples, batch_size)
        orderings = all_orderings(num_samples, batch_size)
    else:
        batches = _check_partition(partition, num_samples, batch_size)
        count = math.factorial(len(batches))
        orderings = itertools.permutations(batches)
    if count > MAX_ORDERINGS:
        raise ValueError(
            f"{num_samples} examples in batches of {batch_size} have {count} "
            f"orderings, more than MAX_ORDERINGS={MAX_ORDERINGS}; use fewer examples "
            "or mean_over_shuffles"
        )
    params = problem.params if params is None else params
    _tree.check_floating(params)
    loss, device = batch_loss(problem), problem.data.X.device
    ends = []
    for ordering in orderings:
        epoch = [torch.as_tensor(batch, dtype=torch.long) for batch in ordering]
        end = _run_sgd(loss, params, lr, batch_size, [epoch], device)
        ends.append(_tree.tree_map(lambda x: x[-1], end))
    return _tree.tree_map(lambda *x: torch.stack(x), *ends)


def exact_mean_epoch(
    problem: Problem,
    lr: float,
    batch_size: int,
    *,
    params: Tree | None = None,
    partition=None,
) -> Tree:
    """The exact expected params after one shuffled epoch: the mean of
    :func:`every_epoch` (over the orders of ``partition`` when it is given)."""
    ends = every_epoch(problem, lr, batch_size, params=params, partition=partition)
    return _tree.tree_map(lambda x: x.mean(0), ends)


def noise_factor(num_samples: int, batch_size: int) -> float:
    """``(N - B) / (B (N - 1))``: the variance of a mean of ``B`` examples drawn
    without replacement, per unit of the per-example variance.

    Example:
        >>> noise_factor(8, 2), noise_factor(8, 8)
        (0.42857142857142855, 0.0)
    """
    batch_size = check_batch_size(batch_size, num_samples)
    if num_samples == 1:
        return 0.0
    return (num_samples - batch_size) / (batch_size * (num_samples - 1))


def _check_partition(partition, num_samples: int, batch_size: int):
    batches = [torch.as_tensor(list(b), dtype=torch.long) for b in partition]
    _check_epoch(batches, num_samples, batch_size)
    return batches


def gradient_gram(problem: Problem) -> Callable[[Tree], tuple]:
    """``params -> (f, K)``: the full-batch loss and the Gram matrix
    ``K[n, n'] = <grad l_n, grad l_n'>`` of the per-example gradients, both
    differentiable once more in ``params`` by ``torch.autograd``.

    For an ``nn.Sequential`` whose layers with parameters are all ``nn.Linear``
    (the ``mlp`` models), ``grad_W l_n = delta_n a_n^T`` with ``a_n`` the layer's
    input and ``delta_n`` the gradient of ``l_n`` in its output, so
    ``K = sum_layers (Delta Delta^T) * (A A^T + 1)`` (the ``+ 1`` for the bias) from
    one backward pass. Any other network gets its per-example gradients from a
    ``vmap`` over the examples, which is slower.
    """
    check_problem(problem)
    private = copy.deepcopy(problem.model)
    X, y = problem.data.X, problem.data.y
    linear = type(private) is nn.Sequential and all(
        isinstance(layer, nn.Linear) or not any(True for _ in layer.parameters())
        for layer in private
    )
    return partial(_gram_linear if linear else _gram_vmap, private, X, y)


def _gram_linear(private: nn.Sequential, X, y, params: Tree):
    x, taps = X, []
    with torch.enable_grad():
        for name, layer in private.named_children():
            if isinstance(layer, nn.Linear):
                bias = params.get(f"{name}.bias")
                z = nn.functional.linear(x, params[f"{name}.weight"], bias)
                if not z.requires_grad:
                    z.requires_grad_()
                taps.append((x, z, bias is not None))
                x = z
            else:
                x = layer(x)
        losses = nn.functional.cross_entropy(x, y, reduction="none")
        deltas = torch.autograd.grad(
            losses.sum(), [z for _, z, _ in taps], create_graph=True
        )
        gram = sum(
            (delta @ delta.T) * (a @ a.T + (1.0 if bias else 0.0))
            for (a, _, bias), delta in zip(taps, deltas)
        )
    return losses.mean(), gram


def _gram_vmap(private: nn.Module, X, y, params: Tree):
    def one(wide, x, target):
        logits = func.functional_call(private, wide, (x[None],))
        return nn.functional.cross_entropy(logits, target[None])

    num_samples = X.shape[0]
    with torch.enable_grad():
        leaves = {
            name: leaf if leaf.requires_grad else leaf.detach().requires_grad_()
            for name, leaf in params.items()
        }
        wide = {n: v.expand(num_samples, *v.shape) for n, v in leaves.items()}
        losses = func.vmap(one)(wide, X, y)
        rows = torch.autograd.grad(losses.sum(), list(wide.values()), create_graph=True)
        rows = torch.cat([r.flatten(1) for r in rows], dim=1)
    return losses.mean(), rows @ rows.T


def _penalty_parts(
    problem: Problem, batch_size: int, partition
) -> Callable[[Tree], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``params -> (f, |g|^2, noise)`` with ``noise`` the mean over the batches of
    ``|g_a - g|^2``: averaged over random partitions without ``partition``, over
    its batches with it; all from :func:`gradient_gram`."""
    num_samples = len(check_problem(problem).data)
    batch_size = check_batch_size(batch_size, num_samples)
    gram = gradient_gram(problem)
    factor = noise_factor(num_samples, batch_size)
    if partition is not None:
        batches = _check_partition(partition, num_samples, batch_size)
        members = torch.zeros(len(batches), num_samples, dtype=problem.data.X.dtype)
        for a, batch in enumerate(batches):
            members[a, batch] = 1.0 / batch_size
        members = members.to(problem.data.X.device)

    def parts(params: Tree):
        loss, K = gram(params)
        g_norm = K.sum() / num_samples**2
        if partition is None:
            noise = factor * (K.diagonal().mean() - g_norm)
        else:
            noise = (members @ K @ members.T).diagonal().mean() - g_norm
        return loss, g_norm, noise

    return parts


def modified_loss(
    problem: Problem, lr: float, batch_size: int, *, partition=None
) -> Loss:
    """``f_SGD = f + lr/4 |g|^2 + lr/4 noise``, the loss whose gradient flow the mean
    epoch of shuffled SGD follows up to ``O(lr^3)`` per epoch.

    ``noise`` is ``(1/m) sum_a |g_a - g|^2``: with ``partition=None`` averaged over
    the random partitions of a uniform shuffle, which gives
    ``(N - B) / (B (N - 1)) (1/N) sum_n |grad l_n - g|^2``; with ``partition`` (a
    list of ``m`` index lists) that of its batches, the loss whose flow the mean
    over the orders of those fixed batches follows. It is differentiated by
    ``torch.autograd`` (``eomlib.grad``), not inside ``torch.func`` transforms.
    """
    lr = check_lr(lr)
    parts = _penalty_parts(problem, batch_size, partition)

    def loss(params: Tree) -> torch.Tensor:
        value, g_norm, noise = parts(params)
        return value + lr / 4 * (g_norm + noise)

    return loss


def penalties(
    problem: Problem, params: Tree, lr: float, batch_size: int, *, partition=None
) -> dict[str, float]:
    """The two implicit penalties of :func:`modified_loss` at ``params``:
    ``"gd"`` is ``lr/4 |g|^2`` (GD's own), ``"noise"`` is ``lr/4 noise``."""
    lr = check_lr(lr)
    _, g_norm, noise = _penalty_parts(problem, batch_size, partition)(params)
    return {"gd": lr / 4 * g_norm.item(), "noise": lr / 4 * noise.item()}


MINIBATCH_ORDERS = (0, 1)


def minibatch_field(
    problem: Problem, lr: float, batch_size: int, *, order: int = 1, partition=None
) -> Field:
    """The modified field of shuffled SGD: ``-grad f_SGD`` (:func:`modified_loss`)
    at ``order=1``, gradient flow ``-g`` at ``order=0``.

    Its flow over a time ``m lr`` (``m = N / B`` steps) meets the mean iterate of
    one epoch up to ``O(lr^3)``; GF's and GD's EoM's miss it at ``O(lr^2)``. With
    ``batch_size = N`` the noise vanishes and the field is GD's EoM of order 1.

    Example:
        >>> import eomlib
        >>> problem = eomlib.make_problem("mlp", num_samples=4, hidden=(2,))
        >>> field = minibatch_field(problem, 0.1, batch_size=4)
        >>> eom = eomlib.eom_field(problem.loss, 0.1, 1)(problem.params)
        >>> mine = field(problem.params)
        >>> all(torch.allclose(mine[n], eom[n]) for n in mine)
        True
    """
    lr = check_lr(lr)
    check_problem(problem)
    check_batch_size(batch_size, len(problem.data))
    if isinstance(order, bool) or order not in MINIBATCH_ORDERS:
        raise ValueError(
            f"order must be one of {MINIBATCH_ORDERS} for shuffled SGD (0 is GF, 1 the "
            f"modified loss); got order={order!r}"
        )
    if partition is not None:
        _check_partition(partition, len(problem.data), batch_size)
    loss = (
        problem.loss
        if order == 0
        else modified_loss(problem, lr, batch_size, partition=partition)
    )
    return lambda params: _tree.scale(-1.0, grad(loss, params))


def shuffled_sgd_field(
    problem: Problem,
    *,
    order: int = 1,
    lr: float,
    batch_size: int,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    partition=None,
) -> Field:
    """:func:`minibatch_field` with ``torch.optim.SGD``'s keywords, for a registry
    of fields keyed by optimizer class; only plain SGD (momentum 0, no weight
    decay) has a derived minibatch field here. Without momentum torch ignores
    ``dampening``, and so does this field."""
    if momentum or nesterov or weight_decay:
        raise ValueError(
            "the shuffled-minibatch field is derived for torch.optim.SGD with "
            f"momentum=0, nesterov=False and weight_decay=0 only; got "
            f"momentum={momentum!r}, nesterov={nesterov!r}, "
            f"weight_decay={weight_decay!r}"
        )
    check_fraction(dampening, "dampening")
    return minibatch_field(problem, lr, batch_size, order=order, partition=partition)


def check_confidence(confidence) -> float:
    """A confidence level strictly between 0 and 1."""
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real):
        raise TypeError(f"confidence must be a number in (0, 1); got {confidence!r}")
    if not 0 < confidence < 1:
        raise ValueError(
            f"confidence must be in (0, 1), e.g. 0.95; got confidence={confidence!r}"
        )
    return float(confidence)


@dataclass
class ShuffleMean:
    """The mean of a quantity over independent samples, with a normal-theory
    confidence interval ``mean +- half_width``.

    Attributes:
        mean: the sample mean (the quantity's shape).
        stderr: the sample standard deviation (``n - 1``) over ``sqrt(n)``; ``inf``
            for a single sample, whose spread is unknown.
        half_width: ``z stderr`` with ``z`` the normal quantile of the confidence.
        confidence: the nominal coverage.
        samples: the samples, stacked along a leading axis.
    """

    mean: torch.Tensor
    stderr: torch.Tensor
    half_width: torch.Tensor
    confidence: float
    samples: torch.Tensor

    @property
    def low(self) -> torch.Tensor:
        return self.mean - self.half_width

    @property
    def high(self) -> torch.Tensor:
        return self.mean + self.half_width

    def covers(self, value) -> torch.Tensor:
        """Whether ``value`` lies inside the interval (elementwise)."""
        value = torch.as_tensor(value, dtype=self.mean.dtype, device=self.mean.device)
        return (value - self.mean).abs() <= self.half_width


def confidence_interval(samples, confidence: float = 0.95) -> ShuffleMean:
    """The mean of ``samples`` (leading axis) with the interval ``mean +- z s /
    sqrt(n)``, ``s`` the sample standard deviation and ``z`` the two-sided normal
    quantile of ``confidence``.

    Example:
        >>> ci = confidence_interval(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        >>> round(ci.mean.item(), 3), round(ci.half_width.item(), 3)
        (2.5, 1.265)
    """
    confidence = check_confidence(confidence)
    samples = torch.as_tensor(samples)
    if samples.dim() == 0 or samples.shape[0] < 1:
        raise ValueError(
            "samples must have a leading axis with at least one sample; got shape "
            f"{tuple(samples.shape)}"
        )
    if not samples.is_floating_point():
        samples = samples.double()
    n = samples.shape[0]
    mean = samples.mean(0)
    if n == 1:
        stderr = torch.full_like(mean, math.inf)
    else:
        stderr = samples.std(0, correction=1) / math.sqrt(n)
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    return ShuffleMean(mean, stderr, z * stderr, confidence, samples)


def mean_over_shuffles(
    quantity: Callable[[Tree], torch.Tensor],
    problem: Problem,
    lr: float,
    batch_size: int,
    *,
    num_shuffles: int,
    num_epochs: int = 1,
    seed: int = 0,
    params: Tree | None = None,
    confidence: float = 0.95,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> ShuffleMean:
    """The mean of ``quantity(iterates)`` over ``num_shuffles`` independent runs of
    :func:`sgd_epochs`, with its confidence interval (:func:`confidence_interval`).

    ``iterates`` are one run's params at the start and after each epoch, stacked
    along a leading axis; ``quantity`` returns a tensor of any fixed shape. All runs
    draw their shuffles in turn from one ``torch.Generator`` seeded with ``seed``,
    so a seed gives the same samples bit for bit. ``progress`` may wrap the loop
    over runs (``tqdm``, say).
    """
    check_problem(problem)
    lr = check_lr(lr)
    check_batch_size(batch_size, len(problem.data))
    num_shuffles = check_int(num_shuffles, "num_shuffles", minimum=1)
    check_int(num_epochs, "num_epochs", minimum=1)
    check_int(seed, "seed")
    confidence = check_confidence(confidence)
    if not callable(quantity):
        raise TypeError(
            f"quantity must be a function of the iterates; got {quantity!r}"
        )

    params = problem.params if params is None else params
    _tree.check_floating(params)
    num_samples, device = len(problem.data), problem.data.X.device
    generator = torch.Generator().manual_seed(seed)
    loss = batch_loss(problem)
    loop = range(num_shuffles) if progress is None else progress(range(num_shuffles))
    samples = []
    for _ in loop:
        epochs = (
            shuffled_batches(num_samples, batch_size, generator)
            for _ in range(num_epochs)
        )
        iterates = _run_sgd(loss, params, lr, batch_size, epochs, device)
        with torch.no_grad():
            samples.append(torch.as_tensor(quantity(iterates)).detach())
    return confidence_interval(torch.stack(samples), confidence)
