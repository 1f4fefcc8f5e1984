"""Results of long experiments, kept on disk under what determines them.

A chapter wraps each long computation in :func:`cached`::

    comparison = eomlib.cached(
        "digits-comparison",
        {"model": "mlp", "hidden": [32], "seed": 0, "lr": 0.1, "num_steps": 100},
        lambda: eomlib.compare_with_gd(loss, params, 0.1, 100),
        device=device,
    )

The first call computes the result and stores it; every later call with the same
name, parameters, device, torch version and eomlib source loads it instead.

The key is the sha256 of the canonical JSON (sorted keys, no spaces) of the name,
the parameters, the device, torch's version and :func:`code_version`, the sha256 of
every ``eomlib/*.py`` file. So a changed parameter changes the key of exactly the
entries whose parameters contain it, and any change to eomlib's source changes every
key: the code hash does not know which module an experiment uses, so it assumes all.
Parameters are JSON values (numbers, strings, booleans, ``None``, lists, dicts) and
dtypes, devices and tensors; a tensor enters the key by its dtype, shape and the
sha256 of its bytes. ``1`` and ``1.0`` are different keys.

The granularity is one entry per call of :func:`cached`: a chapter that loops over
learning rates calls it once per learning rate, so an interrupted build recomputes
only the entries it had not finished, and a new learning rate in the list computes
only that one.

Each entry is ``DIRECTORY/NAME/KEY.pt``, written by ``torch.save`` to a temporary
file in the same folder and moved into place with ``os.replace``, which is atomic:
a run killed at any moment leaves the old entry or none, never a partial one under
the entry's name. Beside it ``KEY.json`` records, for people, the parameters, the
code hash and how long the computation took. An entry that cannot be read, or that
holds another key, is recomputed with a logged warning.

In a distributed run (:mod:`eomlib.distributed`) the ranks agree on a hit, so that
all of them load or all compute; rank 0 stores, and the key holds the number of
ranks, whose sums differ from one process's by round-off.

The folder is ``.cache/eomlib`` under the current directory (the book's root when
the runner executes a chapter), or ``$EOMLIB_CACHE_DIR``; ``EOMLIB_CACHE=off``
switches the cache off, so that every call computes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from eomlib import distributed

log = logging.getLogger(__name__)

T = TypeVar("T")

DIRECTORY_VARIABLE = "EOMLIB_CACHE_DIR"
SWITCH_VARIABLE = "EOMLIB_CACHE"
DEFAULT_DIRECTORY = Path(".cache") / "eomlib"

_SWITCH = {"on": True, "1": True, "true": True, "yes": True}
_SWITCH |= {"off": False, "0": False, "false": False, "no": False}
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_FORMAT = 1


@functools.lru_cache(maxsize=8)
def code_version(folder: str | Path | None = None) -> str:
    """The sha256 of eomlib's source: every ``*.py`` in ``folder``, by name and
    content; ``None`` is the folder of the eomlib that is imported.

    Computed once per folder and process: a module edited after that is not seen
    until the next process, which also runs the old code until it restarts.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(folder or Path(__file__).parent).glob("*.py")):
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def canonical(value: Any, where: str = "parameters") -> Any:
    """``value`` as plain JSON values, the same for equal parameters.

    Tuples become lists, dtypes and devices their names, a tensor a record of its
    dtype, shape and the sha256 of its bytes, dict keys strings. Anything else raises
    ``TypeError`` naming where it was found: its text would not identify it.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # JSON has no NaN or infinity; their names keep them apart from numbers.
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        return {
            "tensor": hashlib.sha256(data.view(torch.uint8).numpy()).hexdigest()
            if data.numel()
            else "empty",
            "dtype": str(value.dtype),
            "shape": list(value.shape),
        }
    if isinstance(value, (list, tuple)):
        return [canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): canonical(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(
        f"{where} must be a JSON value, a dtype, a device or a tensor to enter a "
        f"cache key; got {type(value).__name__}"
    )


def _enabled_from_environment() -> bool:
    text = os.environ.get(SWITCH_VARIABLE, "on").strip().lower()
    if text not in _SWITCH:
        raise ValueError(
            f"{SWITCH_VARIABLE} must be one of {', '.join(_SWITCH)}; got {text!r}"
        )
    return _SWITCH[text]


class Cache:
    """A folder of results, each under the key of what computed it.

    Args:
        directory: where entries go; ``None`` reads ``$EOMLIB_CACHE_DIR``, else
            ``.cache/eomlib`` under the current directory, when the cache is made.
        enabled: ``False`` computes every time and stores nothing; ``None`` reads
            ``$EOMLIB_CACHE`` (``off`` or ``on``, the default).
    """

    def __init__(
        self, directory: str | Path | None = None, *, enabled: bool | None = None
    ):
        if directory is None:
            directory = os.environ.get(DIRECTORY_VARIABLE) or DEFAULT_DIRECTORY
        self.directory = Path(directory).absolute()
        self.enabled = _enabled_from_environment() if enabled is None else enabled

    def key(self, name: str, parameters: dict, *, device=None) -> str:
        """The hex sha256 that names the entry of ``name`` at ``parameters``."""
        record = self._record(name, parameters, device)
        text = json.dumps(record, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, name: str, parameters: dict, *, device=None) -> Path:
        """Where the entry of ``name`` at ``parameters`` is, or would be, stored."""
        return self.directory / name / f"{self.key(name, parameters, device=device)}.pt"

    def get_or_compute(
        self,
        name: str,
        parameters: dict,
        compute: Callable[[], T],
        *,
        device=None,
    ) -> T:
        """The stored result of ``name`` at ``parameters``, or ``compute()`` stored.

        Args:
            name: the experiment, lower-case letters, digits, ``_`` and ``-``; its
                entries share the folder ``DIRECTORY/name``.
            parameters: everything the result depends on beyond eomlib's code.
            compute: makes the result, without arguments; anything ``torch.save``
                stores (tensors, dicts of them, numbers, eomlib's dataclasses).
            device: the device the result is computed on; part of the key.

        Returns:
            What ``compute()`` returned, computed now or loaded bit for bit.
        """
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"cache name must be lower-case letters, digits, '_' or '-'; "
                f"got {name!r}"
            )
        if not self.enabled:
            return compute()
        key = self.key(name, parameters, device=device)
        path = self.directory / name / f"{key}.pt"

        found, value, seconds = self._load(path, key)
        # The ranks of a distributed run all load, or all compute together.
        if distributed.all_agree(found):
            log.info("cache hit %s %s: saved %.2f s", name, key[:12], seconds)
            return value

        start = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - start
        if distributed.rank() == 0:
            self._store(path, key, value, seconds, name, parameters, device)
        log.info("cache miss %s %s: computed in %.2f s", name, key[:12], seconds)
        return value

    def _record(self, name, parameters, device) -> dict:
        record = {
            "name": name,
            "parameters": canonical(parameters),
            "device": None if device is None else str(device),
            "torch": torch.__version__,
            "code": code_version(),
        }
        ranks = distributed.world_size()
        if ranks > 1:
            # Each rank has its own GPU; the entry is the run's, by kind of device.
            if device is not None:
                record["device"] = torch.device(device).type
            record["world_size"] = ranks
        return record

    def _load(self, path: Path, key: str) -> tuple[bool, Any, float]:
        if not path.exists():
            return False, None, 0.0
        try:
            # weights_only=False unpickles arbitrary objects: safe here only because
            # these files are written by this module, in a folder of our own.
            entry = torch.load(path, weights_only=False, map_location=_this_ranks_gpu())
            if entry["key"] != key or entry["format"] != _FORMAT:
                raise ValueError(f"it holds the entry {entry['key'][:12]}")
            return True, entry["value"], entry["seconds"]
        except Exception as error:  # whatever makes it unreadable, it is recomputed
            log.warning(
                "cache entry %s is unreadable (%s: %s); recomputing it",
                path,
                type(error).__name__,
                error,
            )
            return False, None, 0.0

    def _store(self, path, key, value, seconds, name, parameters, device) -> None:
        entry = {"format": _FORMAT, "key": key, "seconds": seconds, "value": value}
        record = self._record(name, parameters, device) | {"seconds": seconds}
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda file: torch.save(entry, file))
        _atomic_write(
            path.with_suffix(".json"),
            lambda file: file.write((json.dumps(record, indent=2) + "\n").encode()),
        )


def _this_ranks_gpu() -> torch.device | None:
    """Where a rank of a distributed run on GPUs loads an entry: its own GPU, not
    the one rank 0 stored it from; None (as stored) otherwise."""
    if distributed.world_size() > 1 and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _atomic_write(path: Path, write: Callable) -> None:
    """Write through ``write(file)`` into a temporary file beside ``path``, then
    move it onto ``path`` in one step; on any error the temporary file is removed."""
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def cached(
    name: str,
    parameters: dict,
    compute: Callable[[], T],
    *,
    device=None,
    directory: str | Path | None = None,
) -> T:
    """``compute()``, or its result stored under ``name`` and ``parameters``.

    A shorthand for ``Cache(directory).get_or_compute(name, parameters, compute,
    device=device)``, with the folder and switch read from the environment at
    each call; see :class:`Cache`.

    Example:
        >>> import tempfile
        >>> cache = Cache(tempfile.mkdtemp(), enabled=True)
        >>> cache.get_or_compute("square", {"x": 3}, lambda: 3**2)
        9
        >>> cache.get_or_compute("square", {"x": 3}, lambda: -1)  # loaded, not run
        9
    """
    return Cache(directory).get_or_compute(name, parameters, compute, device=device)
