"""Front ends: turn a timm model, a Hugging Face ViT or any fx-traceable module into a VitGraph.

Invariant: the traced graph computes what the eager model computes. ``trace`` checks it on the
example inputs and raises :class:`TraceError` when they differ.

Tracing is plain ``torch.fx`` symbolic tracing with two additions:

* timm's *notrace* modules and functions (``timm.layers._fx``) are leaves, as are timm's
  ``DropPath`` (so stochastic depth keeps honouring ``train()``) and any leaves the user names;
* when a model branches on tensor *shapes* (Hugging Face models do: ``if q_len > 1``), tracing is
  retried with proxies that carry meta tensors, so shape conditions and ``a, b = x.shape`` resolve
  to the example's values. Branches on tensor *values* still fail, with the module and source line.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from vitgraph.errors import InputSizeError, ModelError, TraceError, first_line, user_frame

__all__ = ["capture_module", "trace_module", "timm_leaves", "VitTracer", "check_exact"]

FRONTENDS = ("export", "fx")


def capture_module(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], *, leaf_modules: Sequence[type] = (),
                   autowrap_functions: Sequence[Callable] = (), model_name: str | None = None,
                   dynamic_batch: bool = True) -> fx.GraphModule:
    """The model as a graph in vitgraph's dialect: ``torch.export`` (``vitgraph.capture``), or ``torch.fx``
    symbolic tracing where ``VITGRAPH_FRONTEND=fx`` asks for it (a faster capture of the same dialect).

    A model export cannot capture but fx can (it runs Python on proxies, export on fake tensors: rare) is
    traced by fx; when both fail, export's error, which names the model's line and the fix, is raised.
    """
    import os

    from vitgraph.capture import export_module

    name = model_name or type(model).__name__
    frontend = os.environ.get("VITGRAPH_FRONTEND", "export")
    if frontend == "fx" or in_dialect(model):
        return trace_module(model, example_inputs, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                            model_name=name)
    try:
        return export_module(model, example_inputs, name=name, leaf_modules=leaf_modules,
                             dynamic_batch=dynamic_batch)
    except TraceError as exc:
        try:
            return trace_module(model, example_inputs, leaf_modules=leaf_modules,
                                autowrap_functions=autowrap_functions, model_name=name)
        except TraceError:
            raise exc from exc.__cause__


def timm_leaves() -> tuple[list[type], list[Callable]]:
    """timm's registered notrace modules and functions (empty when timm is absent)."""
    try:
        from timm.layers import _fx as timm_fx
        from timm.layers import DropPath
    except ImportError:  # timm is a dependency, but a user's own module need not use it
        return [], []
    return [*timm_fx.get_notrace_modules(), DropPath], list(timm_fx.get_notrace_functions())


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to("meta") if value.device.type != "meta" else value
    return value


class _MetaProxy(fx.Proxy):
    """A proxy that also knows the meta value (shape, dtype, python scalars) it stands for."""

    _vg_meta: Any = None
    _vg_has_meta: bool = False

    def __len__(self) -> int:
        if self._vg_has_meta and hasattr(self._vg_meta, "__len__"):
            return len(self._vg_meta)
        return super().__len__()


class _ParameterProxy(fx.proxy.ParameterProxy):
    """fx's parameter proxy answers ``size()`` but not ``size(dim)``, which a compact graph may call on a
    parameter (a per-channel scale's length that moved with a cut, e.g. MetaFormer's ``res_scale``)."""

    def size(self, dim: int | None = None) -> Any:
        return self.param.size() if dim is None else self.param.size(dim)


class VitTracer(fx.Tracer):
    """fx tracer with extra leaf modules/functions and an optional shape-concrete mode."""

    def __init__(self, leaf_modules: Iterable[type] = (), autowrap_functions: Iterable[Callable] = (),
                 concrete_shapes: bool = False) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions), param_shapes_constant=True)
        self.leaf_types = tuple(leaf_modules)
        self.concrete_shapes = concrete_shapes
        self.meta_inputs: dict[str, torch.Tensor] = {}
        self.failed_module: str | None = None
        self._in_meta = False

    # -- leaves -------------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self._in_meta:  # computing a leaf's meta output: run it, record nothing
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # innermost module wins: it is recorded first
                self.failed_module = f"{self.path_of_module(m) or '<root>'} ({type(m).__module__}.{type(m).__qualname__})"
            raise

    # -- concrete shapes ----------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _MetaProxy(node, self) if self.concrete_shapes else super().proxy(node)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        rv = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if not self.concrete_shapes or not isinstance(rv, _MetaProxy):
            return rv
        self._in_meta = True
        try:
            rv._vg_meta = self._meta_value(kind, target, args, kwargs)
            rv._vg_has_meta = True
        except Exception:  # the op has no meta kernel: the proxy simply stays symbolic
            rv._vg_has_meta = False
        finally:
            self._in_meta = False
        return rv

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._in_meta:  # plain attribute access while computing meta values
            return attr_val
        rv = super().getattr(attr, attr_val, parameter_proxy_cache)
        if type(rv) is fx.proxy.ParameterProxy:
            rv.__class__ = _ParameterProxy
        return rv

    def _meta_value(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        a = fx.node.map_aggregate(args, _meta_of)
        kw = fx.node.map_aggregate(kwargs, _meta_of)
        if kind == "placeholder":
            return self.meta_inputs[target]
        if kind == "get_attr":
            obj: Any = self.root
            for atom in target.split("."):
                obj = getattr(obj, atom)
            return _to_meta(obj)
        if kind == "call_function":
            if "device" in kw:
                kw["device"] = "meta"
            return target(*a, **kw)
        if kind == "call_method":
            return getattr(a[0], target)(*a[1:], **kw)
        if kind == "call_module":
            mod = self.root.get_submodule(target)
            with _meta_module(mod):
                return mod(*a, **kw)
        raise LookupError(kind)

    def _known(self, obj: fx.Proxy) -> Any:
        """The meta value behind a proxy in concrete-shape mode, else None."""
        if not self.concrete_shapes:
            return None
        try:
            return _meta_of(obj)
        except LookupError:
            return None

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self._known(obj)
        if value is not None and not isinstance(value, torch.Tensor):
            return bool(value)
        return super().to_bool(obj)

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = self._known(obj)
        if isinstance(value, Sequence):
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)


def _meta_of(v: Any) -> Any:
    """The meta value a proxy stands for; LookupError when the tracer could not compute it."""
    if isinstance(v, fx.proxy.Attribute):
        return getattr(_meta_of(v.root), v.attr)
    if isinstance(v, fx.proxy.ParameterProxy):
        return _to_meta(v.param)
    if isinstance(v, _MetaProxy):
        if not v._vg_has_meta:
            raise LookupError("no meta value")
        return v._vg_meta
    if isinstance(v, fx.Proxy):
        raise LookupError("no meta value")
    return _to_meta(v)


class _meta_module:
    """Temporarily move a leaf module's parameters to the meta device to compute its output shape."""

    def __init__(self, mod: nn.Module) -> None:
        self.mod = mod
        self.saved: list[tuple[nn.Module, str, torch.Tensor, bool]] = []

    def __enter__(self) -> None:
        for sub in self.mod.modules():
            for pname, p in list(sub._parameters.items()):
                if p is not None:
                    self.saved.append((sub, pname, p, True))
                    sub._parameters[pname] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
            for bname, b in list(sub._buffers.items()):
                if b is not None:
                    self.saved.append((sub, bname, b, False))
                    sub._buffers[bname] = b.to("meta")

    def __exit__(self, *exc: Any) -> None:
        for sub, name, value, is_param in self.saved:
            (sub._parameters if is_param else sub._buffers)[name] = value


def _graph_module(root: nn.Module, tracer: VitTracer, concrete_args: dict | None, name: str) -> fx.GraphModule:
    graph = tracer.trace(root, concrete_args=concrete_args)
    return fx.GraphModule(tracer.root, graph, name)


def in_dialect(model: nn.Module) -> bool:
    """A GraphModule already in vitgraph's dialect (a compact graph read again): nothing in it to raise, so an
    fx trace of its generated code is the same graph, in a fraction of export's time."""
    from vitgraph.capture.aten import raise_target

    if not isinstance(model, fx.GraphModule):
        return False
    return not any(n.op == "call_function" and raise_target(n.target, n.args, n.kwargs) is not None
                   for n in model.graph.nodes)


def trace_module(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], *,
                 leaf_modules: Sequence[type] = (), autowrap_functions: Sequence[Callable] = (),
                 model_name: str | None = None) -> fx.GraphModule:
    """Trace ``model`` to an fx GraphModule; retry with concrete shapes when shapes drive control flow."""
    name = model_name or type(model).__name__
    t_leaves, t_funcs = timm_leaves()
    leaves = [*t_leaves, *leaf_modules]
    funcs = [*t_funcs, *autowrap_functions]
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    # optional arguments the example does not pass (masks, flags) are traced as their defaults,
    # so the graph does not call methods on a None placeholder
    concrete = {p.name: p.default for p in params[len(example_inputs):] if p.default is not p.empty}
    errors: list[tuple[BaseException, VitTracer]] = []
    for concrete_shapes in (False, True):
        tracer = VitTracer(leaves, funcs, concrete_shapes=concrete_shapes)
        if concrete_shapes:
            tracer.meta_inputs = {p.name: _to_meta(x) for p, x in zip(params, example_inputs)}
        try:
            return _graph_module(model, tracer, concrete or None, name)
        except Exception as exc:  # noqa: BLE001 - re-raised below as a TraceError with context
            errors.append((exc, tracer))
    exc, tracer = errors[-1]
    first_exc, first_tracer = errors[0]
    where = tracer.failed_module or first_tracer.failed_module or "<root>"
    raise TraceError(
        f"torch.fx could not trace {name}: {first_line(exc)} "
        f"inside module {where}, at {user_frame(exc) or '<unknown>'}. "
        f"Fix: make that module a leaf so it is kept as one call, e.g. "
        f"vg.trace(model, x, leaf_modules=[TheModuleClass]) or timm.layers.register_notrace_module(TheModuleClass); "
        f"for a free function use autowrap_functions=[fn] (timm.layers.register_notrace_function)."
    ) from first_exc


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (a tensor, or dicts / lists / tuples of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flat_tensors(v)]
    return []


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference over all tensors of two (nested) outputs."""
    ta, tb = flat_tensors(a), flat_tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return math.inf
    return max((float((x.float() - y.float()).abs().max()) for x, y in zip(ta, tb) if x.numel()), default=0.0)


def run_eager(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], name: str,
              expected: str | None = None) -> Any:
    """Run the model once; turn a shape error into an InputSizeError that says what the model expects, and any
    other error of the model's own forward into a ModelError naming the line that raised."""
    got = "x".join(str(s) for s in example_inputs[0].shape[1:]) if example_inputs else "()"
    try:
        with torch.no_grad():
            return model(*example_inputs)
    except NotImplementedError as exc:  # a RuntimeError, but no shape's fault
        raise _forward_error(name, got, exc) from exc
    except (RuntimeError, AssertionError, ValueError, IndexError) as exc:
        hint = f"it expects {expected}" if expected else "check the channels and image size it was built for"
        raise InputSizeError(
            f"{name} cannot run on an input of size {got} (batch excluded): {str(exc).splitlines()[0].rstrip('.')}. "
            f"{hint.capitalize()}; pass that size (CLI: --input-size C,H,W)."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - the user's forward: a TypeError (its signature), KeyError, ...
        raise _forward_error(name, got, exc) from exc


def _forward_error(name: str, got: str, exc: BaseException) -> ModelError:
    return ModelError(f"{name} raised {first_line(exc)} at {user_frame(exc) or 'its forward'} when run on an "
                      f"example batch of images of size {got}. vitgraph calls forward(images) with one N x C x H x "
                      "W tensor: fix the model's forward, or wrap the model so that it takes one.")


def check_exact(traced_out: Any, reference: Any, name: str, atol: float = 1e-5) -> float:
    """Raise TraceError unless the traced graph's output on the example equals the eager one."""
    err = max_abs_diff(traced_out, reference)
    scale = max((float(t.abs().max()) for t in flat_tensors(reference) if t.numel()), default=1.0)
    if not err <= atol * max(1.0, scale):
        raise TraceError(
            f"the traced graph of {name} differs from the eager model (max abs error {err:.3g}): the model "
            "probably branches on tensor values, which tracing baked in for this one input. Make the module "
            "holding that branch a leaf (leaf_modules=[...])."
        )
    return err
