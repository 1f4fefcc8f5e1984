"""The data layer: digits ships inside a package; other names fail clearly."""

import importlib.util

import pytest
import torch

import eomlib


def test_digits_are_the_whole_real_data_set_scaled_to_unit_range():
    data = eomlib.load_dataset("digits")
    assert data.X.shape == (1797, 64) and data.y.shape == (1797,)
    assert data.X.dtype == torch.float64 and data.y.dtype == torch.long
    assert data.X.min().item() == 0.0 and data.X.max().item() == 1.0
    assert data.num_classes == 10 and set(data.y.tolist()) == set(range(10))


def test_num_samples_keeps_the_first_examples():
    whole, part = (
        eomlib.load_dataset("digits"),
        eomlib.load_dataset("digits", num_samples=10),
    )
    torch.testing.assert_close(part.X, whole.X[:10])
    assert len(part) == 10


def test_an_unknown_dataset_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown dataset 'digitz'; allowed: cifar10, digits, mnist"
    ):
        eomlib.load_dataset("digitz")


def test_mnist_without_torchvision_says_what_to_install(monkeypatch):
    # The benchmark's peers bring torchvision along; hide it as a machine without it.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "torchvision" else find_spec(name, *args),
    )
    with pytest.raises(ImportError, match="needs torchvision.*pip install torchvision"):
        eomlib.load_dataset("mnist")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "int32"}, "unknown dtype 'int32'; allowed: float32, float64"),
        ({"device": "tpu"}, "unknown device 'tpu'; allowed: auto, cpu, cuda"),
        ({"num_samples": 0}, "num_samples must be an integer >= 1; got num_samples=0"),
    ],
)
def test_bad_arguments_are_named_in_the_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        eomlib.load_dataset("digits", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_at_once():
    with pytest.raises(ValueError, match="device='cuda'.*no CUDA GPU.*'auto' or 'cpu'"):
        eomlib.load_dataset("digits", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_digits_load_onto_the_gpu():
    assert eomlib.load_dataset("digits", device="cuda").X.is_cuda
