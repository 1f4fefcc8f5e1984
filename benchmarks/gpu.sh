#!/usr/bin/env bash
# On a machine with a CUDA GPU: the derivative benchmark on the GPU, then every
# chapter of the book in its `full` profile, each under a time limit. Both write
# JSON into results/gpu/, named with the GPU and the date; commit them, and the
# performance appendix shows the GPU beside the CPU.
#
#   bash benchmarks/gpu.sh                    # with the project's .venv
#   PYTHON=python CHAPTER_LIMIT=300 bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LIMIT=${CHAPTER_LIMIT:-600}

"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU is visible to torch')" || exit 1
"$PY" benchmarks/derivatives.py --device cuda --out results/gpu || status=1
# The sharding benchmark (benchmarks/distributed.py) is not run here: it starts its
# ranks with eomlib.distributed.launch, which joins CPU processes by gloo. Scaling
# across GPUs needs NCCL ranks, one a GPU, started by `torchrun --nproc-per-node N`.
"$PY" benchmarks/chapters.py --profile full --limit "$LIMIT" --out results/gpu || status=1
exit "${status:-0}"
