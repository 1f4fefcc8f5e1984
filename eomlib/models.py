"""Networks built from a seed, and their full-batch losses as functions of params.

A network is driven through ``torch.func.functional_call`` with its buffers, so that
its loss is a plain function of a dict of parameters that torch.func can
differentiate. The module itself is never changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from eomlib._checks import check_choice, check_int, resolve_device, resolve_dtype
from eomlib.data import Dataset, load_dataset
from eomlib.derivatives import Loss

ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus}


def _mlp(
    in_features: int,
    num_classes: int,
    hidden: Sequence[int] = (32,),
    activation: str = "tanh",
) -> nn.Module:
    check_choice(activation, "activation", ACTIVATIONS)
    widths = [in_features, *(check_int(w, "hidden width", 1) for w in hidden)]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def _cnn(
    in_features: int,
    num_classes: int,
    channels: int = 4,
    activation: str = "tanh",
) -> nn.Module:
    """A small convolutional network for square one-channel images given flat."""
    check_choice(activation, "activation", ACTIVATIONS)
    side = int(round(in_features**0.5))
    if side * side != in_features:
        raise ValueError(
            f"model 'cnn' needs square one-channel images; got {in_features} features"
        )
    check_int(channels, "channels", minimum=1)
    pooled = side // 2
    return nn.Sequential(
        nn.Unflatten(1, (1, side, side)),
        nn.Conv2d(1, channels, kernel_size=3, padding=1),
        ACTIVATIONS[activation](),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * pooled * pooled, num_classes),
    )


MODELS = {"mlp": _mlp, "cnn": _cnn}


def make_model(
    name: str,
    in_features: int,
    num_classes: int,
    *,
    seed: int = 0,
    dtype="float64",
    device="cpu",
    **options,
) -> nn.Module:
    """Build a network of ``MODELS`` with weights drawn from ``seed``.

    The weights are drawn in float32 on the CPU and then converted, so one seed gives
    the same network (up to rounding) on every device and dtype. The global random
    state is left as it was.

    Example:
        >>> model = make_model("mlp", 64, 10, seed=0, hidden=(16,))
        >>> sum(p.numel() for p in model.parameters())
        1210
    """
    check_choice(name, "model", MODELS)
    check_int(seed, "seed")
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[name](in_features, num_classes, **options)
    return model.to(dtype=dtype, device=device)


def make_loss(model: nn.Module, data: Dataset) -> Loss:
    """The mean cross-entropy of ``model`` over all of ``data``, as ``loss(params)``.

    ``params`` is a dict with the names of ``model.named_parameters()``. The buffers
    are copied once, so evaluating the loss never changes the module.
    """
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

    def loss(params):
        logits = functional_call(model, (params, buffers), (data.X,))
        return nn.functional.cross_entropy(logits, data.y)

    return loss


def initial_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the module's parameters, as a dict by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@dataclass
class Problem:
    """A network on a data set: its loss as a function of params, and where to start."""

    model: nn.Module
    data: Dataset
    loss: Loss
    params: dict[str, torch.Tensor]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())


def make_problem(
    model: str = "mlp",
    dataset: str = "digits",
    *,
    seed: int = 0,
    num_samples: int | None = None,
    dtype="float64",
    device="cpu",
    **model_options,
) -> Problem:
    """Load ``dataset``, build ``model`` from ``seed`` and form the full-batch loss."""
    check_choice(model, "model", MODELS)
    data = load_dataset(dataset, num_samples=num_samples, dtype=dtype, device=device)
    network = make_model(
        model,
        data.in_features,
        data.num_classes,
        seed=seed,
        dtype=dtype,
        device=device,
        **model_options,
    )
    return Problem(network, data, make_loss(network, data), initial_params(network))
