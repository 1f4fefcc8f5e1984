"""A full-batch loss sharded over 2 and 3 gloo processes gives one process's numbers.

Each world size is launched once (spawning ranks costs seconds) and computes every
quantity at once: the loss, the gradient, ``hvp`` in both modes, ``batched_hvp``,
the counter terms to order 3 in reverse mode and to order 2 in forward mode, the
EoM field, a GD trajectory and an adaptive EoM integration, on an MLP and on a CNN
with BatchNorm. Digits with 61 examples split unevenly over 2 and 3 ranks.
Agreement is to the round-off of summing in another order (float64).
"""

import functools
import time

import pytest
import torch

import eomlib
from eomlib import distributed

NUM_SAMPLES = 61
NETWORKS = {"mlp": {"hidden": (6,)}, "bn_cnn": {"channels": 2}}
# Relative to each quantity's largest entry: a few hundred ulps of float64, the
# spread of one sum taken in two orders after the values have passed a few
# nonlinear layers and up to four derivatives.
RTOL = 1e-13
# The adaptive EoM integration and GD run over many steps; round-off grows along.
RTOL_TRAJECTORY = 1e-11


def _vector(params, seed):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=generator, dtype=p.dtype)
        for name, p in params.items()
    }


def quantities(model: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every sharded quantity, flattened, for one network; on as many ranks as the
    process group has (one outside one)."""
    problem = eomlib.make_problem(
        model,
        num_samples=NUM_SAMPLES,
        seed=seed,
        distributed=distributed.is_active(),
        **NETWORKS[model],
    )
    loss, params = problem.loss, problem.params
    v, w = _vector(params, 1), _vector(params, 2)
    both = {name: torch.stack([v[name], w[name]]) for name in v}
    lr = 0.1
    values = {
        "loss": loss(params),
        "grad": eomlib.grad(loss, params),
        "hvp reverse": eomlib.hvp(loss, params, v, method="reverse"),
        "hvp forward": eomlib.hvp(loss, params, v, method="forward"),
        "batched hvp": eomlib.batched_hvp(loss, params, both),
        # a wrapper hides nothing: the collectives are found in the graph
        "batched hvp, wrapped loss": eomlib.batched_hvp(
            lambda p: 1.0 * loss(p), params, both
        ),
        "third derivative": eomlib.grad_derivative(loss, params, [v, w]),
        "counter terms 1-3": eomlib.counter_terms(loss, params, 3),
        "counter terms forward": eomlib.counter_terms(
            loss, params, 2, method="forward"
        ),
        "eom field": eomlib.eom_field(loss, lr, 2)(params),
        "gd trajectory": eomlib.gd_trajectory(loss, params, lr, 30),
        "eom trajectory": eomlib.eom_trajectory(
            loss, params, lr, 5, 1, rtol=1e-9, atol=1e-11
        ),
    }
    return {name: _flat(value) for name, value in values.items()}


def _flat(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(-1)
    if isinstance(value, dict):
        return torch.cat([_flat(leaf) for leaf in value.values()])
    return torch.cat([_flat(leaf) for leaf in value])


def all_networks(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    return {model: quantities(model, seed) for model in NETWORKS}


@functools.cache
def sharded(num_ranks: int, seed: int = 0) -> list:
    return distributed.launch(all_networks, num_ranks, seed, run_timeout=600)


@functools.cache
def single(seed: int = 0) -> dict:
    return all_networks(seed)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("num_ranks", [2, 3])
@pytest.mark.parametrize("model", sorted(NETWORKS))
def test_sharded_quantities_match_one_process(num_ranks, model):
    reference, ranks = single()[model], sharded(num_ranks)
    for name, expected in reference.items():
        tolerance = RTOL_TRAJECTORY if "trajectory" in name else RTOL
        error = relative_error(ranks[0][model][name], expected)
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_every_rank_holds_the_same_bits(num_ranks):
    ranks = sharded(num_ranks)
    for model in NETWORKS:
        for name, value in ranks[0][model].items():
            for r in range(1, num_ranks):
                assert torch.equal(ranks[r][model][name], value), (model, name, r)


def gd_run(seed: int) -> torch.Tensor:
    """The loss along GD from the network of ``seed``."""
    problem = eomlib.make_problem(
        "mlp", num_samples=NUM_SAMPLES, seed=seed, distributed=distributed.is_active()
    )
    trajectory = eomlib.gd_trajectory(problem.loss, problem.params, 0.2, 20)
    return torch.stack(
        [problem.loss({k: v[i] for k, v in trajectory.items()}) for i in range(21)]
    )


def test_a_seed_gives_the_same_result_for_any_world_size():
    seed = 7
    alone = gd_run(seed)
    for num_ranks in (2, 3):
        assert (
            relative_error(distributed.launch(gd_run, num_ranks, seed)[0], alone)
            <= RTOL
        )
    # and the seed is what decides: another one starts elsewhere
    assert relative_error(gd_run(seed + 1), alone) > 1e-3


def agreement() -> dict:
    """What the ranks agree on, whether replicated checks pass, and what a sharded
    loss refuses, on each rank."""
    rank = distributed.rank()
    same, own = torch.arange(5.0), torch.arange(5.0) + rank
    results = {
        "all true": distributed.all_agree(True),
        "only rank 0": distributed.all_agree(rank == 0),
    }
    distributed.check_replicated({"x": same, "nan": torch.tensor([float("nan")])})
    try:
        distributed.check_replicated({"x": same, "y": own}, "iterates")
    except distributed.DistributedError as error:
        results["differing"] = str(error)
    data = eomlib.load_dataset(num_samples=12)
    try:
        eomlib.make_loss(torch.nn.BatchNorm1d(64), data, distributed=True)
    except ValueError as error:
        results["bare batch norm"] = str(error)
    return results


def test_ranks_agree_on_decisions_and_detect_differing_values():
    for result in distributed.launch(agreement, 3, run_timeout=300):
        assert result["all true"] and not result["only rank 0"]
        differing = "iterates differ across ranks (leaf 1) on 2 of 3 ranks"
        assert differing in result["differing"]
        assert "BatchNorm that is the whole model" in result["bare batch norm"]


def empty_shard() -> str:
    try:
        eomlib.make_problem("mlp", num_samples=2, hidden=(4,), distributed=True)
    except ValueError as error:
        return str(error)
    return "no error"


def test_an_empty_shard_is_refused_on_every_rank_before_computing():
    messages = distributed.launch(empty_shard, 3, run_timeout=300)
    assert len(messages) == 3
    for message in messages:
        assert "shard would be empty" in message and "3 ranks" in message


def rank_one_breaks() -> None:
    problem = eomlib.make_problem("mlp", num_samples=40, hidden=(4,), distributed=True)
    problem.loss(problem.params)
    if distributed.rank() == 1:
        raise RuntimeError("rank one broke")
    for _ in range(3):
        eomlib.grad(problem.loss, problem.params)


def test_a_failing_rank_is_named_and_the_others_stop():
    start = time.monotonic()
    with pytest.raises(distributed.DistributedError) as raised:
        distributed.launch(rank_one_breaks, 3, run_timeout=300)
    message = str(raised.value)
    assert "rank 1 of 3 failed: RuntimeError: rank one broke" in message
    assert "raise RuntimeError" in message  # its traceback
    assert "ranks [0, 2] then stopped in a collective" in message
    assert time.monotonic() - start < 120


def rank_one_is_late() -> None:
    problem = eomlib.make_problem("mlp", num_samples=40, hidden=(4,), distributed=True)
    if distributed.rank() == 1:
        time.sleep(120)
    eomlib.grad(problem.loss, problem.params)


def test_a_rank_that_hangs_is_bounded_by_the_timeout(monkeypatch):
    monkeypatch.setattr(distributed, "_GRACE", 1.0)
    start = time.monotonic()
    with pytest.raises(distributed.DistributedError) as raised:
        distributed.launch(rank_one_is_late, 2, timeout=3.0, run_timeout=300)
    message = str(raised.value)
    assert "rank 0 of 2 failed: CollectiveError" in message
    assert "Timed out" in message
    assert "rank 1 of 2 failed: Ended" in message
    assert time.monotonic() - start < 60


def test_launch_runs_a_run_timeout():
    with pytest.raises(distributed.DistributedError, match="did not finish within"):
        distributed.launch(time.sleep, 2, 60, run_timeout=1.0)


def test_one_process_needs_no_process_group():
    assert distributed.init(1) is False
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert not distributed.is_active()


def test_several_ranks_need_processes_started_together(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(distributed.DistributedError, match="--world-size 4"):
        distributed.init(4)
    with pytest.raises(ValueError, match="world_size"):
        distributed.init(0)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(distributed.DistributedError, match="WORLD_SIZE must be"):
        distributed.init()


def test_a_sharded_loss_needs_a_process_group():
    with pytest.raises(distributed.DistributedError, match="distributed.init"):
        eomlib.make_problem("mlp", num_samples=10, hidden=(3,), distributed=True)


@pytest.mark.parametrize(
    "num_samples, num_ranks", [(61, 2), (61, 3), (7, 7), (1797, 4)]
)
def test_shards_cover_the_data_once_and_evenly(num_samples, num_ranks):
    bounds = distributed.shard_bounds(num_samples, num_ranks)
    assert bounds[0][0] == 0 and bounds[-1][1] == num_samples
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
