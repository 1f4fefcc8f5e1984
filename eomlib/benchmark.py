"""The cost of eomlib's derivatives, in gradients of the same model, next to its peers.

Every row is timed in rounds that alternate with a plain ``torch.autograd`` gradient
of the same loss at the same params; a row's figure is the median over rounds of its
time divided by that round's gradient, so a machine that slows down for a while
slows both. Each row also gets its peak memory above what was allocated before the
call (``torch.profiler`` on the CPU, the allocator's peak on CUDA), its matmul and
convolution flops (``torch.utils.flop_counter``) and, for Hessian-vector products,
its largest difference from eomlib's reverse-mode product.

Run it with ``python benchmarks/derivatives.py`` (see ``--help``); the performance
appendix of the book renders the JSON it writes. The functions at the end read and
format the JSON of ``benchmarks/distributed.py``, which times a gradient and an HVP
of a loss sharded over several processes.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import importlib.metadata
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import func, nn
from torch.utils.flop_counter import FlopCounterMode

import eomlib
from eomlib import _tree
from eomlib._checks import check_choice, check_int, resolve_device
from eomlib.counter_terms import counter_terms
from eomlib.derivatives import batched_hvp, for_second_order, grad, hvp
from eomlib.flows import eom_field, eom_trajectory, gd_trajectory
from eomlib.spectrum import SharpnessTracker

CASES = {
    "mlp-float32": dict(model="mlp", dtype="float32", hidden=[32]),
    "mlp-float64": dict(model="mlp", dtype="float64", hidden=[32]),
    "bn_cnn-float32": dict(model="bn_cnn", dtype="float32", channels=8, blocks=2),
}

PEERS = {
    "curvlinops": "curvlinops-for-pytorch",
    "backpack": "backpack-for-pytorch",
    "pyhessian": "pyhessian",
}

# The targets of the performance work: (row name, largest allowed ratio to one
# gradient, the cases it applies to or None for all).
TARGETS = [
    ("hvp, reverse over reverse", 3.0, ("mlp-float32",)),
    ("counter terms, orders 1-3", 40.0, None),
    ("counter terms, orders 1-4", 100.0, None),
    *[
        (f"EoM field from optimizer steps, order {k}", k + 1.5, None)
        for k in range(1, 5)
    ],
]

# Targets measured in Hessian-vector products of the same case rather than in
# gradients: (row name, the row it is divided by, largest allowed ratio). Tracking
# the sharpness costs a few HVPs a step: the GD step's gradient with its graph and
# SHARPNESS_HVPS products through it, at most SHARPNESS_HVPS whole HVPs.
SHARPNESS_HVPS = 3
PER_HVP_TARGETS = [
    ("sharpness tracking, per GD step", "hvp, reverse over reverse", SHARPNESS_HVPS),
]

BATCH = 8
INTEGRATION_STEPS = 100
INTEGRATION_LR = 0.1
SHARPNESS_POINTS = 8


@dataclass
class Row:
    """One measured operation of one case."""

    name: str
    group: str
    ms: float
    ratio: float
    ratio_low: float
    ratio_high: float
    rounds: int
    peak_mb: float | None = None
    gflop: float | None = None
    max_rel_diff: float | None = None
    compile_s: float | None = None
    note: str = ""


@dataclass
class Setting:
    """How long to measure: rounds per row, and a time budget that ends a row early
    once it has ``min_rounds``."""

    min_rounds: int = 5
    max_rounds: int = 30
    budget_s: float = 4.0
    warmup: int = 2


PROFILES = {
    "quick": Setting(min_rounds=2, max_rounds=3, budget_s=0.5, warmup=1),
    "default": Setting(),
}


@dataclass
class CaseResult:
    name: str
    model: str
    dtype: str
    device: str
    num_params: int
    num_samples: int
    gradient_ms: float
    rows: list[Row] = field(default_factory=list)
    # eomlib's hvp against each peer, timed in alternating rounds: the median of
    # (ours / peer) over rounds and its interquartile range.
    head_to_head: dict[str, dict] = field(default_factory=dict)


def time_against_gradient(
    fn: Callable[[], object],
    gradient: Callable[[], object],
    setting: Setting,
    device: torch.device,
    rounds: int | None = None,
    warmup: int | None = None,
) -> tuple[float, list[float]]:
    """Median time of ``fn`` in ms, and its ratio to ``gradient`` in each round."""
    for _ in range(setting.warmup if warmup is None else warmup):
        fn()
        gradient()
    times, ratios, start = [], [], time.perf_counter()
    limit = rounds or setting.max_rounds
    while len(times) < limit:
        base = _timed(gradient, device)
        elapsed = _timed(fn, device)
        times.append(elapsed)
        ratios.append(elapsed / base)
        enough = len(times) >= (rounds or setting.min_rounds)
        if enough and time.perf_counter() - start > setting.budget_s:
            break
    return 1e3 * statistics.median(times), ratios


def _timed(fn, device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """The most memory ``fn`` holds at once beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as profile:
        fn()
    events = [e for e in profile.profiler.kineto_results.events()]
    events = sorted(
        (e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def gflop(fn: Callable[[], object]) -> float:
    """Matmul and convolution flops of one call, in GFLOP."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _relative_difference(result, reference) -> float:
    a = _flat(result).double()
    b = _flat(reference).double()
    return ((a - b).norm() / b.norm()).item()


def _flat(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)
    if isinstance(value, dict):
        return _tree.flatten(value)
    return torch.cat([v.reshape(-1) for v in value])


def peers_available() -> dict[str, str | None]:
    """Each peer's installed version, or None."""
    versions = {}
    for peer, distribution in PEERS.items():
        try:
            versions[peer] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[peer] = None
    return versions


def _peer_module(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BatchNorms use the batch's statistics and keep none:
    the loss eomlib differentiates, in a form the peers' code can run."""
    peer = copy.deepcopy(model).train()
    for module in peer.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = module.running_var = None
            module.num_batches_tracked = None
    return peer


def _peer_hvps(problem, v_list):
    """``name -> (callable returning H v, note)`` for each installed peer."""
    model = _peer_module(problem.model)
    params = [p for p in model.parameters()]
    X, y = problem.data.X, problem.data.y
    criterion = nn.CrossEntropyLoss()
    products = {}
    installed = peers_available()
    if installed["curvlinops"]:
        from curvlinops import HessianLinearOperator

        operator = HessianLinearOperator(
            model, criterion, params, [(X, y)], check_deterministic=False
        )
        flat_v = torch.cat([v.reshape(-1) for v in v_list])
        products["curvlinops HessianLinearOperator"] = (
            lambda: operator @ flat_v,
            "torch.func jvp over jacrev, at the module's parameters",
        )
    if installed["backpack"]:
        from backpack.hessianfree.hvp import hessian_vector_product

        def backpack_hvp():
            value = criterion(model(X), y)
            return hessian_vector_product(value, params, v_list)

        products["BackPACK hessian_vector_product"] = (
            backpack_hvp,
            "double backward through R_op, forward pass included",
        )
    if installed["pyhessian"]:
        from pyhessian import hessian

        engine = hessian(model, criterion, dataloader=[(X, y)], cuda=X.is_cuda)
        model.train()  # NOTE: pyhessian switches the module to eval mode

        products["PyHessian double backward"] = (
            lambda: engine.dataloader_hv_product(v_list)[1],
            "backward(create_graph=True) then autograd.grad, forward included",
        )
    return products


def run_case(
    name: str,
    *,
    device="cpu",
    setting: Setting | None = None,
    compile: bool = True,
    orders=(1, 2, 3, 4),
    integrate: bool = True,
    progress: Callable[[str], None] = print,
) -> CaseResult:
    """Measure every row for the case ``name`` of :data:`CASES`."""
    check_choice(name, "case", CASES)
    setting = setting or PROFILES["default"]
    device = resolve_device(device)
    options = dict(CASES[name])
    problem = eomlib.make_problem(
        options.pop("model"), dtype=options.pop("dtype"), device=device, **options
    )
    loss, params = problem.loss, problem.params
    fast = for_second_order(loss)  # what eomlib differentiates once or twice
    names = list(params)
    leaves = [params[n] for n in names]

    def reference_gradient():
        inputs = [leaf.detach().requires_grad_() for leaf in leaves]
        return torch.autograd.grad(fast(dict(zip(names, inputs))), inputs)

    g = grad(loss, params)
    v = _tree.scale(1.0 / _tree.dot(g, g).sqrt().item(), g)
    v_list = [v[n] for n in names]
    generator = torch.Generator().manual_seed(0)
    vectors = {
        n: torch.randn((BATCH, *p.shape), generator=generator, dtype=p.dtype).to(device)
        for n, p in params.items()
    }
    reference_hv = hvp(loss, params, v, method="reverse")
    gradient_ms, _ = time_against_gradient(
        reference_gradient, reference_gradient, setting, device
    )
    result = CaseResult(
        name,
        CASES[name]["model"],
        CASES[name]["dtype"],
        str(device),
        problem.num_params,
        len(problem.data),
        gradient_ms,
    )

    def measure(
        row_name, group, fn, *, check=None, per=1, rounds=None, long=False, **extra
    ):
        """Time ``fn``; a ``long`` one (a whole trajectory) gets no warm-up beyond
        its first call, and neither memory nor flops, which would rerun it."""
        progress(f"{name}: {row_name}")
        try:
            value = None if long else fn()

            ms, ratios = time_against_gradient(
                fn,
                reference_gradient,
                setting,
                device,
                rounds,
                warmup=0 if long else None,
            )

        except Exception as error:  # NOTE: a failing peer is reported, not fatal
            result.rows.append(
                Row(
                    row_name,
                    group,
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    0,
                    note=f"failed: {type(error).__name__}: {error}",
                )
            )
            return None
        low, mid, high = _quartiles([r / per for r in ratios])
        row = Row(row_name, group, ms / per, mid, low, high, len(ratios), **extra)
        if not long:
            row.peak_mb = peak_memory_mb(fn, device)
            row.gflop = gflop(fn) / per

        if check is not None:
            row.max_rel_diff = check(value)
        result.rows.append(row)
        return row

    same_hvp = lambda value: _relative_difference(value, reference_hv)  # noqa: E731
    measure("gradient, torch.autograd", "gradient", reference_gradient)
    measure("gradient, eomlib.grad", "gradient", lambda: grad(loss, params))
    measure(
        "hvp, reverse over reverse",
        "hvp",
        lambda: hvp(loss, params, v, method="reverse"),
        check=same_hvp,
    )
    measure(
        "hvp, forward over reverse",
        "hvp",
        lambda: hvp(loss, params, v, method="forward"),
        check=same_hvp,
    )
    measure(
        f"batched_hvp, {BATCH} vectors, per vector",
        "hvp",
        lambda: batched_hvp(loss, params, vectors),
        per=BATCH,
        note="reverse over reverse, is_grads_batched",
    )
    measure(
        f"batched_hvp forward, {BATCH} vectors, per vector",
        "hvp",
        lambda: batched_hvp(loss, params, vectors, method="forward"),
        per=BATCH,
        note="forward over reverse under vmap",
    )
    peers = _peer_hvps(problem, v_list)
    for peer, (fn, note) in peers.items():
        if measure(peer, "peer hvp", fn, check=same_hvp, note=note) is not None:
            progress(f"{name}: hvp against {peer}, side by side")
            _, ratios = time_against_gradient(
                lambda: hvp(loss, params, v), fn, setting, device
            )
            low, mid, high = _quartiles(ratios)
            result.head_to_head[peer] = dict(
                ratio=mid, ratio_low=low, ratio_high=high, rounds=len(ratios)
            )
    if compile:
        _measure_compiled(measure, fast, params, v, same_hvp)
    for k in orders:
        label = "orders 1" if k == 1 else f"orders 1-{k}"
        measure(
            f"counter terms, {label}",
            "counter terms",
            lambda k=k: counter_terms(loss, params, k),
        )
    for k in [k for k in orders if k <= 3]:
        label = "orders 1" if k == 1 else f"orders 1-{k}"
        measure(
            f"counter terms, {label}, tree by tree (forward mode)",
            "counter terms",
            lambda k=k: counter_terms(loss, params, k, method="forward"),
            note="each tree by its own nested jvp: eomlib before the shared graphs",
        )
    for k in orders:
        field = eom_field(loss, INTEGRATION_LR, k, method="iterates")
        measure(
            f"EoM field from optimizer steps, order {k}",
            "EoM field",
            lambda field=field: field(params),
        )
    _measure_sharpness_tracking(measure, loss, params)
    if integrate:
        _measure_integration(measure, problem, setting)
    return result


def _measure_sharpness_tracking(measure, loss, params) -> None:
    """One step of :class:`eomlib.spectrum.SharpnessTracker` along real GD iterates:
    the calls walk forth and back over ``SHARPNESS_POINTS + 1`` consecutive
    iterates, one GD step each, so the warm start is as far from converged as it
    is in training (at one fixed point it converges, and its span closes after a
    single product)."""
    gd = gd_trajectory(loss, params, INTEGRATION_LR, SHARPNESS_POINTS)
    points = [
        _tree.tree_map(lambda x, k=k: x[k], gd) for k in range(SHARPNESS_POINTS + 1)
    ]
    tracker = SharpnessTracker(loss, hvps_per_step=SHARPNESS_HVPS)
    tracker.update(points[0])  # the cold start, by Lanczos, is not what is timed
    # Forth and back along the iterates: each call moves one GD step.
    order = list(range(1, SHARPNESS_POINTS + 1)) + list(
        range(SHARPNESS_POINTS - 1, -1, -1)
    )
    counts = []

    def step():
        point = points[order[len(counts) % len(order)]]
        counts.append(tracker.update(point)[2])

    row = measure("sharpness tracking, per GD step", "sharpness", step)
    if row is not None:
        row.note = (
            f"the gradient with its graph (which the GD step uses) and "
            f"{statistics.mean(counts):.2g} warm-started products through it, "
            f"along {SHARPNESS_POINTS} GD iterates at lr {INTEGRATION_LR}"
        )


def _measure_compiled(measure, loss, params, v, same_hvp) -> None:
    torch._dynamo.reset()  # NOTE: each case compiles from scratch, within its limits
    compiled_grad = torch.compile(func.grad(loss))
    compiled_hvp = torch.compile(lambda p, w: func.vjp(func.grad(loss), p)[1](w)[0])
    for row_name, fn, check in [
        ("gradient, torch.compile", lambda: compiled_grad(params), None),
        (
            "hvp, reverse over reverse, torch.compile",
            lambda: compiled_hvp(params, v),
            same_hvp,
        ),
    ]:
        start = time.perf_counter()
        # The first call compiles; if it fails, measure() calls again and reports.
        with contextlib.suppress(Exception):
            fn()
        measure(
            row_name,
            "torch.compile",
            fn,
            check=check,
            compile_s=time.perf_counter() - start,
        )


def _measure_integration(measure, problem, setting: Setting) -> None:
    loss, params = problem.loss, problem.params
    dtype = _tree.leaves(params)[0].dtype
    tolerances = (
        dict(rtol=1e-5, atol=1e-7)
        if dtype == torch.float32
        else dict(rtol=1e-9, atol=1e-11)
    )
    gd = lambda: gd_trajectory(loss, params, INTEGRATION_LR, INTEGRATION_STEPS)  # noqa: E731
    measure(
        f"GD, {INTEGRATION_STEPS} steps",
        "trajectory",
        gd,
        rounds=setting.min_rounds,
        long=True,
    )
    counter = _CountingLoss(loss)

    def integrate():
        counter.calls = 0
        return eom_trajectory(
            counter,
            params,
            INTEGRATION_LR,
            INTEGRATION_STEPS,
            1,
            solver="dopri5",
            **tolerances,
        )

    row = measure(
        f"EoM₁ integrated over {INTEGRATION_STEPS} GD steps",
        "trajectory",
        integrate,
        rounds=1,
        long=True,
    )
    if row is not None:
        row.note = (
            f"dopri5, rtol {tolerances['rtol']:g}, lr {INTEGRATION_LR}: "
            f"{counter.calls} loss evaluations, one timed run"
        )


class _CountingLoss:
    """``loss``, counting its evaluations and those of its ``second_order``."""

    def __init__(self, loss, counter=None):
        self.loss, self.calls = loss, 0
        self.counter = counter or self
        if hasattr(loss, "second_order"):
            self.second_order = _CountingLoss(loss.second_order, self.counter)

    def __call__(self, params):
        self.counter.calls += 1
        return self.loss(params)


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def metadata(device: torch.device) -> dict:
    """Where and with what the results were measured."""
    info = {
        "date": datetime.date.today().isoformat(),
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "eomlib": eomlib.__version__,
        "commit": _commit(),
        "peers": peers_available(),
    }
    cpu = _cpu_model()
    if cpu:
        info["cpu"] = cpu
    return info


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def run(
    cases=tuple(CASES),
    *,
    device="cpu",
    profile: str = "default",
    compile: bool = True,
    orders=(1, 2, 3, 4),
    integrate: bool = True,
    progress: Callable[[str], None] = print,
) -> dict:
    """Every case; the JSON-ready results with their metadata and the targets."""
    check_choice(profile, "profile", PROFILES)
    for case in cases:
        check_choice(case, "case", CASES)
    for k in orders:
        check_int(k, "order", minimum=1)
    device = resolve_device(device)
    results = {"meta": metadata(device), "profile": profile, "cases": {}}
    for case in cases:
        case_result = run_case(
            case,
            device=device,
            setting=PROFILES[profile],
            compile=compile,
            orders=orders,
            integrate=integrate,
            progress=progress,
        )
        results["cases"][case] = asdict(case_result)
    results["targets"] = check_targets(results)
    return results


def check_targets(results: dict) -> list[dict]:
    """Each target against each case: the measured ratio and whether it holds.

    The peer target (``hvp`` never slower than any peer) takes, where the case has
    them, the side-by-side timings of eomlib's default ``hvp`` against each peer in
    alternating rounds, and checks the largest median ratio against 1; results
    without them compare the rows' ratios to a gradient with the fastest peer's.
    """
    checks = []
    for case, data in results["cases"].items():
        rows = {row["name"]: row for row in data["rows"]}
        for row_name, limit, applies_to in TARGETS:
            if row_name in rows and (applies_to is None or case in applies_to):
                ratio = rows[row_name]["ratio"]
                checks.append(
                    dict(
                        case=case,
                        target=f"{row_name} <= {limit:g}",
                        measured=ratio,
                        met=bool(ratio <= limit),
                    )
                )
        for row_name, unit, limit in PER_HVP_TARGETS:
            if row_name in rows and unit in rows:
                ratio = rows[row_name]["ratio"] / rows[unit]["ratio"]
                checks.append(
                    dict(
                        case=case,
                        target=f"{row_name} <= {limit:g} x {unit}",
                        measured=ratio,
                        met=bool(ratio <= limit),
                    )
                )
        peers = [
            row
            for row in data["rows"]
            if row["group"] == "peer hvp" and row["ratio"] == row["ratio"]
        ]
        ours = rows.get("hvp, reverse over reverse")
        side_by_side = {
            peer: times
            for peer, times in data.get("head_to_head", {}).items()
            if times["ratio"] == times["ratio"]
        }
        if side_by_side:
            peer, times = max(side_by_side.items(), key=lambda item: item[1]["ratio"])
            checks.append(
                dict(
                    case=case,
                    target=f"hvp / {peer} <= 1, side by side",
                    measured=times["ratio"],
                    met=bool(times["ratio"] <= 1.0),
                )
            )
        elif peers and ours:
            fastest = min(peers, key=lambda row: row["ratio"])
            checks.append(
                dict(
                    case=case,
                    target=f"hvp <= fastest peer ({fastest['name']}, "
                    f"{fastest['ratio']:.2f})",
                    measured=ours["ratio"],
                    met=bool(ours["ratio"] <= fastest["ratio"]),
                )
            )
    return checks


def save(results: dict, folder: str | Path, *, prefix: str = "benchmark") -> Path:
    """Write ``results`` as ``<prefix>-<device>-<date>.json`` in ``folder``."""
    meta = results["meta"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = meta["device_name"] if meta["device"].startswith("cuda") else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
    path = folder / f"{prefix}-{slug}-{meta['date']}.json"
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return path


def load_latest(folder: str | Path, *, prefix: str = "benchmark") -> dict | None:
    """The newest ``<prefix>-*.json`` in ``folder`` (by the date in its name), or
    None when there is none; ``prefix="distributed"`` reads the sharding runs."""
    paths = sorted(Path(folder).glob(f"{prefix}-*.json"), key=lambda p: p.stem[-10:])
    if not paths:
        return None
    results = json.loads(paths[-1].read_text())
    results["path"] = str(paths[-1])
    return results


def report(results: dict) -> str:
    """The results as plain text: one table a case, then the targets."""
    lines = []
    for case, data in results["cases"].items():
        lines.append(
            f"\n{case} on {data['device']}: {data['num_params']} parameters, "
            f"{data['num_samples']} samples, "
            f"one gradient = {data['gradient_ms']:.2f} ms"
        )
        lines.append(
            f"  {'row':<58} {'ms':>9} {'gradients':>9} {'IQR':>13} "
            f"{'MiB':>8} {'rel diff':>9}"
        )
        for row in data["rows"]:
            if row["note"].startswith("failed"):
                lines.append(f"  {row['name']:<58} {row['note']}")
                continue
            diff = "" if row["max_rel_diff"] is None else f"{row['max_rel_diff']:.1e}"
            lines.append(
                f"  {row['name']:<58} {row['ms']:>9.2f} {row['ratio']:>9.2f} "
                f"{row['ratio_low']:>6.2f}-{row['ratio_high']:<6.2f} "
                f"{_optional(row['peak_mb'], '.1f'):>8} {diff:>9}"
            )
    lines.append("\ntargets:")
    for check in results["targets"]:
        mark = "met" if check["met"] else "MISSED"
        lines.append(
            f"  {check['case']:<16} {check['target']:<60} "
            f"{check['measured']:>7.2f}  {mark}"
        )
    return "\n".join(lines)


def find_row(results: dict, case: str, name: str) -> dict:
    """The row called ``name`` of ``case``; KeyError naming what exists otherwise."""
    rows = {row["name"]: row for row in results["cases"][case]["rows"]}
    if name not in rows:
        raise KeyError(f"no row {name!r} in case {case!r}; rows: {sorted(rows)}")
    return rows[name]


def table_rows(results: dict, case: str, groups=None) -> list[dict]:
    """The rows of ``case`` (those of ``groups`` if given) ready for a Markdown table:
    the ratio to one gradient with its interquartile range, the time, the peak
    memory, the flops and, for products, the relative difference from eomlib's."""
    table = []
    for row in results["cases"][case]["rows"]:
        if groups is not None and row["group"] not in groups:
            continue
        if row["note"].startswith("failed"):
            table.append(
                {
                    "operation": row["name"],
                    "gradients": row["note"],
                    "interquartile range": "",
                    "ms": "",
                    "peak MiB": "",
                    "GFLOP": "",
                    "rel. diff": "",
                }
            )
            continue
        diff = row["max_rel_diff"]
        table.append(
            {
                "operation": row["name"],
                "gradients": f"{row['ratio']:.2f}",
                "interquartile range": (
                    f"{row['ratio_low']:.2f} to {row['ratio_high']:.2f}"
                ),
                "ms": f"{row['ms']:.3g}",
                "peak MiB": _optional(row["peak_mb"], ".3g"),
                "GFLOP": _optional(row["gflop"], ".3g"),
                "rel. diff": "" if diff is None else f"{diff:.0e}",
            }
        )
    return table


def plot_ratios(runs: dict[str, dict], groups=None):
    """Each row's cost in gradients, one bar a case, one panel a run (CPU, GPU), on
    a logarithmic axis. ``runs`` maps a label to a results dict."""
    import matplotlib.pyplot as plt

    first = next(iter(runs.values()))
    cases = list(first["cases"])
    names = [
        row["name"]
        for row in first["cases"][cases[0]]["rows"]
        if groups is None or row["group"] in groups
    ]
    fig, axes = plt.subplots(
        1,
        len(runs),
        figsize=(3.2 + 4.2 * len(runs), 0.32 * len(names) * len(cases) / 2 + 1.5),
        sharey=True,
        layout="constrained",
        squeeze=False,
    )
    height = 0.8 / len(cases)
    for ax, (label, results) in zip(axes[0], runs.items()):
        for i, case in enumerate(cases):
            rows = {
                row["name"]: row
                for row in results["cases"].get(case, {}).get("rows", [])
            }
            values = [rows[n]["ratio"] if n in rows else float("nan") for n in names]
            offset = (i - (len(cases) - 1) / 2) * height
            ax.barh(
                [j + offset for j in range(len(names))],
                values,
                height=height,
                label=case,
            )
        ax.axvline(1.0, color="0.3", linewidth=0.8)
        ax.set_xscale("log")
        ax.set(title=label, xlabel="time in gradients of the same model")
        ax.grid(axis="x", which="major", alpha=0.3)
    axes[0][0].set_yticks(range(len(names)), names)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(loc="upper right")
    return fig


def _optional(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


# ---------------------------------------------------------------------------
# The sharding runs of benchmarks/distributed.py: one gradient and one HVP of a
# loss sharded over W gloo processes, against W = 1 and the unsharded loss.

SHARDED_OPERATIONS = ("grad", "hvp")


def scaling(case: dict) -> dict:
    """The ratios of one case of a sharding run: for each world size and operation
    the speed-up, time at one sharded rank over time at W ranks; and for each
    operation the overhead of sharding, time at one sharded rank over the unsharded
    loss's time. Both are ratios of medians."""
    one = next(w for w in case["worlds"] if w["world_size"] == 1)
    return {
        "speedup": {
            w["world_size"]: {
                op: one[f"{op}_ms"] / w[f"{op}_ms"] for op in SHARDED_OPERATIONS
            }
            for w in case["worlds"]
        },
        "overhead": {
            op: one[f"{op}_ms"] / case["baseline"][f"{op}_ms"]
            for op in SHARDED_OPERATIONS
        },
    }


def distributed_rows(results: dict, case: str) -> list[dict]:
    """The rows of one case of a sharding run, ready for a Markdown table: one a
    world size, after the unsharded loss, with the medians in ms, the speed-ups
    and the all-reduce of one parameter-sized vector alone."""
    data = results["cases"][case]
    ratios = scaling(data)
    base = data["baseline"]
    table = [
        {
            "ranks": "unsharded",
            "threads a rank": str(base["threads"]),
            "gradient ms": f"{base['grad_ms']:.3g}",
            "HVP ms": f"{base['hvp_ms']:.3g}",
            "gradient speed-up": "",
            "HVP speed-up": "",
            "all-reduce ms": "",
        }
    ]
    for world in data["worlds"]:
        up = ratios["speedup"][world["world_size"]]
        table.append(
            {
                "ranks": str(world["world_size"]),
                "threads a rank": str(world["threads_per_rank"]),
                "gradient ms": f"{world['grad_ms']:.3g}",
                "HVP ms": f"{world['hvp_ms']:.3g}",
                "gradient speed-up": f"{up['grad']:.2f}",
                "HVP speed-up": f"{up['hvp']:.2f}",
                "all-reduce ms": f"{world['all_reduce_ms']:.3g}",
            }
        )
    return table


def distributed_report(results: dict) -> str:
    """A sharding run as plain text: one table a case, then its ratios."""
    meta = results["meta"]
    lines = [
        f"{meta['cpu_count']} CPU cores; median of {meta['repetitions']} "
        f"repetitions after {meta['warmup']} warm-up ones, on rank 0"
    ]
    for case, data in results["cases"].items():
        ratios = scaling(data)
        lines.append(
            f"\n{case}: {data['num_params']} parameters, {data['num_samples']} "
            f"samples; overhead of sharding at one rank: gradient "
            f"{ratios['overhead']['grad']:.2f}, HVP {ratios['overhead']['hvp']:.2f}"
        )
        rows = distributed_rows(results, case)
        widths = {
            key: max(len(key), *(len(row[key]) for row in rows)) for key in rows[0]
        }
        lines.append("  " + "  ".join(key.rjust(widths[key]) for key in rows[0]))
        for row in rows:
            lines.append(
                "  " + "  ".join(value.rjust(widths[key]) for key, value in row.items())
            )
    return "\n".join(lines)


def plot_scaling(results: dict):
    """The speed-up of a gradient and of an HVP over one sharded rank, against the
    number of ranks, one line a case; a dotted line marks the machine's cores."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, 2, figsize=(8.4, 3.4), sharey=True, layout="constrained"
    )
    cores = results["meta"]["cpu_count"]
    speedups = {
        case: scaling(data)["speedup"] for case, data in results["cases"].items()
    }
    sizes = sorted({w for speedup in speedups.values() for w in speedup})
    for ax, operation, title in zip(axes, SHARDED_OPERATIONS, ("gradient", "HVP")):
        for case, speedup in speedups.items():
            ranks = sorted(speedup)
            ax.plot(ranks, [speedup[w][operation] for w in ranks], "o-", label=case)
        ax.axhline(1.0, color="0.3", linewidth=0.8)
        ax.axvline(cores, color="0.5", linestyle=":", linewidth=1.0)
        ax.set(title=title, xlabel="ranks (processes)")
        ax.set_xticks(sizes)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up over one sharded rank")
    axes[-1].legend(loc="lower left")
    return fig


def all_reduce_kinds(sizes: list[int], num_params: int) -> dict[str, int]:
    """The all-reduces of one call by kind: of all the parameters, of one number
    (the loss), and of anything else (a BatchNorm's per-channel sums)."""
    full = sum(size == num_params for size in sizes)
    scalar = sum(size == 1 for size in sizes)
    return {"params": full, "scalar": scalar, "other": len(sizes) - full - scalar}


def sharding_facts(results: dict, case: str) -> dict:
    """What a sharding run says about ``case``, for the appendix's prose: the cores,
    the threads at one rank and at as many ranks as cores, the all-reduces of a
    gradient and an HVP by kind, the all-reduce alone within one rank and between
    two, the extra time of the sharded gradient at one rank, and the best speed-up
    of any case as ``(value, case, operation, ranks)``."""
    cores = results["meta"]["cpu_count"]
    data = results["cases"][case]
    worlds = {w["world_size"]: w for w in data["worlds"]}
    one = worlds[1]
    best = max(
        (
            (value, name, operation, ranks)
            for name, other in results["cases"].items()
            for ranks, ops in scaling(other)["speedup"].items()
            if ranks > 1
            for operation, value in ops.items()
        ),
        default=None,
    )
    return {
        "cores": cores,
        "threads": (
            one["threads_per_rank"],
            worlds.get(cores, one)["threads_per_rank"],
        ),
        "grad": all_reduce_kinds(one["grad_all_reduces"], data["num_params"]),
        "hvp": all_reduce_kinds(one["hvp_all_reduces"], data["num_params"]),
        "all_reduce_ms": {w: worlds[w]["all_reduce_ms"] for w in worlds},
        "grad_ms": one["grad_ms"],
        "extra_grad_ms": one["grad_ms"] - data["baseline"]["grad_ms"],
        "best": best,
    }
