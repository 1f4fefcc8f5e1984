"""Networks built from a seed, and their full-batch losses as functions of params.

A network's loss is a plain function of a dict of parameters, which torch.autograd
and torch.func can both differentiate. An ``nn.Sequential`` of the layers used here
runs layer by layer through their functional forms, any other module through
``torch.func.functional_call``; the module itself is never changed. The ``bn_``
networks put a BatchNorm after every hidden layer, whose weights are then
scale-invariant; in every network the last linear layer feeds the softmax, and is
translation-invariant.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.func import functional_call

from eomlib import distributed
from eomlib._checks import (
    check_choice,
    check_int,
    check_lr,
    resolve_device,
    resolve_dtype,
)
from eomlib.data import Dataset, load_dataset
from eomlib.derivatives import Loss

ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus}

# BatchNorm divides by sqrt(var + eps), which makes the weights before it
# scale-invariant only up to a relative eps / var. PyTorch refuses eps = 0, so the
# networks here use an eps far below what float64 resolves in var.
NORM_EPS = 1e-20


def _mlp(
    in_features: int,
    num_classes: int,
    hidden: Sequence[int] = (32,),
    activation: str = "tanh",
    batch_norm: bool = False,
    norm_eps: float = NORM_EPS,
) -> nn.Module:
    """Linear layers and activations; with ``batch_norm``, each hidden linear layer
    loses its bias and feeds a ``BatchNorm1d``, which makes its weight
    scale-invariant."""
    check_choice(activation, "activation", ACTIVATIONS)
    widths = [in_features, *(check_int(w, "hidden width", 1) for w in hidden)]
    if batch_norm:
        check_lr(norm_eps, "norm_eps")
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(fan_in, fan_out, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(fan_out, eps=norm_eps))
        layers.append(ACTIVATIONS[activation]())
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def _cnn(
    in_features: int,
    num_classes: int,
    channels: int = 4,
    activation: str = "tanh",
    blocks: int = 1,
    batch_norm: bool = False,
    norm_eps: float = NORM_EPS,
) -> nn.Module:
    """A convolutional network for square one-channel images given flat.

    Each of ``blocks`` blocks is a 3x3 convolution, an activation and a 2x2 average
    pooling; the channels double from one block to the next. With ``batch_norm``,
    each convolution loses its bias and feeds a ``BatchNorm2d``.
    """
    check_choice(activation, "activation", ACTIVATIONS)
    check_int(channels, "channels", minimum=1)
    check_int(blocks, "blocks", minimum=1)
    if batch_norm:
        check_lr(norm_eps, "norm_eps")
    side = int(round(in_features**0.5))
    if side * side != in_features:
        raise ValueError(
            "a convolutional network here needs square one-channel images; got "
            f"{in_features} features"
        )
    if side >> blocks == 0:
        raise ValueError(
            f"{blocks} pooling blocks shrink {side}x{side} images to nothing; "
            f"use blocks <= {side.bit_length() - 1}"
        )
    layers: list[nn.Module] = [nn.Unflatten(1, (1, side, side))]
    fan_in = 1
    for block in range(blocks):
        fan_out = channels * 2**block
        layers.append(
            nn.Conv2d(fan_in, fan_out, kernel_size=3, padding=1, bias=not batch_norm)
        )
        if batch_norm:
            layers.append(nn.BatchNorm2d(fan_out, eps=norm_eps))
        layers += [ACTIVATIONS[activation](), nn.AvgPool2d(2)]
        fan_in, side = fan_out, side // 2
    layers += [nn.Flatten(), nn.Linear(fan_in * side * side, num_classes)]
    return nn.Sequential(*layers)


MODELS = {
    "mlp": _mlp,
    "cnn": _cnn,
    "bn_mlp": partial(_mlp, batch_norm=True),
    "bn_cnn": partial(_cnn, batch_norm=True),
}


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


def make_loss(model: nn.Module, data: Dataset, *, distributed: bool = False) -> Loss:
    """The mean cross-entropy of ``model`` over all of ``data``, as ``loss(params)``.

    ``params`` is a dict with the names of ``model.named_parameters()``. The loss runs
    a private copy of the module, so evaluating or differentiating it never changes
    ``model``, its buffers or its mode. In that copy every BatchNorm layer normalises
    with the statistics of the full batch, as in training mode, and keeps no running
    statistics, so the loss is a deterministic function of ``params`` that every
    torch.func transform, ``vmap`` included, can take.

    With BatchNorm the loss comes in two versions of the same value. The loss itself
    writes each BatchNorm as :class:`BatchNormFromPrimitives`, whose derivatives are
    right at every order. Its attribute ``second_order`` runs PyTorch's fused
    ``batch_norm`` instead, whose first and second derivatives are right and faster
    but whose third and higher are not; ``eomlib`` takes gradients and
    Hessian-vector products from it (see :func:`eomlib.derivatives.for_second_order`).

    With ``distributed=True`` (in a process group that :func:`eomlib.distributed.init`
    joined) each rank evaluates its own contiguous shard of ``data``, of which the
    loss keeps a copy, and the loss is the sum over the ranks divided by
    ``len(data)``: the same function, with the same derivatives of every order, on
    every rank. Each BatchNorm then normalises with the statistics of the whole
    batch, summed over the ranks as well; such a loss has no ``second_order``
    version, since the fused kernel cannot sum across processes. Any other operation
    that mixes examples (a module of your own that centres the batch) sees only its
    rank's shard: the sum over the ranks is exact for what is a sum over examples.
    """
    if distributed:
        return _sharded_loss(model, data)
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return _loss_of(copy.deepcopy(model), data)
    loss = _loss_of(
        _with_batch_norms(copy.deepcopy(model), BatchNormFromPrimitives), data
    )
    loss.second_order = _loss_of(
        _with_batch_norms(copy.deepcopy(model), BatchStatisticsNorm), data
    )
    return loss


def _loss_of(private: nn.Module, data: Dataset) -> Loss:
    names = {name for name, _ in private.named_parameters()}
    forward = _layer_by_layer(private) or partial(functional_call, private)

    def loss(params):
        _check_names(params, names)
        logits = forward(params, (data.X,))
        return nn.functional.cross_entropy(logits, data.y)

    return loss


def _sharded_loss(model: nn.Module, data: Dataset) -> Loss:
    """This rank's part of the full-batch loss, summed over the ranks inside."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise distributed.DistributedError(
            "make_loss(..., distributed=True) shards the data over a process group, "
            "and this process has joined none: call eomlib.distributed.init first"
        )
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise ValueError(
            "a sharded loss synchronises the BatchNorms inside a network; a "
            "BatchNorm that is the whole model is not supported"
        )
    start, stop = distributed.shard_bounds(len(data), distributed.world_size())[
        distributed.rank()
    ]
    # Copies, so that the loss does not keep the whole data set alive.
    X, y, total = data.X[start:stop].clone(), data.y[start:stop].clone(), len(data)
    private = copy.deepcopy(model)
    for _, child in list(private.named_modules()):
        for attribute, grandchild in list(child.named_children()):
            if isinstance(grandchild, nn.modules.batchnorm._BatchNorm):
                setattr(child, attribute, SyncedBatchNorm(grandchild, total))
    names = {name for name, _ in private.named_parameters()}
    forward = _layer_by_layer(private) or partial(functional_call, private)

    def loss(params):
        _check_names(params, names)
        logits = forward(distributed.replicate_tree(params), (X,))
        summed = nn.functional.cross_entropy(logits, y, reduction="sum")
        return distributed.sum_over_ranks(summed) / total

    return loss


def _check_names(params, names) -> None:
    if params.keys() != names:
        raise KeyError(
            f"params must name exactly the model's parameters; missing "
            f"{sorted(names - params.keys())}, unknown "
            f"{sorted(params.keys() - names)}"
        )


def _layer_by_layer(module: nn.Module):
    """``(params, (x,)) -> module(x)`` for an ``nn.Sequential`` of the layers that
    the networks here use, each called as its functional form; None for any other
    module, which then runs through ``functional_call``.

    It computes what ``functional_call`` computes, without swapping the params into
    the module and back on every call. A layer that appears twice (shared weights)
    or carries a hook sends the module to ``functional_call``, and so does any
    global module hook registered when the loss is called.
    """
    if type(module) is not nn.Sequential or _has_hooks(module):
        return None
    steps, seen = [], set()
    for name, layer in module._modules.items():
        kind = type(layer)
        if layer is None or id(layer) in seen or _has_hooks(layer):
            return None
        seen.add(id(layer))
        if kind is nn.Linear:
            steps.append(partial(_linear, f"{name}.weight", _bias_name(layer, name)))
        elif kind is nn.Conv2d and layer.padding_mode == "zeros":
            steps.append(
                partial(_conv2d, layer, f"{name}.weight", _bias_name(layer, name))
            )
        elif kind in (BatchNormFromPrimitives, BatchStatisticsNorm, SyncedBatchNorm):
            steps.append(partial(_batch_norm, layer, name))
        elif (
            kind in _STATELESS
            and not any(True for _ in layer.parameters())
            and (not any(True for _ in layer.buffers()))
        ):
            steps.append(partial(_stateless, layer))
        else:
            return None
    through_module = partial(functional_call, module)

    def forward(params, args):
        if _global_hooks():
            return through_module(params, args)
        (x,) = args
        for step in steps:
            x = step(params, x)
        return x

    return forward


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _global_hooks() -> bool:
    hooks = nn.modules.module
    return bool(
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


_STATELESS = (
    *ACTIVATIONS.values(),
    nn.AvgPool2d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
)


def _bias_name(layer, name):
    return None if layer.bias is None else f"{name}.bias"


def _linear(weight, bias, params, x):
    return nn.functional.linear(x, params[weight], bias and params[bias])


def _conv2d(layer, weight, bias, params, x):
    return nn.functional.conv2d(
        x,
        params[weight],
        bias and params[bias],
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
    )


def _batch_norm(layer, name, params, x):
    if layer.weight is None:
        return layer.normalize(x)
    return layer.normalize(x, params[f"{name}.weight"], params[f"{name}.bias"])


def _stateless(layer, params, x):
    return layer(x)


class BatchStatisticsNorm(nn.Module):
    """Training-mode batch normalisation without running statistics, through
    PyTorch's fused ``batch_norm``, whose first and second derivatives are right and
    third and higher wrong; :class:`BatchNormFromPrimitives` replaces the kernel."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, self.weight, self.bias)

    def normalize(self, x, weight=None, bias=None) -> torch.Tensor:
        return nn.functional.batch_norm(
            x, None, None, weight, bias, training=True, momentum=0.0, eps=self.eps
        )


class BatchNormFromPrimitives(BatchStatisticsNorm):
    """Training-mode batch normalisation written with elementary operations.

    Its value is that of ``nn.BatchNorm1d/2d/3d`` in training mode: each channel is
    centred and divided by ``sqrt(var + eps)``, with the mean and the biased variance
    of the batch, then scaled and shifted by the module's own ``weight`` and
    ``bias``. It exists for its derivatives: PyTorch's fused ``batch_norm`` gives
    correct first and second derivatives but wrong third and higher ones, in both
    reverse and forward mode (pytorch/pytorch#186256 and #196699), and the counter
    terms need them all.
    """

    def normalize(self, x, weight=None, bias=None) -> torch.Tensor:
        """``x`` normalised per channel, then scaled by ``weight`` and shifted by
        ``bias`` when they are given."""
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - x.mean(dims, keepdim=True)
        var = centred.pow(2).mean(dims, keepdim=True)
        out = centred * torch.rsqrt(var + self.eps)
        if weight is not None:
            out = out * weight.view(shape) + bias.view(shape)
        return out


class SyncedBatchNorm(BatchNormFromPrimitives):
    """:class:`BatchNormFromPrimitives` over a batch sharded across ranks.

    Each channel's mean and variance are those of all ``num_samples`` examples: the
    per-rank sums are added over the ranks by :func:`eomlib.distributed.all_reduce`,
    whose derivatives of every order are sums over the ranks too. It exists only
    inside a loss of ``make_loss(..., distributed=True)``.
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, num_samples: int):
        super().__init__(norm)
        self.num_samples = num_samples

    def normalize(self, x, weight=None, bias=None) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = self.num_samples * x[0, 0].numel()
        mean = distributed.all_reduce(x.sum(dims, keepdim=True)) / count
        centred = x - mean
        var = distributed.all_reduce(centred.pow(2).sum(dims, keepdim=True)) / count
        out = centred * torch.rsqrt(var + self.eps)
        if weight is not None:
            out = out * weight.view(shape) + bias.view(shape)
        return out


def _with_batch_norms(module: nn.Module, kind: type) -> nn.Module:
    """``module`` with each BatchNorm swapped, in place, for ``kind`` of it."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, kind(child))
        else:
            _with_batch_norms(child, kind)
    return module


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
    distributed: bool = False,
    **model_options,
) -> Problem:
    """Load ``dataset``, build ``model`` from ``seed`` and form the full-batch loss.

    With ``distributed=True`` the loss is sharded over the ranks of the process group
    (see :func:`make_loss`); the data, the network and the parameters are the same on
    every rank, whatever the number of ranks. ``Problem.data`` is then still the
    whole data set, loaded on every rank: the computation is sharded, the data's
    memory is not.
    """
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
    loss = make_loss(network, data, distributed=distributed)
    return Problem(network, data, loss, initial_params(network))
