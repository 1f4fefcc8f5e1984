"""Run every chapter of the book in one profile and record how long each took.

    python benchmarks/chapters.py --profile full --out results/gpu

Each chapter runs as its own ``python -m eomlib.runner --notebook NAME --no-build``
under ``--limit`` seconds, so one slow or failing chapter does not stop the others.
Writes ``chapters-<profile>-<device>-<date>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from eomlib.runner import notebook_names

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="full")
    parser.add_argument(
        "--limit", type=float, default=600.0, help="seconds allowed to each chapter"
    )
    parser.add_argument(
        "--notebook", action="append", help="run only this chapter (repeatable)"
    )
    parser.add_argument("--out", default="results/gpu")
    args = parser.parse_args(argv)

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    chapters = []
    for name in args.notebook or notebook_names(ROOT):
        command = [
            sys.executable,
            "-m",
            "eomlib.runner",
            "--profile",
            args.profile,
            "--notebook",
            name,
            "--no-build",
            "--root",
            str(ROOT),
        ]
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=args.limit
            )
            status = "ok" if done.returncode == 0 else "failed"
            tail = (done.stdout + done.stderr)[-2000:]
        except subprocess.TimeoutExpired:
            status, tail = "timed out", ""
        seconds = time.perf_counter() - start
        print(f"{name}: {status} in {seconds:.0f} s", flush=True)
        chapters.append(
            dict(
                name=name,
                status=status,
                seconds=seconds,
                output_tail=tail if status != "ok" else "",
            )
        )

    date = datetime.date.today().isoformat()
    slug = "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"chapters-{args.profile}-{slug}-{date}.json"
    record = dict(
        profile=args.profile,
        device=device,
        date=date,
        torch=torch.__version__,
        limit_s=args.limit,
        chapters=chapters,
    )
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return 0 if all(c["status"] == "ok" for c in chapters) else 1


if __name__ == "__main__":
    sys.exit(main())
