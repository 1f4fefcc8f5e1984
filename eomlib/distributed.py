"""Full-batch losses summed across processes with ``torch.distributed``.

The EoM describes full-batch gradient descent, so each step needs the gradient, and
each counter term nested derivatives, over the whole data set. Here every process
(a *rank*) holds the same parameters and evaluates one contiguous shard of the
data; the loss
of :func:`eomlib.make_loss` with ``distributed=True`` is the mean over all of it, on
every rank. Because the sum across ranks sits *inside* that function, as two
differentiable operations, everything eomlib derives from a loss (``grad``, ``hvp``,
``counter_terms``, ``eom_field``, the trajectories and integrators) is sharded
without a change: each derivative of the loss is the derivative of the full sum.

Each value lives on the ranks in one of two ways: *replicated* (the same on every
rank: parameters, the loss, the gradient) or *partial* (the true value is the sum of
the ranks' pieces: a shard's summed loss). Two operations cross between them, and
each one's derivative is the other:

* :func:`sum_over_ranks` (partial to replicated) all-reduces its input; its
  tangent is the sum of the tangents, and its cotangent passes through unchanged.
* :func:`replicate` (a replicated value read by per-rank code) is the identity;
  its tangent passes through unchanged, and its cotangent, a partial value, is
  summed across ranks.

The loss applies :func:`replicate` to the parameters and :func:`sum_over_ranks`
to the shards' summed losses; a synchronised BatchNorm applies both to its per-channel
sums. Since each backward rule is again one of the two operations, reverse over
reverse, forward over reverse and every deeper nesting, ``torch.func.vmap``
included, stay right. (Autograd's own batched backward, ``is_grads_batched=True``,
cannot run a collective; :func:`eomlib.batched_hvp` takes one vector a pass for
such a loss.) Every rank runs the same program (SPMD), so every rank meets the same
collectives in the same order; the all-reduce hands every rank the same bits, so
the trajectories stay identical across ranks, adaptive integrators included.

Processes start in one of three ways: :func:`launch` spawns them from Python (tests,
a notebook), ``torchrun`` starts a script or ``python -m eomlib.runner``, and the
runner's ``--world-size`` starts ``torchrun`` itself. In each, :func:`init` joins
the process group: gloo on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eomlib import _tree
from eomlib._checks import check_int, check_lr, resolve_device
from eomlib._tree import Tree

# How long a collective waits for the other ranks before it fails. Under gloo a
# rank that stops with an error closes its connections, and the others fail at
# their next collective; this bounds the wait for a rank that hangs. NCCL's
# collectives are asynchronous: its watchdog ends a rank whose collective has
# waited this long.
DEFAULT_TIMEOUT = 600.0

# The environment of a rank, as torchrun sets it.
_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """The ranks of a run cannot start, or one of them stopped; the message says
    which rank and why."""


class CollectiveError(DistributedError):
    """A collective failed on this rank: another rank stopped, or did not come
    within the timeout."""


def init(
    world_size: int | None = None,
    *,
    device="cpu",
    timeout: float = DEFAULT_TIMEOUT,
) -> bool:
    """Join this process to the run's process group; True when it has several ranks.

    ``world_size=1`` outside ``torchrun`` does nothing and returns False, so a
    chapter calls ``init(world_size)`` unconditionally; one rank started as such (by
    ``torchrun`` or :func:`launch`) joins a group of one. Otherwise the process must
    have been started as one of ``world_size`` ranks (by ``torchrun``,
    ``python -m eomlib.runner --world-size``, or :func:`launch`), whose environment
    names its rank and the rendezvous. On CUDA each rank takes the GPU of its
    ``LOCAL_RANK`` and the backend is NCCL; on the CPU it is gloo. Joining a group
    that is already initialised only checks its size.

    Args:
        world_size: the number of ranks; ``None`` takes ``$WORLD_SIZE`` (1 without).
        device: where this run computes, as the chapter's ``device`` parameter.
        timeout: seconds a collective waits for the other ranks before failing.
    """
    environment = os.environ.get("WORLD_SIZE")
    if environment is not None and not environment.isdigit():
        raise DistributedError(
            f"$WORLD_SIZE must be a number of ranks; got {environment!r}"
        )
    if world_size is None:
        world_size = int(environment or 1)
    check_int(world_size, "world_size", minimum=1)
    check_lr(timeout, "timeout")
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise DistributedError(
                f"world_size={world_size}, but this process already belongs to a "
                f"group of {dist.get_world_size()} ranks"
            )
        return world_size > 1
    missing = [name for name in _RANK_VARIABLES if name not in os.environ]
    if world_size == 1 and missing:
        return False
    if not dist.is_available():
        raise DistributedError("this build of torch has no torch.distributed")
    if missing:
        raise DistributedError(
            f"world_size={world_size} needs {world_size} processes started together, "
            f"and this one was started alone (no ${', $'.join(missing)}). Start them "
            f"with `python -m eomlib.runner --world-size {world_size}`, with "
            f"`torchrun --nproc-per-node {world_size}`, or from Python with "
            f"eomlib.distributed.launch(fn, {world_size})"
        )
    if int(environment) != world_size:
        raise DistributedError(
            f"world_size={world_size}, but this process was started as one of "
            f"{environment} ranks ($WORLD_SIZE)"
        )
    device = resolve_device(device)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend,
        store=_store(rank, world_size, timeout),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    return True


def _store(rank: int, world_size: int, timeout: float) -> dist.Store:
    """The rendezvous store of this process group.

    Under torchrun the ranks share its agent's store, which outlives one process
    group: the runner executes several notebooks, each with a group of its own, in
    one torchrun. ``$EOMLIB_RENDEZVOUS``, a name the runner gives each notebook's
    execution, keeps their keys apart. Otherwise rank 0 serves a fresh store at
    ``$MASTER_ADDR:$MASTER_PORT``.
    """
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    wait = datetime.timedelta(seconds=timeout)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        address, port, world_size, is_master=rank == 0 and not agent, timeout=wait
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    name = os.environ.get("EOMLIB_RENDEZVOUS", "run")
    return dist.PrefixStore(f"eomlib/{name}/attempt_{attempt}/", store)


def is_active() -> bool:
    """Whether this process belongs to an initialised group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: 0 outside a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks: 1 outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def shard_bounds(num_samples: int, num_ranks: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` of each rank's shard: contiguous, in rank order, their
    sizes differing by at most one.

    Raises:
        ValueError: a shard would be empty (fewer samples than ranks), which every
            rank finds alike, before anything is computed.
    """
    check_int(num_samples, "num_samples", minimum=0)
    check_int(num_ranks, "world_size", minimum=1)
    if num_samples < num_ranks:
        raise ValueError(
            f"{num_ranks} ranks need at least {num_ranks} examples, one a shard; the "
            f"data set has {num_samples}, so a shard would be empty. Use more "
            f"examples (num_samples) or fewer ranks"
        )
    cuts = [r * num_samples // num_ranks for r in range(num_ranks + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


@contextlib.contextmanager
def _collective(what: str):
    """Run a collective, turning its failure into a :class:`CollectiveError` that
    names this rank."""
    try:
        yield
    except (RuntimeError, ValueError) as error:
        raise CollectiveError(
            f"rank {dist.get_rank()} of {dist.get_world_size()}: the {what} failed, "
            f"most often because another rank stopped (its own error says why) or "
            f"did not come within the timeout: {error}"
        ) from error


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks, in a new tensor."""
    total = tensor.detach().clone(memory_format=torch.contiguous_format)
    with _collective("all-reduce of a sharded loss"):
        dist.all_reduce(total)
    return total


class _SumOverRanks(torch.autograd.Function):
    """Partial to replicated: all-reduce forward and in tangents; the cotangent,
    replicated, passes to every rank's piece unchanged (as :class:`_Replicate`)."""

    @staticmethod
    def forward(x):
        return _all_reduce(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, cotangent):
        return _Replicate.apply(cotangent)

    @staticmethod
    def jvp(ctx, tangent):
        return _SumOverRanks.apply(tangent)

    @staticmethod
    def vmap(info, in_dims, x):
        return _SumOverRanks.apply(x), in_dims[0]


class _Replicate(torch.autograd.Function):
    """A replicated value read by per-rank code: the identity forward and in
    tangents; the cotangent, partial, is summed over the ranks (as
    :class:`_SumOverRanks`)."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, cotangent):
        return _SumOverRanks.apply(cotangent)

    @staticmethod
    def jvp(ctx, tangent):
        return _Replicate.apply(tangent)

    @staticmethod
    def vmap(info, in_dims, x):
        return _Replicate.apply(x), in_dims[0]


# The autograd functions that communicate: the graph of a loss that passes through
# one is evaluated one vector at a time where autograd would batch vectors.
COLLECTIVES = (_SumOverRanks, _Replicate)


def sum_over_ranks(partial: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks of each one's ``partial``, on every rank, as a
    differentiable function: a shard's summed loss becomes the full one."""
    return _SumOverRanks.apply(partial)


def replicate(value: torch.Tensor) -> torch.Tensor:
    """``value``, the same on every rank, marked as read by per-rank code: its
    derivatives come back summed over the ranks."""
    return _Replicate.apply(value)


def replicate_tree(params: Tree) -> Tree:
    """:func:`replicate` of every leaf at once, through one flat vector, so that a
    gradient costs one parameter-sized all-reduce however many tensors the
    parameters are (besides the loss's own, of one number)."""
    leaves = _tree.leaves(params)
    if len(leaves) == 1:
        return _tree.rebuild([replicate(leaves[0])], params)
    flat = replicate(torch.cat([leaf.reshape(-1) for leaf in leaves]))
    pieces = flat.split([leaf.numel() for leaf in leaves])
    return _tree.rebuild(
        [piece.view(leaf.shape) for piece, leaf in zip(pieces, leaves)], params
    )


def all_reduce(partial: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks, read again by per-rank code (a BatchNorm's
    statistics): :func:`sum_over_ranks` then :func:`replicate`."""
    return replicate(sum_over_ranks(partial))


def all_agree(flag: bool) -> bool:
    """Whether ``flag`` is true on every rank (just ``flag`` outside a group): a
    decision that must be the same everywhere, such as a cache hit."""
    if not is_active():
        return bool(flag)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    votes = torch.tensor([float(bool(flag))], device=device)
    with _collective("agreement of the ranks"):
        dist.all_reduce(votes, op=dist.ReduceOp.MIN)
    return bool(votes.item())


def check_replicated(tree: Tree, name: str = "params") -> None:
    """Raise unless every leaf of ``tree`` holds the same bits on every rank.

    Rank 0's copy is broadcast and compared bit for bit (so a NaN equals itself); a
    difference would soon send the ranks down different paths (an adaptive
    integrator's step sizes). The tests check trajectories with it.
    """
    if not is_active():
        return
    for index, leaf in enumerate(_tree.leaves(tree)):
        reference = leaf.detach().clone()
        with _collective(f"comparison of {name} across ranks"):
            dist.broadcast(reference, src=0)
            same = torch.equal(_bits(reference), _bits(leaf.detach()))
            differs = torch.tensor(float(not same), device=leaf.device)
            dist.all_reduce(differs)
        if differs.item():
            raise DistributedError(
                f"{name} differ across ranks (leaf {index}) on "
                f"{int(differs.item())} of {dist.get_world_size()} ranks"
            )


def sharded_derivatives(order: int = 2, **problem) -> dict[str, Tree]:
    """The derivatives of ``make_problem(**problem)`` at its initial parameters, its
    loss sharded over this process group's ranks (whole outside one).

    Returns the loss, the gradient ``g``, ``H g`` and the counter terms
    ``xi_1 ... xi_order``, by name: what the book compares across numbers of ranks,
    through ``launch(partial(sharded_derivatives, order, **problem), n)``.
    """
    from eomlib.counter_terms import counter_terms_and_grad
    from eomlib.derivatives import hvp
    from eomlib.models import make_problem

    made = make_problem(**problem, distributed=is_active())
    g, xis = counter_terms_and_grad(made.loss, made.params, order)
    values = {"loss": made.loss(made.params).detach(), "g": g}
    values["H g"] = hvp(made.loss, made.params, g)
    values |= {f"xi_{k}": xi for k, xi in enumerate(xis, start=1)}
    return values


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


# ---------------------------------------------------------------------------
# Starting the ranks from Python


def launch(
    fn: Callable,
    num_ranks: int,
    *args,
    timeout: float = DEFAULT_TIMEOUT,
    run_timeout: float | None = None,
) -> list:
    """Run ``fn(*args)`` on ``num_ranks`` CPU processes joined by gloo; their
    results, by rank.

    Each process is spawned fresh, joins the group through :func:`init`, and runs
    ``fn``, which must be importable by name (a module-level function or a
    ``functools.partial`` of one); its arguments and result must pickle. When a
    rank raises, the others fail in their next collective (or after ``timeout``
    seconds in it); after a short grace the run is ended, and a
    :class:`DistributedError` raised here names the rank that failed in its own
    right, with its traceback, and the ranks that stopped because of it. A run
    longer than ``run_timeout`` seconds, when given, is ended likewise.

    Example:
        >>> from functools import partial
        >>> launch(partial(pow, 2), 2, 10)  # doctest: +SKIP
        [1024, 1024]
    """
    check_int(num_ranks, "num_ranks", minimum=1)
    check_lr(timeout, "timeout")
    if run_timeout is not None:
        check_lr(run_timeout, "run_timeout")
    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__}")
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="eomlib-launch-") as scratch:
        port = _free_port()
        processes = [
            context.Process(
                target=_rank_main,
                args=(r, fn, args, num_ranks, port, timeout, scratch),
                daemon=True,
            )
            for r in range(num_ranks)
        ]
        for process in processes:
            process.start()
        try:
            _wait(processes, run_timeout)
        finally:
            for process in processes:
                if process.is_alive():
                    process.terminate()
                process.join()
        outcomes = [_outcome(Path(scratch), r, p) for r, p in enumerate(processes)]
    failures = {r: o for r, o in enumerate(outcomes) if isinstance(o, _Failure)}
    if failures:
        raise DistributedError(_failure_report(failures, num_ranks))
    return outcomes


# Seconds the other ranks get to stop by themselves once one has failed.
_GRACE = 10.0


def _wait(processes, run_timeout: float | None) -> None:
    """Until every process has exited, or one failed and the others had their
    grace, or ``run_timeout`` passed."""
    deadline = time.monotonic() + (run_timeout or float("inf"))
    failed_at = None
    while any(p.is_alive() for p in processes):
        now = time.monotonic()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in processes):
            failed_at = now
        if failed_at is not None and now > failed_at + _GRACE:
            return
        if now > deadline:
            running = [r for r, p in enumerate(processes) if p.is_alive()]
            for process in processes:
                process.terminate()
            raise DistributedError(
                f"the run of {len(processes)} ranks did not finish within "
                f"{run_timeout:g} s; ranks {running} were still running"
            )
        time.sleep(0.05)


class _Failure:
    """What a rank raised: its type, message and traceback, as text."""

    def __init__(self, kind: str, message: str, trace: str, collective: bool):
        self.kind, self.message, self.trace = kind, message, trace
        self.collective = collective


def _outcome(scratch: Path, rank: int, process):
    result, error = scratch / f"{rank}.pkl", scratch / f"{rank}.error"
    if error.exists():
        return pickle.loads(error.read_bytes())
    if result.exists() and process.exitcode == 0:
        return pickle.loads(result.read_bytes())
    if process.exitcode is not None and process.exitcode < 0:
        return _Failure(
            "Ended",
            "it was still running after the other ranks had failed, and was ended",
            "",
            collective=True,
        )
    return _Failure(
        "ProcessExit",
        f"the process ended with exit code {process.exitcode} before fn could "
        "run or report (its stderr above says why). A spawned rank imports the "
        "script that started it: a script that calls launch() must do so under "
        "`if __name__ == '__main__':`, and fn must be importable by name",
        "",
        collective=False,
    )


def _failure_report(failures: dict, num_ranks: int) -> str:
    causes = {r: f for r, f in failures.items() if not f.collective} or failures
    lines = []
    for r, failure in causes.items():
        lines.append(
            f"rank {r} of {num_ranks} failed: {failure.kind}: {failure.message}"
        )
        if failure.trace and not failure.collective:
            lines.append(failure.trace.rstrip())
    followers = sorted(set(failures) - set(causes))
    if followers:
        lines.append(f"ranks {followers} then stopped in a collective")
    return "\n".join(lines)


def _rank_main(rank, fn, args, num_ranks, port, timeout, scratch) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(num_ranks),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_ranks))
    try:
        init(num_ranks, timeout=timeout)
        result = fn(*args)
        Path(scratch, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    except BaseException as error:
        failure = _Failure(
            type(error).__name__,
            str(error),
            traceback.format_exc(),
            collective=isinstance(error, CollectiveError),
        )
        Path(scratch, f"{rank}.error").write_bytes(pickle.dumps(failure))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
