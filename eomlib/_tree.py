"""Small helpers for parameters given as a tensor or a dict of tensors.

torch.func accepts both structures; the EoM code needs a few arithmetic operations
on them (linear combinations, inner products, flattening for an ODE solver).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Tree = torch.Tensor | Mapping[str, torch.Tensor]


def tree_map(fn: Callable[..., torch.Tensor], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf by leaf to trees of one structure."""
    if isinstance(tree, torch.Tensor):
        return fn(tree, *rest)
    return {
        name: fn(leaf, *(other[name] for other in rest)) for name, leaf in tree.items()
    }


def leaves(tree: Tree) -> list[torch.Tensor]:
    """The tensors of a tree, in a fixed order."""
    return [tree] if isinstance(tree, torch.Tensor) else list(tree.values())


def check_same_structure(tree: Tree, other: Tree, names: tuple[str, str]) -> None:
    """Raise ``ValueError`` naming both arguments unless their structures agree."""
    first, second = names
    if isinstance(tree, torch.Tensor) != isinstance(other, torch.Tensor):
        raise ValueError(
            f"{first} and {second} must both be tensors or both be dicts of tensors; "
            f"got {type(tree).__name__} and {type(other).__name__}"
        )
    if not isinstance(tree, torch.Tensor) and tree.keys() != other.keys():
        raise ValueError(
            f"{first} and {second} have different keys: "
            f"{sorted(tree)} against {sorted(other)}"
        )
    for name, (a, b) in _named_pairs(tree, other):
        if a.shape != b.shape:
            raise ValueError(
                f"{first}{name} has shape {tuple(a.shape)} but {second}{name} has "
                f"shape {tuple(b.shape)}"
            )


def check_floating(tree: Tree, name: str = "params") -> None:
    """Raise ``TypeError`` naming the leaf unless every leaf is a floating-point
    tensor: derivatives exist only for those."""
    pairs = [("", tree)] if isinstance(tree, torch.Tensor) else _items(tree, name)
    for key, leaf in pairs:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{name}{key} must be a tensor; got {type(leaf).__name__}")
        if not leaf.is_floating_point():
            raise TypeError(
                f"{name}{key} must be a floating-point tensor to be differentiated; "
                f"got dtype={leaf.dtype}; allowed: float32, float64 (or another "
                "floating dtype)"
            )


def _items(tree, name: str = "params"):
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"{name} must be a tensor or a dict of tensors; got {type(tree).__name__}"
        )
    return [(f"[{key!r}]", leaf) for key, leaf in tree.items()]


def _named_pairs(tree: Tree, other: Tree):
    if isinstance(tree, torch.Tensor):
        yield "", (tree, other)
    else:
        for name in tree:
            yield f"[{name!r}]", (tree[name], other[name])


def axpy(alpha: float, x: Tree, y: Tree) -> Tree:
    """``alpha * x + y`` leaf by leaf."""
    return tree_map(lambda a, b: torch.add(b, a, alpha=alpha), x, y)


def scale(alpha: float, x: Tree) -> Tree:
    """``alpha * x`` leaf by leaf."""
    return tree_map(lambda a: alpha * a, x)


def dot(x: Tree, y: Tree) -> torch.Tensor:
    """The Euclidean inner product of two trees, as a 0-d tensor."""
    return sum((a * b).sum() for a, b in zip(leaves(x), leaves(y)))


def flatten(tree: Tree) -> torch.Tensor:
    """All leaves of a tree concatenated into one vector."""
    return torch.cat([leaf.reshape(-1) for leaf in leaves(tree)])


def unflatten(vector: torch.Tensor, like: Tree) -> Tree:
    """Split ``vector`` into a tree shaped like ``like`` (views, no copies)."""
    pieces, start = [], 0
    for leaf in leaves(like):
        pieces.append(vector[start : start + leaf.numel()].view_as(leaf))
        start += leaf.numel()
    if isinstance(like, torch.Tensor):
        return pieces[0]
    return dict(zip(like.keys(), pieces))


def unflatten_batch(matrix: torch.Tensor, like: Tree) -> Tree:
    """Split the rows of ``matrix`` into a tree with a leading batch axis."""
    pieces, start = [], 0
    for leaf in leaves(like):
        size = leaf.numel()
        pieces.append(matrix[:, start : start + size].reshape(-1, *leaf.shape))
        start += size
    if isinstance(like, torch.Tensor):
        return pieces[0]
    return dict(zip(like.keys(), pieces))


def rebuild(tensors: list[torch.Tensor], like: Tree) -> Tree:
    """``tensors``, in the order of :func:`leaves`, in the structure of ``like``."""
    if isinstance(like, torch.Tensor):
        return tensors[0]
    return dict(zip(like.keys(), tensors))
