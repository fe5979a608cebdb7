"""Capture a model with ``torch.export`` and raise its graph to vitgraph's dialect.

``torch.export.export(model, x, dynamic_shapes={batch}, strict=False)`` runs the model's own Python
on fake tensors, so einops recipes, ``int(x.shape[1])``, loops over shapes and timm's notrace
modules all run as written: what it records is what the model computes, with the batch symbolic
and every other size a Python int. Its graph is then raised to the dialect the analyses read (the
one an ``fx`` trace of the same model yields):

* each call of a ``torch.nn`` layer (``Linear``, ``Conv2d``, ``LayerNorm``, ``GELU``, ``Dropout``,
  ``BatchNorm2d``, ...) becomes ``call_module`` of that layer, found by the node's
  ``nn_module_stack`` (ownership, never a class name): passes slice the layer's weights, and a
  dropout or batch norm honours ``train()``/``eval()`` again, which export froze at capture;
* stochastic depth (timm's ``DropPath``, Hugging Face's ``*DropPath``, torchvision's
  ``StochasticDepth``, any module named ``*DropPath``/``DropBlock*``) and the user's
  ``leaf_modules`` are kept whole through a custom op and become ``call_module`` too (an eval-mode
  export would otherwise delete them, a train-mode one bake a random mask);
* other aten ops get their torch-level spelling (``capture/aten.py``).
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from vitgraph.capture.aten import DROPPED, raise_target
from vitgraph.capture.errors import export_error, quiet_torch
from vitgraph.errors import TraceError

__all__ = ["export_module", "is_stochastic"]

_LEAVES: dict[str, nn.Module] = {}  # path -> module, while an export runs (the fake kernel reads it)
_STOCHASTIC_NAME = re.compile(r"(DropPath|DropBlock|StochasticDepth)", re.IGNORECASE)


@torch.library.custom_op("vitgraph::leaf", mutates_args=())
def _leaf(x: torch.Tensor, path: str) -> torch.Tensor:
    return _LEAVES[path](x).clone()


@_leaf.register_fake
def _(x: torch.Tensor, path: str) -> torch.Tensor:
    module = _LEAVES[path]
    if getattr(module, "_vg_same_shape", False):
        return torch.empty_like(x)
    with torch.no_grad():
        return torch.empty_like(module(x))


def is_stochastic(module: nn.Module) -> bool:
    """A parameter-free module whose train-mode output is random (stochastic depth, drop block)."""
    return bool(_STOCHASTIC_NAME.search(type(module).__name__)) and not any(True for _ in module.parameters())


@contextlib.contextmanager
def _as_leaves(model: nn.Module, leaf_types: tuple[type, ...]) -> Iterator[None]:
    """Route each leaf module's forward through ``vitgraph::leaf`` while exporting."""
    patched = []
    for path, module in model.named_modules():
        stochastic = is_stochastic(module)
        if not path or not (stochastic or (leaf_types and isinstance(module, leaf_types))):
            continue
        if any(path.startswith(p + ".") for p, _ in patched):
            continue
        _LEAVES[path] = module
        module._vg_same_shape = stochastic
        module.forward = (lambda p: (lambda x, *a, **k: torch.ops.vitgraph.leaf(x, p)))(path)
        patched.append((path, module))
    try:
        yield
    finally:
        for path, module in patched:
            del module.forward
            del module._vg_same_shape
            _LEAVES.pop(path, None)


def export_module(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], *, name: str,
                  leaf_modules: Sequence[type] = (), dynamic_batch: bool = True) -> fx.GraphModule:
    """``torch.export`` ``model`` (non-strict, dynamic batch unless ``dynamic_batch`` is False: a graph that
    serves one batch size) and raise the graph to vitgraph's dialect."""
    from torch.export import Dim, export

    inputs = tuple(example_inputs)
    dynamic = None
    if dynamic_batch:
        if inputs and inputs[0].dim() and int(inputs[0].shape[0]) == 1:  # export specialises a batch of 1
            inputs = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() else x for x in inputs)
        batch = Dim("batch")
        dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() else None for x in inputs)
    try:
        with _as_leaves(model, tuple(leaf_modules)), torch.no_grad(), quiet_torch():
            ep = export(model, inputs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised as a TraceError naming the model's line and the fix
        raise export_error(name, exc, model) from exc
    return raise_graph(ep.module(check_guards=False), model, name)


# -- raising --------------------------------------------------------------------------------------
def _owner(node: fx.Node) -> tuple[str, str, str] | None:
    """(call key, module path, class name as recorded) of the innermost module that produced the node."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, value = list(stack.items())[-1]
    path, kind = value if isinstance(value, tuple) else (str(value), "")
    return str(key), path, kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"


def _is_layer(module: nn.Module | None, recorded: str) -> bool:
    """A torch.nn layer with no child modules (the unit an fx trace keeps as one call_module), and the module
    the node was recorded in (a graph captured again keeps its nodes' first owners)."""
    if module is None or type(module) is nn.Module or isinstance(module, (nn.Sequential, nn.ModuleList,
                                                                          nn.ModuleDict)):
        return False
    kind = type(module)
    return kind.__module__.startswith("torch.nn") and f"{kind.__module__}.{kind.__qualname__}" == recorded \
        and not any(True for _ in module.children())


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else None
    except AttributeError:
        return None


def _layer_calls(graph: fx.Graph, model: nn.Module) -> dict[fx.Node, tuple[str, fx.Node]]:
    """output node -> (module path, input node) for every call of a torch.nn layer (or a kept leaf) that has
    one tensor input and one output; the call's other nodes are dropped when it is raised."""
    groups: dict[str, list[fx.Node]] = {}
    paths: dict[str, str] = {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is torch.ops.vitgraph.leaf.default:
            groups[f"leaf:{n.name}"] = [n]
            paths[f"leaf:{n.name}"] = n.args[1]
            continue
        owner = _owner(n)
        if owner is None or not _is_layer(_submodule(model, owner[1]), owner[2]):
            continue
        groups.setdefault(owner[0], []).append(n)
        paths[owner[0]] = owner[1]
    calls: dict[fx.Node, tuple[str, fx.Node]] = {}
    for key, members in groups.items():
        inside = set(members)
        own = paths[key] + "."
        outer = {a for n in members for a in n.all_input_nodes if a not in inside
                 and not (a.op == "get_attr" and str(a.target).startswith(own))}
        outs = [n for n in members if any(u not in inside for u in n.users) or not n.users]
        if len(outer) == 1 and len(outs) == 1 and not any(u.op == "output" for n in members[:-1] for u in n.users):
            calls[outs[0]] = (paths[key], outer.pop())
    return calls


def raise_graph(exported: fx.GraphModule, model: nn.Module, name: str) -> fx.GraphModule:
    """Rebuild ``exported`` (``ep.module()``) in vitgraph's dialect, with ``model``'s layers as call_modules."""
    old = exported.graph
    calls = _layer_calls(old, model)
    dropped = {n for o in calls for n in _group_members(o, calls[o][1])}
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for n in old.nodes:
        if n in dropped and n not in calls:
            continue
        if n.op == "call_module" and str(n.target).startswith("_guards"):
            continue
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) \
                and n.target._overloadpacket.__name__ in DROPPED:
            continue
        if _whole_slice(n):  # x[:, :] reads all of x
            env[n] = env[n.args[0]]
            continue
        if _store(graph, n, env):  # x[idx] = v, written functionally
            continue
        if n in calls:
            path, x = calls[n]
            new = graph.call_module(path, (env[x],))
        elif n.op == "call_function":
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = dict(fx.node.map_arg(n.kwargs, lambda a: env[a]))
            spelled = raise_target(n.target, args, kwargs)
            op, target, args, kwargs = spelled if spelled else ("call_function", n.target, args, kwargs)
            if target is torch.reshape or (op == "call_method" and target == "view"):
                args = (args[0], _read_sizes(graph, n, args[0], args[1]))
            new = graph.create_node(op, target, args, kwargs, name=n.name)
        else:
            new = graph.node_copy(n, lambda a: env[a])
        new.meta.update({k: v for k, v in n.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
        env[n] = new
    _fix_output(graph, exported)
    root = _root(graph, model, exported)
    gm = fx.GraphModule(root, graph, name)
    for node in list(gm.graph.nodes):  # weights of raised layers are read through their modules now
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    _drop_open_masks(gm)
    gm.recompile()
    return gm


def _drop_open_masks(gm: fx.GraphModule) -> None:
    """An attention mask built from sizes alone that lets every query see every key (Hugging Face builds one
    whenever it is traced) is no mask: drop it, so the attention reads as the plain attention it is."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    for n in list(gm.graph.nodes):
        mask = n.kwargs.get("attn_mask") if n.op == "call_function" and n.target is sdpa else None
        if not isinstance(mask, fx.Node):
            continue
        value = _evaluate_size_only(gm, mask)
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool and bool(value.all()):
            n.kwargs = {k: v for k, v in n.kwargs.items() if k != "attn_mask"}


def _evaluate_size_only(gm: fx.GraphModule, node: fx.Node) -> Any:
    """``node``'s value where it depends on the inputs through their sizes only (else None), at batch 1."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("call_module", "get_attr", "output"):
            return None
        if n.op == "placeholder":
            continue
        reads = [a for a in n.all_input_nodes if a.op == "placeholder"]
        if reads and not (n.op == "call_method" and n.target == "size"):
            return None
        todo.extend(n.all_input_nodes)
    sub = fx.Graph()
    env: dict[fx.Node, Any] = {}
    inputs = []
    for n in gm.graph.nodes:
        if n in seen:
            env[n] = sub.node_copy(n, lambda a: env[a])
            if n.op == "placeholder":
                inputs.append(n)
    sub.output(env[node])
    try:
        blanks = [torch.empty([1 if i == 0 else int(d) for i, d in enumerate(n.meta["val"].shape)]) for n in inputs]
        return fx.GraphModule(gm, sub)(*blanks)
    except Exception:  # noqa: BLE001 - anything unexpected: keep the mask
        return None


def _read_sizes(graph: fx.Graph, n: fx.Node, x: fx.Node, sizes: Any) -> Any:
    """A reshape's leading sizes that it keeps from its input are read from the input (``x.size(i)``), as the
    model's own ``B, N, C = x.shape`` did before export wrote the example's numbers: when tokens are dropped
    upstream, ``N`` follows."""
    src, dst = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None, n.meta.get("val")
    if not isinstance(sizes, (list, tuple)) or not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor):
        return sizes
    out = list(sizes)
    for i, size in enumerate(out):
        if i >= src.dim() or i >= dst.dim() or str(src.shape[i]) != str(dst.shape[i]):
            break
        if isinstance(size, int) and size > 1:
            out[i] = graph.call_method("size", (x, i))
    return type(sizes)(out)


def _store(graph: fx.Graph, n: fx.Node, env: dict[fx.Node, Any]) -> bool:
    """``x[idx] = v`` (``aten.copy_`` into ``x`` or a slice/select view of it) written functionally: the view's
    new value ``aten.copy(view, v)`` (dst first, as a leaf that updates ``x`` would read: walks from ``x``'s
    readers meet ``x``), scattered back up to ``x`` (``torch.slice_scatter``/``select_scatter``), and every
    later reader of ``x`` (or of a view on the way) reads that value. In place, the copy had no users: the
    analyses did not see ``v`` flow on, and dead-code elimination kept all that computes ``v`` once ``x`` was
    no longer read. An input or a buffer written in place stays a copy (it outlives the call)."""
    if n.op != "call_function" or n.target is not torch.ops.aten.copy_.default or len(n.args) < 2 \
            or not isinstance(n.args[1], fx.Node):
        return False
    chain, base = [], n.args[0]
    while isinstance(base, fx.Node) and base.op == "call_function" and base.target in _VIEWS:
        chain.append(base)
        base = base.args[0]
    if not _owns_storage(base) or _other_views(n, base, chain):
        return False
    meta = {k: v for k, v in n.meta.items() if k in ("nn_module_stack", "stack_trace")}
    value = graph.call_function(torch.ops.aten.copy.default, (env[n.args[0]], env[n.args[1]]))
    value.meta.update(meta)
    env[n.args[0]] = value
    for view in chain:  # innermost view first: scatter into its parent, up to the base
        parent = view.args[0]
        if not _whole_slice(view):
            args = fx.node.map_arg(tuple(view.args[1:]), lambda a: env[a])
            if view.target is torch.ops.aten.select.int:
                value = graph.call_function(torch.select_scatter, (env[parent], value, *args))
            else:
                dim, start, end, step = (list(args) + [0, None, None, 1][len(args):])[:4]
                end = None if isinstance(end, int) and end >= 2 ** 62 else end
                value = graph.call_function(torch.slice_scatter, (env[parent], value, dim, start, end, step))
            value.meta.update(meta)
        env[parent] = value
    env[n] = env[n.args[0]]
    return True


_VIEWS = (torch.ops.aten.slice.Tensor, torch.ops.aten.select.int)


def _is_alias(n: fx.Node) -> bool:
    """An op whose output shares its input's storage (a view), or that we cannot tell of."""
    if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
        return n.op != "output"
    return any(r.alias_info is not None for r in n.target._schema.returns)


def _owns_storage(base: Any) -> bool:
    """A tensor computed in the graph that is no view of another (not an input, a buffer or a view)."""
    return isinstance(base, fx.Node) and base.op == "call_function" and not _is_alias(base)


def _other_views(n: fx.Node, base: fx.Node, chain: list[fx.Node]) -> bool:
    """Whether a view of ``base`` other than the store's own, taken before the store ``n``, is read after it:
    it would keep reading the storage that the store no longer writes."""
    order = {m: i for i, m in enumerate(n.graph.nodes)}
    todo = [u for owner in [base, *chain] for u in owner.users
            if u is not n and u not in chain and order[u] < order[n] and _is_alias(u)]
    seen: set[fx.Node] = set()
    while todo:
        view = todo.pop()
        if view in seen:
            continue
        seen.add(view)
        for user in view.users:
            if order[user] > order[n]:
                return True
            if _is_alias(user):
                todo.append(user)
    return False


def _whole_slice(n: fx.Node) -> bool:
    if n.op != "call_function" or n.target is not torch.ops.aten.slice.Tensor:
        return False
    start, end, step = (list(n.args[2:]) + [None, None, 1][len(n.args) - 2:])[:3]
    return start in (0, None) and (end is None or isinstance(end, int) and end >= 2 ** 62) and step == 1


def _group_members(out: fx.Node, x: fx.Node) -> set[fx.Node]:
    """The nodes between a layer call's input and its output (the call's own nodes)."""
    members, todo = set(), [out]
    while todo:
        n = todo.pop()
        if n in members or n is x or n.op in ("get_attr", "placeholder"):
            continue
        members.add(n)
        todo.extend(n.all_input_nodes)
    return members


def _fix_output(graph: fx.Graph, exported: fx.GraphModule) -> None:
    """The model's output structure (export flattens it): one tensor stays one tensor."""
    out = next(n for n in graph.nodes if n.op == "output")
    flat = out.args[0]
    spec = getattr(getattr(exported.graph._codegen, "pytree_info", None), "out_spec", None)
    if spec is not None and isinstance(flat, (list, tuple)):
        import torch.utils._pytree as pytree
        try:
            out.args = (pytree.tree_unflatten(list(flat), spec),)
        except Exception:  # noqa: BLE001 - an output spec fx cannot hold: keep the flat tuple
            pass


def _root(graph: fx.Graph, model: nn.Module, exported: fx.GraphModule) -> dict[str, Any]:
    """Every module and attribute the graph names: the user's layers and parameters (shared, as an fx
    trace shares them), and the constants export lifted out of the forward."""
    root: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            root[str(n.target)] = model.get_submodule(str(n.target))
        elif n.op == "get_attr":
            root[str(n.target)] = _attr(model, str(n.target), exported)
    return root


def _attr(model: nn.Module, target: str, exported: fx.GraphModule) -> Any:
    for obj in (model, exported):
        try:
            for atom in target.split("."):
                obj = getattr(obj, atom)
            return obj
        except AttributeError:
            continue
    raise TraceError(f"the exported graph reads {target!r}, which neither the model nor the export holds")
