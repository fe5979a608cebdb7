"""What an fx node computes, independent of how the model spelled it.

``op_kind(node, gm)`` folds ``call_module`` / ``call_function`` / ``call_method`` spellings of the
same operation into one vocabulary ("linear", "sdpa", "softmax", "matmul", "shape", "norm", "act",
...). Recognition code matches on these kinds, never on class names of model code.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vitgraph.meta import SHAPE, Linear, shape_of

_SHAPE_METHODS = {
    "reshape", "view", "permute", "transpose", "flatten", "unflatten", "contiguous", "unbind", "chunk",
    "split", "squeeze", "unsqueeze", "t", "reshape_as", "view_as", "movedim", "swapaxes", "expand",
    "expand_as", "clone", "narrow", "select", "float", "to", "type_as",
}
_SHAPE_FUNCTIONS = {
    torch.reshape, torch.flatten, torch.transpose, torch.permute, torch.unbind, torch.chunk, torch.split,
    torch.squeeze, torch.unsqueeze, torch.cat, torch.concat, torch.stack, torch.movedim, torch.swapaxes,
    torch.narrow, torch.select, torch.roll, operator.getitem, torch.t, torch.unflatten,
}
_ACT_FUNCTIONS = {
    F.gelu, F.relu, F.silu, F.hardswish, F.sigmoid, F.tanh, torch.sigmoid, torch.tanh, torch.relu,
    F.mish, F.leaky_relu, F.elu, F.softplus, F.hardsigmoid, F.relu6, F.glu,
}
_ACT_METHODS = {"gelu", "relu", "silu", "sigmoid", "tanh", "relu_", "sigmoid_", "tanh_"}
_ACT_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.Mish, nn.LeakyReLU, nn.ELU,
                nn.Softplus, nn.Hardsigmoid, nn.ReLU6, nn.GLU)
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm, nn.LocalResponseNorm)
_NORM_FUNCTIONS = {F.layer_norm, F.group_norm, F.rms_norm, F.batch_norm, F.normalize}
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.mm}
_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_ADD = {operator.add, torch.add, operator.iadd}
_MUL = {operator.mul, torch.mul, operator.imul}
_DIV = {operator.truediv, torch.div, torch.true_divide, operator.itruediv}
_MEAN = {torch.mean, torch.sum, torch.amax, torch.amin}  # the function spellings of the reducing methods (export)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def is_dropout_module(mod: nn.Module) -> bool:
    if isinstance(mod, _DROPOUT_MODULES):
        return True
    return type(mod).__name__ in ("DropPath", "DropBlock2d")  # timm's stochastic depth leaves


def op_kind(node: fx.Node, gm: fx.GraphModule) -> str:
    """One word for what the node computes (see module docstring)."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.op == "call_module":
        mod = _module(gm, node)
        if isinstance(mod, nn.Linear):
            return "linear"
        if isinstance(mod, nn.modules.conv._ConvNd):
            return "conv"
        if isinstance(mod, _NORM_MODULES):
            return "norm"
        if isinstance(mod, _ACT_MODULES):
            return "act"
        if mod is not None and is_dropout_module(mod):
            return "dropout"
        if isinstance(mod, nn.Softmax):
            return "softmax"
        if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AvgPool1d)):
            return "pool"
        if isinstance(mod, nn.Flatten):
            return "shape"
        return "module"
    if node.op == "call_method":
        t = node.target
        if t in _SHAPE_METHODS:
            return "shape"
        if t in ("softmax",):
            return "softmax"
        if t in ("matmul", "bmm", "__matmul__"):
            return "matmul"
        if t in ("add", "add_", "__add__", "__radd__"):
            return "add"
        if t in ("mul", "mul_", "__mul__", "__rmul__"):
            return "mul"
        if t in ("div", "div_", "__truediv__"):
            return "div"
        if t in ("mean", "sum", "amax", "max"):
            return "reduce"
        if t in _ACT_METHODS:
            return "act"
        if t in ("size", "dim"):
            return "size"
        return "method"
    # call_function
    f = node.target
    if f is F.linear:
        return "linear"
    if f in _SDPA:
        return "sdpa"
    if f in _SOFTMAX_FUNCTIONS:
        return "softmax"
    if f in _MATMUL_FUNCTIONS:
        return "matmul"
    if f is torch.einsum:
        return "einsum"
    if f in (F.conv1d, F.conv2d, F.conv3d, torch.conv2d):
        return "conv"
    if f in _ADD:
        return "add"
    if f in _MUL:
        return "mul"
    if f in _DIV:
        return "div"
    if f in _SHAPE_FUNCTIONS:
        return "shape"
    if f in _NORM_FUNCTIONS:
        return "norm"
    if f in _ACT_FUNCTIONS:
        return "act"
    if f in (F.dropout, F.dropout1d, F.dropout2d):
        return "dropout"
    if f in _MEAN or f in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool2d):
        return "reduce"
    if f is getattr:
        return "size"
    return "function"


def linear_info(node: fx.Node, gm: fx.GraphModule) -> Linear | None:
    """Weights and widths of a linear-like node, or None.

    A pointwise conv counts (``channel_axis`` 1): each pixel's channels go through one matrix, so its
    units slice, gate and price exactly as a Linear's do. ``op_kind`` still calls it a "conv":
    attention and token analyses keep seeing a convolution.
    """
    if node.op == "call_module":
        mod = _module(gm, node)
        bias = f"{node.target}.bias" if getattr(mod, "bias", None) is not None else None
        if isinstance(mod, nn.Linear):
            return Linear(node.name, f"{node.target}.weight", bias, mod.in_features, mod.out_features)
        if _pointwise(mod):
            return Linear(node.name, f"{node.target}.weight", bias, mod.in_channels, mod.out_channels, 1)
        return None
    if node.op == "call_function" and node.target is F.linear:
        w = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
        b = node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)
        if not isinstance(w, fx.Node) or w.op != "get_attr":
            return None
        ws = shape_of(w)
        if ws is None or len(ws) != 2:
            return None
        bias = b.target if isinstance(b, fx.Node) and b.op == "get_attr" else (
            "<computed>" if isinstance(b, fx.Node) else None)
        return Linear(node.name, str(w.target), bias, ws[1], ws[0])
    return None


def _pointwise(mod: nn.Module | None) -> bool:
    """A 1x1 Conv2d that moves no data between pixels: stride 1, no padding, one group."""
    return isinstance(mod, nn.Conv2d) and mod.groups == 1 and tuple(mod.kernel_size) == (1, 1) \
        and tuple(mod.stride) == (1, 1) and mod.padding in ((0, 0), "valid", "same")


def is_linear(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A Linear (however spelled) or a pointwise conv (see ``linear_info``)."""
    return op_kind(node, gm) == "linear" or (node.op == "call_module" and _pointwise(_module(gm, node)))


def is_depthwise(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A conv module with one filter per channel (``groups == in_channels == out_channels``): it mixes
    positions, never channels, so channel ``c`` out is channel ``c`` in (PVT-v2's and other mobile MLPs)."""
    if node.op != "call_module":
        return False
    mod = _module(gm, node)
    return isinstance(mod, nn.modules.conv._ConvNd) and mod.groups == mod.in_channels == mod.out_channels


PRODUCTS = frozenset({"matmul", "einsum"})  # the two spellings of a batched matrix product


def operands(node: fx.Node) -> list[Any]:
    """The two factors of a matmul/bmm, or the operands of an einsum (after its equation)."""
    if node.op == "call_function" and node.target is torch.einsum:
        rest = node.args[1:]
        return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    return list(node.args[:2])


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """Input nodes that carry tensors (have a recorded tensor shape), in argument order."""
    return [a for a in node.all_input_nodes if a.meta.get(SHAPE) is not None]


def sdpa_qkv(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    names = ("query", "key", "value")
    vals = [node.args[i] if len(node.args) > i else node.kwargs.get(n) for i, n in enumerate(names)]
    return vals[0], vals[1], vals[2]


def sdpa_mask(node: fx.Node) -> Any:
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def module_path(node: fx.Node, gm: fx.GraphModule) -> str:
    """Dotted path of the module that produced a node (best effort, for names)."""
    if node.op == "call_module":
        return str(node.target)
    info = linear_info(node, gm)
    if info is not None:
        return info.weight.rsplit(".", 1)[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    return node.name


def common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    out = []
    for atoms in zip(*parts):
        if len(set(atoms)) != 1:
            break
        out.append(atoms[0])
    return ".".join(out)


def input_dependent(gm: fx.GraphModule, values_only: bool = False) -> set[fx.Node]:
    """Nodes computed from a model input rather than from parameters and constants alone.

    ``values_only``: follow only edges that carry a tensor (a node with a recorded shape), so a table
    built from the input's *size* alone (a RoPE table for the image's grid) counts as fixed."""
    data: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in data and (not values_only or a.meta.get(SHAPE) is not None)
                                        for a in n.all_input_nodes):
            data.add(n)
    return data
