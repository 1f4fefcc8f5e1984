"""Gradients and Hessian-vector products of a scalar loss, through torch.func.

The Hessian is never formed. Forward over reverse differentiates the gradient along
``v`` in one forward-mode pass, ``H v = d/ds grad(params + s v) at s = 0``, which costs
about three gradients. Reverse over reverse takes the vector-Jacobian product of the
gradient instead (``v^T H``, which is ``H v`` because H is symmetric); it needs no
forward-mode rules, so it is the fallback for operations that lack one.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from torch import func

from eomlib import _tree
from eomlib._checks import check_choice, check_int
from eomlib._tree import Tree

log = logging.getLogger(__name__)

Loss = Callable[[Tree], torch.Tensor]

HVP_METHODS = ("auto", "forward", "reverse")

# Losses whose forward-mode pass failed once; they go straight to reverse mode.
_reverse_only: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grad(loss: Loss, params: Tree) -> Tree:
    """The gradient ``g = grad f(params)``, in the structure of ``params``."""
    return func.grad(loss)(params)


def hvp(loss: Loss, params: Tree, v: Tree, *, method: str = "auto") -> Tree:
    """The Hessian-vector product ``H v`` of a scalar ``loss`` at ``params``.

    Args:
        loss: a function of ``params`` returning a 0-d tensor.
        params: a tensor or a dict of tensors, as torch.func takes them.
        v: the vector, in the structure of ``params``.
        method: ``"forward"`` (forward over reverse), ``"reverse"`` (reverse over
            reverse) or ``"auto"``: forward, falling back to reverse with one logged
            notice when an operation of ``loss`` has no forward-mode rule.

    Returns:
        ``H v`` in the structure of ``params``.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> hvp(lambda x: 0.5 * x @ A @ x, torch.zeros(2), torch.tensor([1.0, 0.0]))
        tensor([2., 1.])
    """
    return grad_and_hvp(loss, params, v, method=method)[1]


def grad_and_hvp(
    loss: Loss, params: Tree, v: Tree, *, method: str = "auto"
) -> tuple[Tree, Tree]:
    """The gradient and ``H v`` together; forward over reverse gets both in one pass."""
    check_choice(method, "method", HVP_METHODS)
    _tree.check_same_structure(params, v, ("params", "v"))
    return _forward_or_reverse(
        loss,
        method,
        forward=lambda: func.jvp(func.grad(loss), (params,), (v,)),
        reverse=lambda: _grad_and_hvp_reverse(loss, params, v),
    )


def grad_derivative(
    loss: Loss, params: Tree, vectors: list[Tree], *, method: str = "auto"
) -> Tree:
    """The m-th derivative of the gradient along m vectors, ``D^m g[v_1, ..., v_m]``.

    One vector gives ``H v``; two give ``T(v_1, v_2)``, the third derivative of the
    loss contracted twice. Each vector adds one level of nested differentiation of the
    gradient: forward mode (``jvp``) by default; reverse mode (``vjp``, valid because
    every derivative of a gradient is symmetric) with ``method="reverse"`` or as the
    fallback of ``"auto"``.
    """
    check_choice(method, "method", HVP_METHODS)
    for i, v in enumerate(vectors):
        _tree.check_same_structure(params, v, ("params", f"vectors[{i}]"))
    if not vectors:
        return grad(loss, params)
    return _forward_or_reverse(
        loss,
        method,
        forward=lambda: _nested(loss, params, vectors, _forward_step),
        reverse=lambda: _nested(loss, params, vectors, _reverse_step),
    )


def _forward_or_reverse(loss: Loss, method: str, forward, reverse):
    """Run ``forward``, or ``reverse`` when asked to or when forward mode fails for
    want of a rule (then once more with a logged notice, and for good for ``loss``)."""
    if method == "reverse" or (method == "auto" and loss in _reverse_only):
        return reverse()
    try:
        return forward()
    except (NotImplementedError, RuntimeError) as error:
        if method == "forward" or not _lacks_forward_rule(error):
            raise
        log.warning(
            "forward-mode AD failed for this loss (%s); using reverse mode for its "
            "second and higher derivatives from now on",
            str(error).splitlines()[0],
        )
        _remember_reverse_only(loss)
        return reverse()


def _forward_step(fn, v):
    return lambda p: func.jvp(fn, (p,), (v,))[1]


def _reverse_step(fn, v):
    return lambda p: func.vjp(fn, p)[1](v)[0]


def _nested(loss, params, vectors, step):
    fn = func.grad(loss)
    for v in vectors:
        fn = step(fn, v)
    return fn(params)


def _grad_and_hvp_reverse(loss: Loss, params: Tree, v: Tree) -> tuple[Tree, Tree]:
    g, pullback = func.vjp(func.grad(loss), params)
    return g, pullback(v)[0]


def _lacks_forward_rule(error: Exception) -> bool:
    message = str(error).lower()
    return any(
        phrase in message
        for phrase in ("forward ad", "forward-mode", "forward mode", "jvp function")
    )


def _remember_reverse_only(loss: Loss) -> None:
    try:
        _reverse_only[loss] = True
    except TypeError:  # NOTE: objects without weak references are not remembered
        pass


def top_eigenvalue(
    loss: Loss,
    params: Tree,
    *,
    num_iters: int = 100,
    rtol: float = 1e-6,
    seed: int = 0,
) -> float:
    """The Hessian's eigenvalue of largest magnitude, by power iteration on ``hvp``.

    Stops when the Rayleigh quotient changes by less than ``rtol`` relative to itself
    between two iterations, or after ``num_iters`` products.
    """
    check_int(num_iters, "num_iters", minimum=1)
    generator = torch.Generator().manual_seed(seed)
    v = _tree.tree_map(
        lambda p: torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device),
        params,
    )
    v = _tree.scale(1.0 / _tree.dot(v, v).sqrt(), v)
    eigenvalue = None
    for _ in range(num_iters):
        hv = hvp(loss, params, v)
        new = _tree.dot(v, hv).item()
        v = _tree.scale(1.0 / _tree.dot(hv, hv).sqrt(), hv)
        if eigenvalue is not None and abs(new - eigenvalue) <= rtol * abs(new):
            return new
        eigenvalue = new
    return eigenvalue
