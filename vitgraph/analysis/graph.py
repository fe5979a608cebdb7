"""VitGraph: a traced ViT (an fx.GraphModule) together with its recognised structure."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from vitgraph.analysis import analyse
from vitgraph.analysis.shapes import propagate_shapes
from vitgraph.meta import Block, Structure
from vitgraph.analysis.ops import module_path, op_kind
from vitgraph.errors import ModelError, TraceError, first_line
from vitgraph.capture.frontend import capture_module, check_exact, run_eager


class VitGraph:
    """A traced model, its example inputs and the structure recognised in it."""

    def __init__(self, gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], structure: Structure,
                 name: str, trace_error: float = 0.0) -> None:
        self.gm = gm
        self.example_inputs = example_inputs
        self.structure = structure
        self.name = name
        self.trace_error = trace_error

    # -- lookups ------------------------------------------------------------------------------
    def node(self, name: str) -> fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r} in the graph of {self.name}")

    @property
    def blocks(self) -> tuple[Block, ...]:
        return self.structure.blocks

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(self.example_inputs[0].shape[1:]) if self.example_inputs else ()

    # -- views --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``inspect --json`` contract."""
        s = self.structure
        return {
            "model": self.name,
            "input_size": list(self.input_size),
            "flops": s.flops,
            "params": s.params,
            "embed_dim": s.tokens.embed_dim,
            "prefix_tokens": s.tokens.prefix_tokens,
            "tokens": s.tokens.tokens,
            "grid": list(s.tokens.grid) if s.tokens.grid else None,
            "pooling": s.tokens.pooling,
            "blocks": [block_dict(b) for b in s.blocks],
            "other_attention": [a.name for a in s.attention if a.block is None],
            "notes": list(s.notes),
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    def summary(self) -> str:
        from vitgraph.analysis.summary import structure_table
        return structure_table(self)

    def to_networkx(self) -> Any:
        """Block-level DiGraph: embed -> block 0 -> ... -> head, with each block's data as attributes."""
        import networkx as nx

        g = nx.DiGraph(model=self.name, flops=self.structure.flops, params=self.structure.params)
        prev = "input"
        g.add_node("input", kind="input", shape=list(self.input_size))
        for b in self.structure.blocks:
            node = f"block{b.index}"
            g.add_node(node, kind="block", **{k: v for k, v in block_dict(b).items() if v is not None})
            g.add_edge(prev, node, tokens=b.tokens_in)
            prev = node
        g.add_node("output", kind="output")
        g.add_edge(prev, "output")
        return g

    def node_graph(self) -> Any:
        """Node-level DiGraph of the fx graph with op kinds and roles, for custom analyses."""
        import networkx as nx

        from vitgraph.analysis.ops import op_kind
        from vitgraph.meta import ROLE, SHAPE

        g = nx.DiGraph()
        for n in self.gm.graph.nodes:
            role = n.meta.get(ROLE)
            g.add_node(n.name, op=op_kind(n, self.gm), shape=n.meta.get(SHAPE),
                       role=asdict(role) if role is not None else None)
            for a in n.all_input_nodes:
                g.add_edge(a.name, n.name)
        return g

    def __repr__(self) -> str:
        s = self.structure
        return (f"VitGraph({self.name}: {len(s.blocks)} blocks, {len(s.attention)} attention sites, "
                f"{s.flops / 1e9:.2f} GFLOPs, {s.params / 1e6:.2f} M params)")


def block_dict(b: Block) -> dict[str, Any]:
    """One row of ``inspect --json`` / ``report.json`` blocks."""
    attn = None
    if b.attention is not None:
        a = b.attention
        attn = {"kind": "msa", "name": a.name, "heads": a.heads, "head_dim": a.head_dim,
                "v_head_dim": a.v_head_dim, "impl": a.impl, "mode": a.mode, "fused": a.fused,
                "tokens_q": a.tokens_q, "tokens_kv": a.tokens_kv, "bias": a.bias,
                "prunable": dict(a.prunable)}
    elif b.mixer is not None or b.mlp is not None:  # a converted attention, or none at all (skipped)
        attn = {"kind": b.mixer or "skip", "heads": 0, "head_dim": 0}
    mlp = None
    if b.mlp is not None:
        mlp = {"hidden": b.mlp.hidden, "name": b.mlp.name, "gated": b.mlp.gated, "prunable": dict(b.mlp.prunable)}
    return {
        "index": b.index, "name": b.name, "attention": attn, "mlp": mlp,
        "skippable": b.skippable, "skip_reason": b.skip_reason,
        "token_prunable": b.token_prunable, "token_reason": b.token_reason,
        "tokens_in": b.tokens_in, "tokens_out": b.tokens_out,
        "flops": b.flops, "params": b.params,
    }


def trace(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[type] = (),
          autowrap_functions: Sequence[Callable] = (), name: str | None = None) -> VitGraph:
    """Trace ``model``, check the trace is exact, and recognise its structure.

    ``example_inputs`` is a tensor or a tuple of tensors (batch first). The model is put in eval
    mode: tracing bakes Python control flow, and recognition describes the inference graph.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    model = _hf_adapter(model)
    model.eval()
    name = name or getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
    serving = getattr(model, "serving_batch", None)
    check, reference = _reference(model, example_inputs, name, serving)
    gm = capture_module(model, example_inputs, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                        model_name=name, dynamic_batch=not isinstance(serving, int))
    gm.eval()
    if isinstance(serving, int):  # a compact graph that serves one batch size
        gm.serving_batch = serving
    if check is example_inputs:  # one real run: shapes and exactness
        err = check_exact(propagate_shapes(gm, example_inputs), reference, name)
    else:  # shapes at the example batch on fake tensors; exactness on one image, which is also a second batch size
        propagate_shapes(gm, example_inputs, fake=True)
        try:
            with torch.no_grad():
                traced_out = gm(*check)
        except Exception as exc:  # noqa: BLE001 - eager ran on this image: the trace specialised the batch
            raise TraceError(f"the traced graph of {name} runs at the example's batch size but not on one image "
                             f"({first_line(exc)}): tracing baked a batch-size constant into the graph. Take the "
                             "batch size from the input (x.shape[0]) in the model, or make that module a leaf "
                             "(leaf_modules=[...]).") from exc
        err = check_exact(traced_out, reference, name)
    structure = analyse(gm, example_inputs, shapes_known=True)
    return VitGraph(gm, example_inputs, structure, name, err)


def _reference(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], name: str, serving: Any
               ) -> tuple[tuple[torch.Tensor, ...], Any]:
    """The inputs the trace is checked on and the eager output there: the first image alone where the model
    runs on it (a 1024-px encoder spends seconds per image; a trace that baked the example's batch size
    fails here, not later), else the whole example."""
    batch = int(example_inputs[0].shape[0]) if example_inputs and example_inputs[0].dim() else 1
    if batch > 1 and not isinstance(serving, int):
        one = tuple(x[:1] for x in example_inputs)
        try:
            with torch.no_grad():
                return one, model(*one)
        except Exception:  # noqa: BLE001 - a model that needs the whole batch: check on it as given
            pass
    return example_inputs, run_eager(model, example_inputs, name, expected=_expected_size(model))


class HFLogits(nn.Module):
    """Adapter for Hugging Face image models: ``pixel_values -> logits`` (or the last hidden state)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, return_dict=True)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state


def _hf_adapter(model: nn.Module) -> nn.Module:
    if "transformers" not in sys.modules:  # a Hugging Face model means transformers is imported (and it is slow to)
        return model
    from transformers import PreTrainedModel
    return HFLogits(model) if isinstance(model, PreTrainedModel) else model


def _expected_size(model: nn.Module) -> str | None:
    from vitgraph.capture.models import default_input_size

    inner = model.model if isinstance(model, HFLogits) else model
    size = default_input_size(inner)
    return "input size " + "x".join(map(str, size)) if size else None


def require_vit(g: Any) -> None:
    """ModelError unless the traced graph (a VitGraph) holds self-attention: the compression axes prune heads,
    tokens and attention blocks, and a CNN has none of them."""
    s = g.structure
    if s.attention:
        return
    mixers = sorted({b.mixer for b in s.blocks if b.mixer})
    found = f"{len(s.blocks)} residual blocks of {', '.join(mixers)}" if mixers else f"{len(s.blocks)} blocks"
    unrecognised = [n for n in g.gm.graph.nodes if op_kind(n, g.gm) in ("softmax", "sdpa")]
    if unrecognised:  # attention is there, in a form recognition does not take apart
        n = unrecognised[0]
        raise ModelError(
            f"{g.name}: its graph has attention that vitgraph does not recognise (%{n.name} in "
            f"{module_path(n, g.gm)}, {len(unrecognised)} such op(s); found {found}): recognition needs q, k and v "
            "from linear projections, then q @ k^T -> softmax -> @ v or scaled_dot_product_attention, on a "
            "token axis (convolutional projections, factorised or multi-scale attention are not taken apart), so "
            "no compression axis can reach it. `vitgraph inspect` lists what is recognised; compress a model "
            "with plain multi-head attention, e.g. deit_small_patch16_224.")
    opaque = _opaque_leaves(g.gm)
    if opaque:  # attention may be there, inside modules the trace could not enter
        raise ModelError(
            f"{g.name}: its traced graph has no self-attention vitgraph can see (found {found}); the graph calls "
            f"{opaque}, modules kept whole because they cannot be traced (timm marks them not traceable, or they "
            "were passed as leaf_modules), so any attention inside them is out of reach of every compression axis. "
            "Compress a model whose attention blocks trace, e.g. deit_small_patch16_224; `vitgraph inspect` shows "
            "what vitgraph recognises in a model.")
    raise ModelError(f"{g.name} is not a Vision Transformer: its graph has no self-attention (found {found}), so "
                     "vitgraph has no heads, tokens or attention blocks to compress. Pass a ViT, e.g. the timm name "
                     "deit_small_patch16_224 or file.py:function returning one; `vitgraph inspect` shows what "
                     "vitgraph recognises in a model.")


def _opaque_leaves(gm: fx.GraphModule) -> str:
    """'MobileVitBlock x3, ...': the leaf modules, not torch.nn layers, that hold linear or convolution layers
    (where attention projections would be)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if type(mod).__module__.startswith("torch.nn") or not any(
                isinstance(m, (nn.Linear, nn.MultiheadAttention, nn.modules.conv._ConvNd)) for m in mod.modules()):
            continue
        counts[type(mod).__name__] = counts.get(type(mod).__name__, 0) + 1
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
