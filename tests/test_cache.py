"""The result cache: hits and misses, keys, atomic writes, bad entries, resuming."""

import logging
import shutil
from pathlib import Path

import pytest
import torch

import eomlib
from eomlib import cache as cache_module
from eomlib.cache import Cache


class Counter:
    """A compute function that counts its calls and returns ``value``."""

    def __init__(self, value=1.0):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


@pytest.fixture
def cache(tmp_path):
    return Cache(tmp_path / "cache", enabled=True)


def test_a_second_call_loads_the_result_instead_of_computing(cache):
    compute = Counter({"x": torch.arange(3.0)})
    first = cache.get_or_compute("square", {"n": 3}, compute)
    second = cache.get_or_compute("square", {"n": 3}, compute)
    assert compute.calls == 1
    assert torch.equal(first["x"], second["x"])
    assert cache.path("square", {"n": 3}).exists()
    assert cache.path("square", {"n": 3}).with_suffix(".json").exists()


def test_a_changed_parameter_misses_while_the_others_hit(cache):
    computes = {lr: Counter(lr) for lr in (0.1, 0.2, 0.3)}
    for lr, compute in computes.items():
        cache.get_or_compute("run", {"lr": lr, "steps": 5}, compute)
    changed = Counter()
    cache.get_or_compute("run", {"lr": 0.2, "steps": 6}, changed)
    for lr, compute in computes.items():
        assert cache.get_or_compute("run", {"lr": lr, "steps": 5}, compute) == lr
    assert changed.calls == 1
    assert all(compute.calls == 1 for compute in computes.values())


def test_another_name_or_device_is_another_entry(cache):
    compute = Counter()
    cache.get_or_compute("a", {"n": 1}, compute)
    cache.get_or_compute("b", {"n": 1}, compute)
    cache.get_or_compute("a", {"n": 1}, compute, device="cpu")
    cache.get_or_compute("a", {"n": 1}, compute, device=torch.device("cpu"))
    assert compute.calls == 3


def test_a_changed_code_hash_misses(cache, monkeypatch):
    compute = Counter()
    cache.get_or_compute("run", {"n": 1}, compute)
    monkeypatch.setattr(cache_module, "code_version", lambda: "edited eomlib")
    cache.get_or_compute("run", {"n": 1}, compute)
    assert compute.calls == 2


def test_the_code_hash_changes_with_any_module_and_only_then(tmp_path):
    package = Path(eomlib.__file__).parent
    copy = shutil.copytree(
        package, tmp_path / "eomlib", ignore=shutil.ignore_patterns("__pycache__")
    )
    cache_module.code_version.cache_clear()
    assert cache_module.code_version(copy) == cache_module.code_version()
    (copy / "flows.py").write_text((copy / "flows.py").read_text() + "\n# edit\n")
    cache_module.code_version.cache_clear()
    assert cache_module.code_version(copy) != cache_module.code_version()


def test_keys_ignore_dict_order_and_tuple_or_list_but_not_int_or_float(cache):
    key = cache.key("run", {"a": 1, "b": (1, 2), "dtype": torch.float64})
    assert key == cache.key("run", {"b": [1, 2], "dtype": "torch.float64", "a": 1})
    assert key != cache.key("run", {"a": 1.0, "b": [1, 2], "dtype": torch.float64})


def test_a_tensor_parameter_enters_the_key_by_its_content(cache):
    x = torch.linspace(0, 1, 5, dtype=torch.float64)
    assert cache.key("run", {"x": x}) == cache.key("run", {"x": x.clone()})
    assert cache.key("run", {"x": x}) != cache.key("run", {"x": x + 1e-16 * x})
    assert cache.key("run", {"x": x}) != cache.key("run", {"x": x.float()})


def test_a_parameter_without_a_stable_text_is_refused(cache):
    with pytest.raises(TypeError, match=r"parameters\['f'\] must be a JSON value"):
        cache.key("run", {"f": lambda: 0})


def test_a_bad_name_is_refused(cache):
    with pytest.raises(ValueError, match="cache name must be"):
        cache.get_or_compute("../escape", {}, Counter())


def test_a_dataclass_of_tensors_comes_back_bit_for_bit(cache):
    problem = eomlib.make_problem("mlp", num_samples=50, hidden=[4], dtype="float64")
    comparison = eomlib.compare_with_gd(problem.loss, problem.params, 0.1, 3)
    loaded = cache.get_or_compute("c", {}, lambda: comparison)
    loaded = cache.get_or_compute("c", {}, Counter())
    assert isinstance(loaded, eomlib.Comparison) and loaded.lr == comparison.lr
    assert all(torch.equal(loaded.gd[n], comparison.gd[n]) for n in comparison.gd)
    for order, distances in comparison.distances.items():
        assert torch.equal(loaded.distances[order], distances)


def _crash_while_saving(monkeypatch):
    """Make torch.save write half an entry, then fail as a killed run would."""

    def save(entry, file):
        file.write(b"PK\x03\x04 half of a zip archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module.torch, "save", save)


def test_a_crash_while_writing_leaves_no_entry(cache, monkeypatch):
    path = cache.path("run", {"n": 1})
    with monkeypatch.context() as patch:
        _crash_while_saving(patch)
        with pytest.raises(KeyboardInterrupt):
            cache.get_or_compute("run", {"n": 1}, Counter())
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # the temporary file is gone too
    compute = Counter(2.0)
    assert cache.get_or_compute("run", {"n": 1}, compute) == 2.0
    assert compute.calls == 1


def test_a_crash_while_overwriting_leaves_the_old_entry(cache, monkeypatch):
    cache.get_or_compute("run", {"n": 1}, Counter(1.0))
    path = cache.path("run", {"n": 1})
    old = path.read_bytes()
    with monkeypatch.context() as patch:
        _crash_while_saving(patch)
        with pytest.raises(KeyboardInterrupt):
            cache_module._atomic_write(path, lambda file: torch.save({}, file))
    assert path.read_bytes() == old
    assert cache.get_or_compute("run", {"n": 1}, Counter(2.0)) == 1.0


def test_a_temporary_file_left_by_a_killed_run_is_never_read(cache):
    path = cache.path("run", {"n": 1})
    path.parent.mkdir(parents=True)
    stray = path.parent / f".{path.name}.abc123.tmp"
    stray.write_bytes(b"PK\x03\x04 half of a zip archive")
    compute = Counter(3.0)
    assert cache.get_or_compute("run", {"n": 1}, compute) == 3.0
    assert compute.calls == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(b"not a torch file"),
        lambda path: path.write_bytes(path.read_bytes()[:100]),
        lambda path: path.write_bytes(b""),
    ],
    ids=["garbage", "truncated", "empty"],
)
def test_a_corrupt_entry_is_recomputed_with_a_warning(cache, caplog, damage):
    cache.get_or_compute("run", {"n": 1}, Counter(1.0))
    damage(cache.path("run", {"n": 1}))
    compute = Counter(1.0)
    with caplog.at_level(logging.WARNING, logger="eomlib.cache"):
        assert cache.get_or_compute("run", {"n": 1}, compute) == 1.0
    assert compute.calls == 1
    assert "unreadable" in caplog.text and "recomputing" in caplog.text
    assert cache.get_or_compute("run", {"n": 1}, compute) == 1.0  # repaired
    assert compute.calls == 1


def test_an_entry_moved_under_another_key_is_recomputed(cache):
    cache.get_or_compute("run", {"n": 1}, Counter(1.0))
    shutil.copy(cache.path("run", {"n": 1}), cache.path("run", {"n": 2}))
    compute = Counter(2.0)
    assert cache.get_or_compute("run", {"n": 2}, compute) == 2.0
    assert compute.calls == 1


def test_cache_off_computes_every_time_and_stores_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EOMLIB_CACHE", "off")
    monkeypatch.setenv("EOMLIB_CACHE_DIR", str(tmp_path / "cache"))
    compute = Counter()
    for _ in range(2):
        eomlib.cached("run", {"n": 1}, compute)
    assert compute.calls == 2
    assert not (tmp_path / "cache").exists()


def test_the_environment_moves_the_cache_and_the_default_is_under_cwd(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("EOMLIB_CACHE", raising=False)
    monkeypatch.setenv("EOMLIB_CACHE_DIR", str(tmp_path / "moved"))
    eomlib.cached("run", {"n": 1}, Counter())
    assert len(list((tmp_path / "moved" / "run").glob("*.pt"))) == 1

    monkeypatch.delenv("EOMLIB_CACHE_DIR")
    monkeypatch.chdir(tmp_path)
    assert Cache().directory == tmp_path / ".cache" / "eomlib"


def test_a_bad_switch_value_is_refused(monkeypatch):
    monkeypatch.setenv("EOMLIB_CACHE", "of")
    with pytest.raises(ValueError, match="EOMLIB_CACHE must be one of .*got 'of'"):
        Cache()


LRS = [0.025, 0.05, 0.1, 0.2, 0.4]


def _comparisons(cache, problem, compute_counter, fail_at=None):
    """One entry per learning rate, as a chapter caches its loop."""
    results = []
    for i, lr in enumerate(LRS):

        def compute(lr=lr, i=i):
            compute_counter.append(lr)
            if i == fail_at:
                raise RuntimeError(f"interrupted at lr={lr}")
            return eomlib.compare_with_gd(problem.loss, problem.params, lr, 4)

        results.append(cache.get_or_compute("resume", {"lr": lr}, compute))
    return results


def test_an_interrupted_loop_resumes_where_it_stopped_with_the_same_bits(tmp_path):
    problem = eomlib.make_problem("mlp", num_samples=50, hidden=[4], dtype="float64")
    cache = Cache(tmp_path / "cache", enabled=True)

    calls = []
    with pytest.raises(RuntimeError, match="interrupted at lr=0.1"):
        _comparisons(cache, problem, calls, fail_at=2)
    assert calls == LRS[:3]

    calls.clear()
    resumed = _comparisons(cache, problem, calls)
    assert calls == LRS[2:]  # the first two were loaded

    calls.clear()
    uninterrupted = _comparisons(Cache(enabled=False), problem, calls)
    assert calls == LRS
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a.lr == b.lr
        assert all(torch.equal(a.gd[n], b.gd[n]) for n in b.gd)
        assert all(torch.equal(a.distances[k], b.distances[k]) for k in b.distances)
