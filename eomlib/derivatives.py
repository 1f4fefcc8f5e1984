"""Gradients and Hessian-vector products of a scalar loss; the Hessian is never formed.

Two ways lead to ``H v``:

* reverse over reverse: build the gradient with its own autograd graph, then
  differentiate ``<g(params), v>`` once more. Run by ``torch.autograd`` directly it
  was the faster of the two on every case of the benchmark (the performance
  appendix has the figures), and one gradient graph serves any number of vectors.
* forward over reverse: push the tangent ``v`` through the gradient with
  ``torch.func.jvp``. By operation count it is at most about three gradients too.

``method="auto"`` takes reverse over reverse, and falls back to forward over reverse,
with one logged notice, for a loss with an operation that cannot be differentiated
twice in reverse mode. An operation whose backward is marked ``once_differentiable``
raises :class:`SecondDerivativeError`: autograd would report its second derivative
as zero. Inside a ``torch.func`` transform (``vmap``, ``grad``), or for
params that carry an autograd graph of the caller, every function here runs through
``torch.func`` instead, so it composes like any other torch function.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, func

from eomlib import _tree, distributed
from eomlib._checks import check_choice, check_int
from eomlib._tree import Tree

log = logging.getLogger(__name__)

Loss = Callable[[Tree], torch.Tensor]

HVP_METHODS = ("auto", "forward", "reverse")

# Losses whose reverse-over-reverse pass failed once; they go straight to forward mode.
_forward_only: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grad(loss: Loss, params: Tree) -> Tree:
    """The gradient ``g = grad f(params)``, in the structure of ``params``."""
    _tree.check_floating(params)
    loss = for_second_order(loss)
    if not autograd_applies(params):
        return func.grad(loss)(params)
    inputs = [leaf.detach() for leaf in _tree.leaves(params)]
    return _tree.rebuild(gradient_at(loss, inputs, params), params)


def gradient_at(loss: Loss, inputs: list[torch.Tensor], like: Tree) -> list[Tensor]:
    """The gradient of ``loss`` at the tensors ``inputs``, leaf by leaf: the one
    reverse pass of :func:`grad` with nothing around it, for loops that call it many
    times (the iterates field, GD). ``inputs`` are tensors without a graph, in the
    order of ``_tree.leaves(like)``; they are marked as requiring grad in place.
    ``loss`` is differentiated as given (no :func:`for_second_order`)."""
    for leaf in inputs:
        leaf.requires_grad_()
    with torch.enable_grad():
        value = loss(_tree.rebuild(inputs, like))
        if value.dim() != 0:
            raise ValueError(
                f"loss must return a 0-d tensor; got shape {tuple(value.shape)}"
            )
        if not value.requires_grad:
            return [torch.zeros_like(leaf) for leaf in inputs]
        result = torch.autograd.grad(value, inputs, allow_unused=True)
    return [
        torch.zeros_like(leaf) if r is None else r for r, leaf in zip(result, inputs)
    ]


def hvp(loss: Loss, params: Tree, v: Tree, *, method: str = "auto") -> Tree:
    """The Hessian-vector product ``H v`` of a scalar ``loss`` at ``params``.

    Args:
        loss: a function of ``params`` returning a 0-d tensor.
        params: a tensor or a dict of tensors, as torch.func takes them.
        v: the vector, in the structure of ``params``.
        method: ``"reverse"`` (reverse over reverse), ``"forward"`` (forward over
            reverse) or ``"auto"``: reverse, falling back to forward with one logged
            notice when an operation of ``loss`` has no double-backward rule.

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
    """The gradient and ``H v`` together, from one pass through the loss."""
    check_choice(method, "method", HVP_METHODS)
    _tree.check_floating(params)
    _tree.check_same_structure(params, v, ("params", "v"))
    loss = for_second_order(loss)
    return reverse_or_forward(
        loss,
        method,
        reverse=lambda: _grad_and_hvp_reverse(loss, params, v),
        forward=lambda: func.jvp(func.grad(loss), (params,), (v,)),
        params=params,
    )


def batched_hvp(
    loss: Loss, params: Tree, vectors: Tree, *, method: str = "auto"
) -> Tree:
    """``H v`` for many vectors at once: ``vectors`` has a leading batch axis.

    One gradient graph serves the whole batch, and the products run vectorised
    (``is_grads_batched`` in reverse mode, ``vmap`` in forward mode), so each vector
    costs well under one ``hvp``.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> batched_hvp(lambda x: 0.5 * x @ A @ x, torch.zeros(2), torch.eye(2))
        tensor([[2., 1.],
                [1., 3.]])
    """
    check_choice(method, "method", HVP_METHODS)
    _tree.check_floating(params)
    first = _tree.tree_map(lambda leaf: leaf[0], vectors)
    _tree.check_same_structure(params, first, ("params", "vectors[0]"))
    loss = for_second_order(loss)
    return reverse_or_forward(
        loss,
        method,
        reverse=lambda: _batched_hvp_reverse(loss, params, vectors),
        forward=lambda: func.vmap(
            lambda v: func.jvp(func.grad(loss), (params,), (v,))[1]
        )(vectors),
        params=params,
    )


def grad_derivative(
    loss: Loss, params: Tree, vectors: list[Tree], *, method: str = "auto"
) -> Tree:
    """The m-th derivative of the gradient along m vectors, ``D^m g[v_1, ..., v_m]``.

    One vector gives ``H v``; two give ``T(v_1, v_2)``, the third derivative of the
    loss contracted twice. Each vector adds one level of nested differentiation of the
    gradient: reverse mode (valid because every derivative of a gradient is
    symmetric) or, with ``method="forward"``, forward mode (``jvp``).
    """
    check_choice(method, "method", HVP_METHODS)
    _tree.check_floating(params)
    for i, v in enumerate(vectors):
        _tree.check_same_structure(params, v, ("params", f"vectors[{i}]"))
    if not vectors:
        return grad(loss, params)
    if len(vectors) == 1:
        loss = for_second_order(loss)
    return reverse_or_forward(
        loss,
        method,
        reverse=lambda: _grad_derivative_reverse(loss, params, vectors),
        forward=lambda: _nested(loss, params, vectors, _forward_step),
        params=params,
    )


def for_second_order(loss: Loss) -> Loss:
    """The version of ``loss`` to differentiate once or twice.

    A loss may carry, as its attribute ``second_order``, a faster function of the
    same value whose first and second derivatives are exact but whose higher ones
    need not be: the BatchNorm networks of :mod:`eomlib.models` do, through
    PyTorch's fused ``batch_norm``. Gradients and Hessian-vector products here go
    through it; third and higher derivatives through ``loss`` itself. A wrapper that
    drops the attribute loses speed, never exactness.
    """
    return getattr(loss, "second_order", loss)


class AutogradPoint:
    """The autograd graph of ``loss`` at ``params``: its gradient, kept as a
    differentiable function of params, and pullbacks through it.

    Each pullback ``D<outputs, vectors>`` of a graph-carrying output is one more
    reverse pass; with ``create_graph`` the result carries its own graph, so the
    derivatives of the gradient nest, and one graph serves any number of vectors.
    The vectors are detached first: they are constants of each derivative.
    """

    def __init__(self, loss: Loss, params: Tree):
        self.loss, self.like = loss, params
        self.inputs = [leaf.detach().requires_grad_() for leaf in _tree.leaves(params)]

    def tree(self, tensors: list[torch.Tensor], detach: bool = True) -> Tree:
        """``tensors`` in the structure of params, detached unless ``detach`` is
        false."""
        detached = [tensor.detach() for tensor in tensors] if detach else tensors
        return _tree.rebuild(detached, self.like)

    def gradient(self, create_graph: bool) -> list[torch.Tensor]:
        """The gradient, leaf by leaf; with ``create_graph`` it keeps its graph."""
        with torch.enable_grad():
            value = self.loss(_tree.rebuild(self.inputs, self.like))
            if value.dim() != 0:
                raise ValueError(
                    f"loss must return a 0-d tensor; got shape {tuple(value.shape)}"
                )
            if create_graph:
                _check_twice_differentiable(self.loss, value)
            return self.pullback(
                [value], [torch.ones_like(value)], create_graph, retain=create_graph
            )

    def pullback(
        self,
        outputs: list[torch.Tensor],
        vectors: list[torch.Tensor],
        create_graph: bool,
        *,
        batched: bool = False,
        retain: bool = True,
    ) -> list[torch.Tensor]:
        """The derivative of ``sum_i <outputs_i, vectors_i>`` with respect to params.

        With ``batched``, each vector has a leading batch axis and the result too.
        ``retain`` keeps the graph of ``outputs`` for further passes.
        """
        pairs = [(o, v.detach()) for o, v in zip(outputs, vectors) if o.requires_grad]
        if not pairs:
            return self._zeros(vectors, batched)
        try:
            with torch.enable_grad():
                result = torch.autograd.grad(
                    [o for o, _ in pairs],
                    self.inputs,
                    [v for _, v in pairs],
                    retain_graph=retain,
                    create_graph=create_graph,
                    allow_unused=True,
                    is_grads_batched=batched,
                )
        except RuntimeError as error:
            if "once_differentiable" in str(error):
                raise SecondDerivativeError(_ONCE_DIFFERENTIABLE) from error
            raise
        return [
            torch.zeros_like(x if not batched else _batched_like(x, vectors[0]))
            if r is None
            else r
            for r, x in zip(result, self.inputs)
        ]

    def _zeros(self, vectors, batched):
        if not batched:
            return [torch.zeros_like(x) for x in self.inputs]
        return [_batched_like(x, vectors[0]) for x in self.inputs]


def _batched_like(leaf: torch.Tensor, batched: torch.Tensor) -> torch.Tensor:
    return leaf.new_zeros((batched.shape[0], *leaf.shape))


def _check_twice_differentiable(loss: Loss, value: torch.Tensor) -> None:
    """Raise if the graph of ``value`` passes through an ``autograd.Function`` whose
    backward is marked ``once_differentiable``: autograd would report the second
    derivative through it as unused, a silent zero. Any other custom Function is
    trusted, as PyTorch's contract has it, to have a differentiable backward. A loss
    that passed is not walked again."""
    if _checked.get(loss, False):
        return
    for node in _graph(value):
        backward = getattr(getattr(node, "_forward_cls", None), "backward", None)
        if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE:
            raise SecondDerivativeError(_ONCE_DIFFERENTIABLE)
    _remember(_checked, loss, True)


def _graph(*outputs: torch.Tensor):
    """Every node of the autograd graph behind ``outputs``, once each."""
    seen, stack = set(), [output.grad_fn for output in outputs]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)


def _crosses_ranks(loss: Loss, gradient: list[torch.Tensor]) -> bool:
    """Whether the graph of ``loss``'s gradient passes through a collective of
    :mod:`eomlib.distributed`, which autograd's batched backward
    (``is_grads_batched``) cannot run; the answer is remembered for ``loss``."""
    if loss not in _crossing:
        collectives = distributed.COLLECTIVES
        found = any(
            getattr(node, "_forward_cls", None) in collectives
            for node in _graph(*gradient)
        )
        if not _remember(_crossing, loss, found):
            return found
    return _crossing[loss]


def _remember(table: weakref.WeakKeyDictionary, loss: Loss, value: bool) -> bool:
    """``table[loss] = value``; False for an object without weak references, which
    is then examined each time."""
    try:
        table[loss] = value
    except TypeError:
        return False
    return True


# Losses whose graph has been walked for once-differentiable operations, and for
# collectives across ranks.
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_crossing: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The code of the wrapper that ``once_differentiable`` puts around a backward.
_ONCE_DIFFERENTIABLE_CODE = torch.autograd.function.once_differentiable(
    lambda ctx: None
).__code__


class SecondDerivativeError(RuntimeError):
    """An operation of the loss cannot be differentiated twice, in any mode."""


_ONCE_DIFFERENTIABLE = (
    "an operation of this loss has a backward marked @once_differentiable, so the "
    "loss has no second derivative through autograd: reverse mode cannot take it, "
    "and forward over reverse would return zeros. Give the operation a "
    "differentiable backward (or a torch.func-ready autograd.Function)"
)


def autograd_applies(params: Tree) -> bool:
    """Whether torch.autograd can run directly: no torch.func transform is active,
    and params are not part of a graph of the caller's."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    if peek is None or peek() is not None:
        return False
    return not any(leaf.requires_grad for leaf in _tree.leaves(params))


def _grad_and_hvp_reverse(loss: Loss, params: Tree, v: Tree) -> tuple[Tree, Tree]:
    if not autograd_applies(params):
        g, pullback = func.vjp(func.grad(loss), params)
        return g, pullback(v)[0]
    point = AutogradPoint(loss, params)
    g = point.gradient(create_graph=True)
    return point.tree(g), point.tree(point.pullback(g, _tree.leaves(v), False))


def _batched_hvp_reverse(loss: Loss, params: Tree, vectors: Tree) -> Tree:
    if not autograd_applies(params):
        _, pullback = func.vjp(func.grad(loss), params)
        return func.vmap(lambda v: pullback(v)[0])(vectors)
    point = AutogradPoint(loss, params)
    g = point.gradient(create_graph=True)
    leaves = _tree.leaves(vectors)
    if _crosses_ranks(loss, g):
        # The all-reduce of a sharded loss cannot run inside autograd's batched
        # backward, so each vector takes its own pass through the one graph.
        rows = [
            point.pullback(g, [leaf[i] for leaf in leaves], False, retain=True)
            for i in range(leaves[0].shape[0])
        ]
        return point.tree([torch.stack(column) for column in zip(*rows)])
    return point.tree(point.pullback(g, leaves, False, batched=True))


def _grad_derivative_reverse(loss: Loss, params: Tree, vectors: list[Tree]) -> Tree:
    if not autograd_applies(params):
        return _nested(loss, params, vectors, _reverse_step)
    point = AutogradPoint(loss, params)
    outputs = point.gradient(create_graph=True)
    for i, v in enumerate(vectors):
        last = i == len(vectors) - 1
        outputs = point.pullback(outputs, _tree.leaves(v), create_graph=not last)
    return point.tree(outputs)


def reverse_or_forward(loss: Loss, method: str, reverse, forward, params=None):
    """Run ``reverse``, or ``forward`` when asked to or when reverse mode fails for
    want of a double-backward rule (then once more with a logged notice, and for
    good for ``loss``). A forward pass that fails for want of a forward-mode rule
    raises ``NotImplementedError`` naming the operations without one (found at
    ``params``, when given)."""
    if method == "forward" or (method == "auto" and loss in _forward_only):
        return _forward_or_explain(loss, params, forward)
    try:
        return reverse()
    except SecondDerivativeError:
        raise
    except (NotImplementedError, RuntimeError) as error:
        if method == "reverse" or not _lacks_double_backward(error):
            raise

        log.warning(
            "reverse-over-reverse AD failed for this loss (%s); using forward mode "
            "for its second and higher derivatives from now on",
            str(error).splitlines()[0],
        )
        _remember_forward_only(loss)
        return _forward_or_explain(loss, params, forward)


def _forward_or_explain(loss: Loss, params, forward):
    try:
        return forward()
    except _MissingForwardRuleError:
        raise
    except (NotImplementedError, RuntimeError) as error:
        message = str(error)
        if "jvp" not in message and "forward AD" not in message:
            raise
        missing = _operations_without_jvp(loss, params)
        named = f": {', '.join(missing)}" if missing else ""
        raise _MissingForwardRuleError(
            "forward mode needs a forward-mode (jvp) rule for every operation of "
            f"the loss, and some have none{named}. method='reverse' (or 'auto') "
            "needs backward rules only; or give the operation a jvp. torch said: "
            f"{message.splitlines()[0]}"
        ) from error


class _MissingForwardRuleError(NotImplementedError):
    """Forward mode failed for want of a jvp rule; the message names the
    operations."""


def _operations_without_jvp(loss: Loss, params) -> list[str]:
    """The custom ``autograd.Function`` classes in the graph of ``loss`` at
    ``params`` that define no ``jvp`` (torch's own operations name themselves in
    its error)."""
    if params is None or not autograd_applies(params):
        return []
    base = torch.autograd.function._SingleLevelFunction.jvp
    inputs = [leaf.detach().requires_grad_() for leaf in _tree.leaves(params)]
    with torch.enable_grad():
        try:
            value = loss(_tree.rebuild(inputs, params))
        except Exception:  # NOTE: only an error message depends on this
            return []
    names = set()
    for node in _graph(value):
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and getattr(cls, "jvp", base) is base:
            names.add(f"{cls.__module__}.{cls.__qualname__}")
    return sorted(names)


def _forward_step(fn, v):
    return lambda p: func.jvp(fn, (p,), (v,))[1]


def _reverse_step(fn, v):
    return lambda p: func.vjp(fn, p)[1](v)[0]


def _nested(loss, params, vectors, step):
    fn = func.grad(loss)
    for v in vectors:
        fn = step(fn, v)
    return fn(params)


def _lacks_double_backward(error: Exception) -> bool:
    message = str(error).lower()
    return any(
        phrase in message for phrase in ("double backward", "is not implemented")
    )


def _remember_forward_only(loss: Loss) -> None:
    _remember(_forward_only, loss, True)


def top_eigenvalue(
    loss: Loss,
    params: Tree,
    *,
    num_iters: int = 100,
    rtol: float = 1e-6,
    seed: int = 0,
) -> float:
    """The Hessian's eigenvalue of largest magnitude, by power iteration on ``H v``.

    Stops when the Rayleigh quotient changes by less than ``rtol`` relative to itself
    between two iterations, or after ``num_iters`` products. The gradient's graph is
    built once and serves every product.
    """
    check_int(num_iters, "num_iters", minimum=1)
    _tree.check_floating(params)
    generator = torch.Generator().manual_seed(seed)
    v = _tree.tree_map(
        lambda p: torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device),
        params,
    )
    v = _tree.scale(1.0 / _tree.dot(v, v).sqrt(), v)
    product = _hessian_operator(loss, params)
    eigenvalue = None
    for _ in range(num_iters):
        hv = product(v)
        new = _tree.dot(v, hv).item()
        v = _tree.scale(1.0 / _tree.dot(hv, hv).sqrt(), hv)
        if eigenvalue is not None and abs(new - eigenvalue) <= rtol * abs(new):
            return new
        eigenvalue = new
    return eigenvalue


def _hessian_operator(loss: Loss, params: Tree) -> Callable[[Tree], Tree]:
    """``v -> H v`` at fixed params, sharing one gradient graph when it can."""
    loss = for_second_order(loss)
    if not autograd_applies(params) or loss in _forward_only:
        return lambda v: hvp(loss, params, v)
    point = AutogradPoint(loss, params)
    g = point.gradient(create_graph=True)

    def product(v: Tree) -> Tree:
        if loss not in _forward_only:
            try:
                return point.tree(point.pullback(g, _tree.leaves(v), False))
            except SecondDerivativeError:
                raise
            except (NotImplementedError, RuntimeError) as error:
                if not _lacks_double_backward(error):
                    raise

        return hvp(loss, params, v)  # NOTE: logs the fallback once and remembers it

    return product
