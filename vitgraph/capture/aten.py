"""Raise ``torch.export``'s aten call_functions to the torch-level spelling every analysis reads.

``torch.export`` writes ``aten.reshape.default(x, [s0, 197, 3, 6, 64])``; an ``fx`` trace of the same
line writes ``torch.reshape(x, ...)`` or ``x.reshape(...)``. vitgraph has one graph dialect, the
torch-level one (``analysis/ops.op_kind`` folds its spellings into one vocabulary), so each aten
overload with a torch-level twin of the same meaning is renamed here, its arguments rearranged
where the two signatures differ. An overload without a twin stays as it is: ``op_kind`` calls it a
"function", and cost and shape analyses price and run it like any opaque call.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["raise_target", "DROPPED"]

aten = torch.ops.aten

# run-time checks export records; they pin a dtype/device the rewritten graph may change
DROPPED = {
    "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "sym_constrain_range",
    "_assert_async",
}

Spelling = tuple[str, Any, tuple, dict]  # (op, target, args, kwargs)


def _fn(target: Callable, n_args: int | None = None, names: tuple[str, ...] = ()) -> Callable:
    """Same positional meaning: keep the first ``n_args`` positionals, pass the rest as ``names``."""
    def spell(args: tuple, kwargs: dict) -> Spelling:
        head = args if n_args is None else args[:n_args]
        extra = dict(zip(names, args[n_args:])) if n_args is not None else {}
        return "call_function", target, tuple(head), {**extra, **kwargs}
    return spell


def _method(name: str) -> Callable:
    def spell(args: tuple, kwargs: dict) -> Spelling:
        return "call_method", name, tuple(args), dict(kwargs)
    return spell


def _first2_method(name: str) -> Callable:
    def spell(args: tuple, kwargs: dict) -> Spelling:
        return "call_method", name, tuple(args[:2]), {}
    return spell


def _slice(args: tuple, kwargs: dict) -> Spelling:
    x, dim, start, end, step = (list(args) + [0, None, None, 1][len(args) - 1:])[:5]
    end = None if isinstance(end, int) and end >= 2 ** 62 else end
    start = None if start == 0 else start
    step = None if step == 1 else step
    if not isinstance(dim, int) or dim < 0:
        return "call_function", aten.slice.Tensor, tuple(args), dict(kwargs)
    index = tuple([slice(None)] * dim + [slice(start, end, step)])
    return "call_function", operator.getitem, (x, index), {}


def _select(args: tuple, kwargs: dict) -> Spelling:
    x, dim, index = args[:3]
    if not isinstance(dim, int) or dim < 0:
        return "call_function", torch.select, tuple(args), dict(kwargs)
    return "call_function", operator.getitem, (x, tuple([slice(None)] * dim + [index]) if dim else index), {}


def _index(args: tuple, kwargs: dict) -> Spelling:
    x, indices = args[:2]
    return "call_function", operator.getitem, (x, tuple(slice(None) if i is None else i for i in indices)), {}


def _binary(op: Callable, torch_fn: Callable) -> Callable:
    def spell(args: tuple, kwargs: dict) -> Spelling:
        if kwargs or len(args) != 2:  # alpha= or rounding_mode=: the torch function takes them
            return "call_function", torch_fn, tuple(args), dict(kwargs)
        return "call_function", op, tuple(args), {}
    return spell


def _rsub(args: tuple, kwargs: dict) -> Spelling:
    if kwargs or len(args) != 2:
        return "call_function", torch.rsub, tuple(args), dict(kwargs)
    return "call_function", operator.sub, (args[1], args[0]), {}


def _softmax(args: tuple, kwargs: dict) -> Spelling:
    return "call_function", torch.softmax, tuple(args[:2]), {}


def _einsum(args: tuple, kwargs: dict) -> Spelling:
    return "call_function", torch.einsum, (args[0], *args[1]), {}


def _sdpa(args: tuple, kwargs: dict) -> Spelling:
    names = ("attn_mask", "dropout_p", "is_causal")
    kw = {k: v for k, v in zip(names, args[3:])}
    kw.update(kwargs)
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    kw = {k: v for k, v in kw.items() if defaults.get(k, object()) != v or k not in defaults}
    return "call_function", F.scaled_dot_product_attention, tuple(args[:3]), kw


def _layer_norm(args: tuple, kwargs: dict) -> Spelling:
    return "call_function", F.layer_norm, tuple(args[:5]), {}


def _group_norm(args: tuple, kwargs: dict) -> Spelling:
    return "call_function", F.group_norm, tuple(args[:5]), {}


def _gelu(args: tuple, kwargs: dict) -> Spelling:
    approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
    return "call_function", F.gelu, (args[0],), ({"approximate": approximate} if approximate != "none" else {})


def _reduce(fn: Callable) -> Callable:
    def spell(args: tuple, kwargs: dict) -> Spelling:
        return "call_function", fn, tuple(args[:3]), {k: v for k, v in kwargs.items() if k != "dtype" or v is not None}
    return spell


def _squeeze(args: tuple, kwargs: dict) -> Spelling:
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        return "call_function", torch.squeeze, (args[0], tuple(args[1])), {}
    return "call_function", torch.squeeze, tuple(args), {}


def _to(args: tuple, kwargs: dict) -> Spelling:
    return "call_method", "to", tuple(args), {k: v for k, v in kwargs.items() if k != "copy" or v}


_TABLE: dict[str, Callable] = {
    # layout
    "reshape": _fn(torch.reshape), "view": _method("view"), "_unsafe_view": _method("view"),
    "permute": _fn(torch.permute), "transpose": _fn(torch.transpose), "t": _fn(torch.t),
    "expand": _first2_method("expand"), "unsqueeze": _fn(torch.unsqueeze), "squeeze": _squeeze,
    "flatten": _fn(torch.flatten), "unflatten": _fn(torch.unflatten), "select": _select, "index": _index,
    "slice": _slice, "chunk": _fn(torch.chunk), "split": _fn(torch.split), "split_with_sizes": _fn(torch.split),
    "unbind": _fn(torch.unbind), "cat": _fn(torch.cat), "concat": _fn(torch.cat), "stack": _fn(torch.stack),
    "contiguous": _method("contiguous"), "clone": _method("clone"), "narrow": _fn(torch.narrow),
    "roll": _fn(torch.roll), "movedim": _fn(torch.movedim), "to": _to, "type_as": _method("type_as"),
    "repeat": _method("repeat"), "expand_as": _method("expand_as"), "view_as": _method("view_as"),
    "reshape_as": _method("reshape_as"),
    # products and attention
    "matmul": _fn(torch.matmul), "bmm": _fn(torch.bmm), "mm": _fn(torch.mm), "einsum": _einsum,
    "softmax": _softmax, "_softmax": _softmax, "scaled_dot_product_attention": _sdpa,
    "linear": _fn(F.linear), "conv1d": _fn(F.conv1d), "conv2d": _fn(F.conv2d), "conv3d": _fn(F.conv3d),
    # arithmetic
    "add": _binary(operator.add, torch.add), "sub": _binary(operator.sub, torch.sub),
    "mul": _binary(operator.mul, torch.mul), "div": _binary(operator.truediv, torch.div), "rsub": _rsub,
    "neg": _fn(operator.neg),
    "mean": _reduce(torch.mean), "sum": _reduce(torch.sum), "amax": _fn(torch.amax),
    # norms and activations
    "layer_norm": _layer_norm, "group_norm": _group_norm, "rms_norm": _fn(F.rms_norm),
    "gelu": _gelu, "relu": _fn(torch.relu), "silu": _fn(F.silu), "sigmoid": _fn(torch.sigmoid),
    "tanh": _fn(torch.tanh), "hardswish": _fn(F.hardswish), "hardsigmoid": _fn(F.hardsigmoid),
    "dropout": _fn(F.dropout), "adaptive_avg_pool1d": _fn(F.adaptive_avg_pool1d),
    "adaptive_avg_pool2d": _fn(F.adaptive_avg_pool2d), "avg_pool2d": _fn(F.avg_pool2d),
    "sym_size": _method("size"),
}


def raise_target(target: Any, args: tuple, kwargs: dict) -> Spelling | None:
    """The torch-level spelling of one aten call, or None to keep it as it is."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    spell = _TABLE.get(target._overloadpacket.__name__)
    return spell(tuple(args), dict(kwargs)) if spell is not None else None
