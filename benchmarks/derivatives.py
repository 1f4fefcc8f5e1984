"""Benchmark eomlib's derivatives against one gradient and against their peers.

    python benchmarks/derivatives.py                 # every case on the CPU
    python benchmarks/derivatives.py --device cuda   # on a GPU
    python benchmarks/derivatives.py --profile quick --cases mlp-float64

Prints each row as it is measured, then the targets, and writes the results as
``benchmark-<device>-<date>.json`` into ``--out`` (``results/cpu`` or
``results/gpu``), where the book's performance appendix finds them. The peers are
optional: ``pip install -e ".[bench]"`` installs them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from eomlib import benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=list(benchmark.CASES),
        choices=list(benchmark.CASES),
    )
    parser.add_argument(
        "--profile",
        default="default",
        choices=list(benchmark.PROFILES),
        help="quick: a few rounds a row, to check that it runs",
    )
    parser.add_argument("--orders", nargs="+", type=int, default=[1, 2, 3, 4])
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile rows"
    )
    parser.add_argument(
        "--no-integration",
        action="store_true",
        help="skip the 100-step GD and EoM trajectories",
    )
    parser.add_argument(
        "--out", help="folder for the JSON (default results/cpu or results/gpu)"
    )
    parser.add_argument(
        "--warm-compile-cache",
        action="store_true",
        help="let torch.compile reuse its on-disk cache; by default it gets an empty "
        "one, so the compile times are those of a first run",
    )
    args = parser.parse_args(argv)
    if not args.warm_compile_cache:
        # Inductor reads its cache folder from here at every compilation.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

    results = benchmark.run(
        args.cases,
        device=args.device,
        profile=args.profile,
        compile=not args.no_compile,
        orders=args.orders,
        integrate=not args.no_integration,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    results["meta"]["compile_cache"] = "warm" if args.warm_compile_cache else "empty"
    print(benchmark.report(results))
    out = args.out or ("results/cpu" if args.device == "cpu" else "results/gpu")
    print(f"wrote {benchmark.save(results, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
