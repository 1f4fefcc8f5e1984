"""Time one gradient and one HVP of a full-batch loss sharded over W CPU processes.

    python benchmarks/distributed.py                          # W = 1, 2, 3, 4
    python benchmarks/distributed.py --world-sizes 1 2 --repetitions 10
    python benchmarks/distributed.py --cases mlp-float64

For each world size W, ``eomlib.distributed.launch`` spawns W processes joined by
gloo; each builds the case's problem on all 1,797 digits with ``distributed=True``
(its own contiguous shard) and runs the same fixed number of repetitions of
``eomlib.grad`` and ``eomlib.hvp``, each after a ``torch.distributed.barrier()``, so
every rank meets the same collectives. Rank 0's median wall time is the result.
Beside them: the all-reduce of one parameter-sized vector alone (the communication
of a gradient), the all-reduces each operation makes (counted in an untimed pass),
and, in the one-rank run, the plain unsharded loss (``distributed=False``). Each
rank gets ``os.cpu_count() // W`` threads (at least one), as ``launch`` sets them,
so world sizes above the number of cores oversubscribe the machine. The machine
may be shared: a launch during which other programs kept more than ``--max-load``
cores busy is run again (``--tries`` launches at most, the quietest kept), and the
JSON records the load of each.

Prints each row as it is measured, then the speed-ups and the overhead of
sharding, and writes ``distributed-<device>-<date>.json`` into ``--out`` (default
``results/cpu``), where the book's performance appendix finds it. GPU scaling
needs NCCL ranks started by ``torchrun``; this script runs gloo on the CPU only.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

import eomlib
from eomlib import benchmark, distributed

DEFAULT_CASES = ("mlp-float32", "mlp-float64", "bn_cnn-float32")
# Seconds a collective waits for the other ranks, and a whole launch may take.
COLLECTIVE_TIMEOUT = 120.0
RUN_TIMEOUT = 900.0


def _time_ms(row: dict, key: str, fn, repetitions: int, warmup: int) -> None:
    """Time ``repetitions`` calls of ``fn``, each after a barrier, into ``row``: the
    median in ms as ``key``, the quartiles as ``key + "_quartiles"``. Every rank
    calls ``fn`` the same number of times, so their collectives pair up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repetitions):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    low, row[key], high = benchmark._quartiles(times)
    row[f"{key}_quartiles"] = [low, high]


def _all_reduces(fn) -> list[int]:
    """The sizes, in elements, of the all-reduces one call of ``fn`` makes."""
    sizes = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    with mock.patch.object(dist, "all_reduce", counting):
        fn()
    return sizes


def _progress(message: str) -> None:
    if distributed.rank() == 0:
        print(message, file=sys.stderr, flush=True)


def measure_world(
    world_size: int, cases: list[str], repetitions: int, warmup: int
) -> dict:
    """Run on each of ``world_size`` ranks: every case's timings, by case; the
    one-rank run adds the unsharded loss's."""
    results = {}
    for case in cases:
        results[case] = _measure_case(case, world_size, repetitions, warmup)
        if world_size == 1:
            results[case]["baseline"] = _baseline(case, repetitions, warmup)
    return results


def _problem(case: str, sharded: bool):
    options = dict(benchmark.CASES[case])
    model, dtype = options.pop("model"), options.pop("dtype")
    return eomlib.make_problem(model, dtype=dtype, distributed=sharded, **options)


def _operations(problem) -> dict:
    """The timed calls, by name: one gradient and one HVP (reverse over reverse,
    eomlib's default) along a fixed random vector, the same on every rank."""
    loss, params = problem.loss, problem.params
    generator = torch.Generator().manual_seed(0)
    v = {
        name: torch.randn(p.shape, generator=generator, dtype=p.dtype)
        for name, p in params.items()
    }
    return {
        "grad": lambda: eomlib.grad(loss, params),
        "hvp": lambda: eomlib.hvp(loss, params, v),
    }


def _measure_case(case: str, world_size: int, repetitions: int, warmup: int) -> dict:
    problem = _problem(case, sharded=True)
    start, stop = distributed.shard_bounds(len(problem.data), world_size)[
        distributed.rank()
    ]
    row = dict(
        world_size=world_size,
        threads_per_rank=torch.get_num_threads(),
        shard_size=stop - start,
    )
    for name, fn in _operations(problem).items():
        row[f"{name}_all_reduces"] = _all_reduces(fn)
        _time_ms(row, f"{name}_ms", fn, repetitions, warmup)
        _progress(f"{case}, {world_size} ranks: {name} {row[f'{name}_ms']:.3g} ms")
    dtype = next(iter(problem.params.values())).dtype
    flat = torch.zeros(problem.num_params, dtype=dtype)
    scalar = torch.zeros((), dtype=dtype)
    _time_ms(row, "all_reduce_ms", lambda: dist.all_reduce(flat), repetitions, warmup)
    _time_ms(
        row,
        "all_reduce_scalar_ms",
        lambda: dist.all_reduce(scalar),
        repetitions,
        warmup,
    )
    _progress(
        f"{case}, {world_size} ranks: all-reduce of {problem.num_params} "
        f"elements {row['all_reduce_ms']:.3g} ms, of one "
        f"{row['all_reduce_scalar_ms']:.3g} ms"
    )
    return dict(
        sharded=row, num_params=problem.num_params, num_samples=len(problem.data)
    )


def _baseline(case: str, repetitions: int, warmup: int) -> dict:
    """The unsharded loss (``distributed=False``) in the same process."""
    problem = _problem(case, sharded=False)
    # A BatchNorm network's unsharded loss differentiates PyTorch's fused
    # batch_norm (its second_order version); the sharded one has none.
    row = dict(
        threads=torch.get_num_threads(),
        fused_batch_norm=hasattr(problem.loss, "second_order"),
    )
    for name, fn in _operations(problem).items():
        _time_ms(row, f"{name}_ms", fn, repetitions, warmup)
    _progress(
        f"{case}, unsharded: grad {row['grad_ms']:.3g} ms, hvp {row['hvp_ms']:.3g} ms"
    )
    return row


def _cpu_seconds() -> tuple[float, float] | None:
    """The CPU seconds the whole machine has been busy (``/proc/stat``, Linux) and
    those of this process and its finished children, or None where unreadable."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    # user, nice, system and steal; not idle or iowait, nor the interrupts, where
    # the ranks' own loopback traffic is counted.
    busy = sum(int(fields[i]) for i in (0, 1, 2, 7))
    own = sum(
        usage.ru_utime + usage.ru_stime
        for usage in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )
    return busy / os.sysconf("SC_CLK_TCK"), own


def _other_load(before, after, seconds: float) -> float | None:
    """The cores other programs kept busy on average between two
    :func:`_cpu_seconds`: how quiet the machine was while it was measured."""
    if before is None or after is None or seconds <= 0:
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / seconds


def _wait_for_quiet(max_load: float, limit_s: float) -> float | None:
    """Wait, up to ``limit_s``, for a second in which other programs keep fewer
    than ``max_load`` cores busy; the last second's load."""
    deadline, load = time.monotonic() + limit_s, None
    while True:
        before = _cpu_seconds()
        time.sleep(1.0)
        load = _other_load(before, _cpu_seconds(), 1.0)
        if load is None or load < max_load or time.monotonic() > deadline:
            return load


def run(
    cases,
    world_sizes,
    repetitions: int,
    warmup: int,
    *,
    max_load: float = 0.25,
    tries: int = 3,
    progress=print,
) -> dict[str, dict]:
    """Every world size, one launch each; the JSON-ready results.

    The machine may be shared: a launch during which other programs kept more than
    ``max_load`` cores busy on average is run again, up to ``tries`` launches, and
    the quietest is kept. Each launch first waits (up to 30 s) for a quiet second.
    """
    if 1 not in world_sizes:
        world_sizes = [1, *world_sizes]  # the speed-ups are relative to one rank
    meta = benchmark.metadata(torch.device("cpu"))
    meta.update(
        cpu_count=os.cpu_count(),
        backend="gloo",
        repetitions=repetitions,
        warmup=warmup,
        timing="rank 0's median wall time (time.perf_counter) of one call, and its "
        "quartiles, over the repetitions, each after a torch.distributed.barrier()",
        max_load=max_load,
        # By world size: the cores other programs kept busy on average during
        # each launch (None where unreadable), and the quietest, whose results are kept.
        other_load={},
    )
    results = {"meta": meta, "cases": {}}
    ranks_seen = {}
    for world_size in sorted(set(world_sizes)):
        loads, kept = [], None
        while len(loads) < tries:
            _wait_for_quiet(max_load, 30.0)
            begin, cpu = time.perf_counter(), _cpu_seconds()
            ranks = distributed.launch(
                measure_world,
                world_size,
                world_size,
                list(cases),
                repetitions,
                warmup,
                timeout=COLLECTIVE_TIMEOUT,
                run_timeout=RUN_TIMEOUT,
            )
            seconds = time.perf_counter() - begin
            load = _other_load(cpu, _cpu_seconds(), seconds)
            loads.append(load)
            busy = (
                "" if load is None else f"; other programs kept {load:.2f} cores busy"
            )
            progress(f"{world_size} ranks: {seconds:.0f} s in all{busy}")
            if kept is None or (load or 0.0) < (kept[0] or 0.0):
                kept = load, ranks
            if load is None or load <= max_load:
                break
        meta["other_load"][str(world_size)] = dict(tries=loads, kept=kept[0])
        ranks_seen[world_size] = kept[1]
    for case in cases:
        first = ranks_seen[1][0][case]
        data = dict(
            benchmark.CASES[case],
            num_params=first["num_params"],
            num_samples=first["num_samples"],
            baseline=first["baseline"],
            worlds=[],
        )
        for ranks in ranks_seen.values():
            world = dict(ranks[0][case]["sharded"])
            world["shard_sizes"] = [
                rank[case]["sharded"]["shard_size"] for rank in ranks
            ]
            del world["shard_size"]
            for name in benchmark.SHARDED_OPERATIONS:
                world[f"{name}_ms_by_rank"] = [
                    rank[case]["sharded"][f"{name}_ms"] for rank in ranks
                ]
            data["worlds"].append(world)
        ratios = benchmark.scaling(data)
        for world in data["worlds"]:
            for name, value in ratios["speedup"][world["world_size"]].items():
                world[f"{name}_speedup"] = value
        data["sharding_overhead"] = ratios["overhead"]
        results["cases"][case] = data
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", nargs="+", default=list(DEFAULT_CASES), choices=list(benchmark.CASES)
    )
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2, 3, 4])
    parser.add_argument(
        "--repetitions",
        type=int,
        default=30,
        help="timed calls of each operation on every rank (fixed, not adaptive)",
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--max-load",
        type=float,
        default=0.25,
        help="cores other programs may keep busy during a launch before it is rerun",
    )
    parser.add_argument(
        "--tries", type=int, default=3, help="launches at most for each world size"
    )
    parser.add_argument("--out", default="results/cpu", help="folder for the JSON")
    args = parser.parse_args(argv)
    if min(args.world_sizes) < 1 or min(args.repetitions, args.tries) < 1:
        parser.error("world sizes, repetitions and tries must be positive")
    if args.warmup < 0:
        parser.error("warmup must be >= 0")

    progress = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    progress(f"{os.cpu_count()} CPU cores; world sizes {sorted(set(args.world_sizes))}")
    results = run(
        args.cases,
        args.world_sizes,
        args.repetitions,
        args.warmup,
        max_load=args.max_load,
        tries=args.tries,
        progress=progress,
    )
    print(benchmark.distributed_report(results))
    path = benchmark.save(results, args.out, prefix="distributed")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
