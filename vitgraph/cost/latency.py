"""Latency as a cost: a measured latency model per runtime, priced over the same factors as FLOPs.

A model's latency on one runtime, batch size and machine is modelled as

    ms = c_const + c_ops * ops + c_gemm * gemm + c_elem * elem

where, under a set of decisions, ``gemm`` is the FLOPs left (the cost model's rows), ``ops`` the
number of graph ops left (a deleted block or branch takes its ops with it; a narrower op is still
one op: at batch 1 latency follows op count, not FLOPs) and ``elem`` the elements the other ops
still touch (norms, adds, activations, copies shrink with the tokens and channels kept). Each
feature is a ``vitgraph.cost.budget.Table`` over the pricer's factors, so one weighted sum of them is
again a table, and ``Pricer(g, axes, table=LatencyTable.pricer_table)`` prices every axis's
decisions in milliseconds, differentiably, exactly as it prices FLOPs. The coefficients are
measured (``vitgraph.cost.profile``): compact models of random decisions on every axis that applies,
timed interleaved with the dense model on the runtime, fitted by non-negative least squares on
relative error. A table names the model, input size, runtime, batch, thread count and machine it
was measured for, and refuses to price another model.
"""
from __future__ import annotations

import json
import math
import operator
import platform
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.fx as fx

from vitgraph.cost.budget import Pricer, Table, flops_table
from vitgraph.errors import SpecError
from vitgraph.analysis.graph import VitGraph
from vitgraph.meta import COST, NodeCost, shape_of

FEATURES = ("const", "ops", "gemm", "elem")
VERSION = 1
_FREE = {"getattr", "getitem", "size", "dim", "numel"}  # bookkeeping, not runtime ops
_VIEWS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "expand", "chunk", "split",
          "unbind", "narrow", "select"}  # ops that move no data (their ops count, not their elements)


def _op_name(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """A short name of a runtime op, or None for placeholders, outputs, attributes and bookkeeping."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        name = "getitem" if node.target is operator.getitem else getattr(node.target, "__name__", str(node.target))
    else:
        return None
    return None if name in _FREE else name


def _membership(sets: Mapping[str, frozenset[str]]) -> dict[str, list[str]]:
    member: dict[str, list[str]] = defaultdict(list)
    for name, nodes in sets.items():
        for n in nodes:
            member[n].append(name)
    return member


def _existence(node: fx.Node, member: Mapping[str, list[str]]) -> tuple[str, ...]:
    """The factors that delete a node when 0: its block's, and the sets (branches, cuts) holding it."""
    cost: NodeCost | None = node.meta.get(COST)
    own = tuple(f for f in (cost.factors if cost else ()) if f.startswith("block."))
    return tuple(dict.fromkeys(own)) + tuple(member.get(node.name, ()))


def ops_table(g: VitGraph, sets: Mapping[str, frozenset[str]]) -> Table:
    """One per runtime op of the dense graph, scaled only by what deletes it."""
    member = _membership(sets)
    table: dict[tuple[str, ...], float] = defaultdict(float)
    for node in g.gm.graph.nodes:
        if _op_name(node, g.gm) is not None:
            table[_existence(node, member)] += 1.0
    return list(table.items())


def _width_factors(g: VitGraph) -> dict[int | None, list[tuple[str, int, int, int]]]:
    """Per block (None: the stream), (group, axis from the end or 1 for heads, size, head dim) to match shapes with."""
    out: dict[int | None, list[tuple[str, int, int, int]]] = defaultdict(list)
    for grp in g.structure.groups:
        if grp.kind == "embed":
            out[None].append((grp.name, -1, grp.units * grp.unit_width, 0))
        elif grp.kind == "mlp":
            out[grp.block].append((grp.name, -1, grp.units * grp.unit_width, 0))
        elif grp.kind == "heads":
            out[grp.block].append((grp.name, 1, grp.units, grp.unit_width))
    return out


def _has_width(shape: tuple[int, ...], axis: int, size: int, head_dim: int) -> bool:
    """A channel axis of ``size`` (axis -1), or heads: (B, H, N, d), or (B, N, H, d) as attention's output
    is transposed back to the tokens."""
    if axis == -1:
        return len(shape) > 1 and shape[-1] == size
    return len(shape) == 4 and (shape[1] == size or shape[2] == size and shape[3] == head_dim)


def elem_table(g: VitGraph, sets: Mapping[str, frozenset[str]]) -> Table:
    """Elements per image that the dense graph's non-GEMM, data-moving ops write, scaled by what deletes them,
    by the block's token fraction once per token axis of their output, and by the width group whose size
    their feature axis has (the stream's channels, a block's MLP units, its heads)."""
    member = _membership(sets)
    batch = g.example_inputs[0].shape[0]
    blocks = {f"block.{b.index}": b for b in g.structure.blocks}
    widths = _width_factors(g)
    table: dict[tuple[str, ...], float] = defaultdict(float)
    for node in g.gm.graph.nodes:
        name, cost, shape = _op_name(node, g.gm), node.meta.get(COST), shape_of(node)
        if name is None or name in _VIEWS or (cost is not None and cost.flops) or not shape or shape[0] != batch:
            continue
        factors = _existence(node, member)
        block = next((blocks[f] for f in factors if f in blocks), None)
        if block is not None:
            axes = sum(1 for d in shape[1:] if d == block.token_axis(g.structure.tokens.tokens))
            factors += (f"tokens.{block.index}",) * min(2, axes)
        for grp, axis, size, head_dim in widths[None] + (widths[block.index] if block is not None else []):
            if _has_width(shape, axis, size, head_dim):
                factors += (grp,)
                break
        table[factors] += math.prod(shape) / batch
    return list(table.items())


FEATURE_TABLES = {"ops": ops_table, "gemm": flops_table, "elem": elem_table}
TERMS = {"ops": {"op_terms": 1.0}, "gemm": {"cost_terms": 1.0}}  # what the axes add, per feature


def features(g: VitGraph, axes: list[Any], mode: str = "eval") -> dict[str, float]:
    """The latency model's features under the axes' decisions in ``mode`` (``const`` is 1)."""
    out = {"const": 1.0}
    for name, table in FEATURE_TABLES.items():
        pricer = Pricer(g, axes, table=table, terms=TERMS.get(name, {}))
        out[name] = float(pricer(mode)) * pricer.dense
    return out


def machine() -> str:
    """What the measurements depend on besides the model: CPU, core count, runtime versions."""
    import os

    import onnxruntime
    import torch
    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {cpu} x{os.cpu_count()}, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}")


@dataclass
class LatencyTable:
    """Coefficients (ms per unit of each feature) of one model on one runtime, and the measurements they
    were fitted to: ``samples`` of ``{"label", "features", "ratio"}``, ratio = compact / dense, measured."""

    model: str
    input_size: list[int]
    target: str
    batch: int
    threads: int
    machine: str
    dense_flops: int
    dense_ms: float
    coef: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    version: int = VERSION

    # -- the model ------------------------------------------------------------------------------
    def predict_ms(self, feats: Mapping[str, float]) -> float:
        return sum(self.coef[f] * feats[f] for f in FEATURES)

    def pricer_table(self, g: VitGraph, sets: Mapping[str, frozenset[str]]) -> Table:
        """The features' tables weighted by the coefficients: milliseconds over the pricer's factors."""
        rows: dict[tuple[str, ...], float] = defaultdict(float)
        rows[()] += self.coef["const"]
        for name, table in FEATURE_TABLES.items():
            for factors, value in table(g, sets):
                rows[factors] += self.coef[name] * value
        return [(k, v) for k, v in rows.items() if v]

    def dense_ratio(self) -> float:
        """The dense model on this runtime over the reference it is measured against: 1, except on a quantized
        runtime (``onnx-int8``), whose ratios are to the dense fp32 model (the dense row measures the INT8 gain)."""
        first = self.samples[0] if self.samples else {}
        return float(first.get("ratio", 1.0)) if first.get("label") == "dense" else 1.0

    def pricer(self, g: VitGraph, axes: list[Any]) -> Pricer:
        """Prices decisions as a fraction of the dense reference model's predicted latency."""
        return Pricer(g, axes, table=self.pricer_table,
                      terms={"cost_terms": self.coef["gemm"], "op_terms": self.coef["ops"]}, scale=self.dense_ratio())

    def errors(self) -> list[float]:
        """Relative error of the fitted model on each sample's measured ratio."""
        return [abs(self.predict_ratio(s["features"]) - s["ratio"]) / s["ratio"] for s in self.samples]

    def predict_ratio(self, feats: Mapping[str, float]) -> float:
        """The predicted latency under ``feats`` over the dense reference's (fp32 for a quantized runtime)."""
        dense = self.predict_ms(self.samples[0]["features"]) / self.dense_ratio() if self.samples else self.dense_ms
        return self.predict_ms(feats) / dense

    @staticmethod
    def fit_coef(samples: list[dict[str, Any]], dense_ms: float) -> dict[str, float]:
        """Non-negative least squares on relative error: every sample's measured ms = ratio x dense ms."""
        from scipy.optimize import nnls

        a = np.array([[s["features"][f] for f in FEATURES] for s in samples], dtype=np.float64)
        y = np.array([s["ratio"] * dense_ms for s in samples], dtype=np.float64)
        scale = a.max(axis=0)
        scale[scale == 0] = 1.0
        coef, _ = nnls(a / scale / y[:, None], np.ones_like(y))
        return {f: float(c / s) for f, c, s in zip(FEATURES, coef, scale)}

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        path = Path(path)
        hint = f"make one with `vitgraph profile MODEL --target T --batch N --out {path}`"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SpecError(f"latency table {path} does not exist; {hint}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SpecError(f"latency table {path} is not a vitgraph latency table (JSON): "
                            f"{type(e).__name__}; {hint}") from None
        names = {f for f in cls.__dataclass_fields__}
        if not isinstance(data, dict) or set(data) != names or data.get("version") != VERSION \
                or not isinstance(data.get("coef"), dict) or set(data["coef"]) != set(FEATURES):
            raise SpecError(f"latency table {path} is not a version-{VERSION} vitgraph latency table; {hint}")
        return cls(**data)

    def check(self, g: VitGraph, target: str, batch: int, source: str = "the latency table") -> None:
        """Refuse to price a model, runtime or batch the table was not measured for."""
        want = {"model": (g.name, self.model), "input size": (list(g.input_size), self.input_size),
                "dense FLOPs": (g.structure.flops, self.dense_flops), "target": (target, self.target),
                "batch": (batch, self.batch)}
        bad = [f"{k} {mine!r} (the table's: {theirs!r})" for k, (mine, theirs) in want.items() if mine != theirs]
        if bad:
            raise SpecError(f"{source} was measured for another setting: {'; '.join(bad)}. Profile this one: "
                            f"`vitgraph profile {g.name} --target {target} --batch {batch}`, or drop budget.table "
                            f"to use (or build) the cached table")
