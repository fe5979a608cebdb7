"""What a compile report kept, read from ``report.json`` (any version: keys beyond the contract may be absent):
per block the heads, value dims, MLP units, tokens and attention kind kept of the dense model's, the embedding
channels, and which axes the report has. ``views`` (report.md) and ``plot`` (kept.png) both draw from these."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Pair = tuple[int, int]  # (kept, dense)

WIDTH_KEYS = {"heads": ".heads", "head_dim": ".v_dims", "mlp": ".mlp"}  # report["kept"] group name suffixes
AXES = ("heads", "head_dim", "mlp", "embed", "tokens", "attention")  # in the order the views show them
AXIS_NAMES = {"heads": "heads", "head_dim": "value dims", "mlp": "MLP units", "embed": "embedding channels",
              "tokens": "tokens", "attention": "attention kind"}
KIND_LABELS = {"msa": "msa", "conv3": "3x3 conv", "conv1": "1x1 conv", "skip": "skipped"}


@dataclass(frozen=True)
class KeptBlock:
    """One dense block of a report and what the compact model kept of it, as (kept, dense) per axis;
    None where the dense block has no such part. ``kind``: the compact block's attention (msa, conv3,
    conv1, skip, ...), None when it has none."""

    index: int
    name: str
    removed: bool
    kind: str | None
    dense_kind: str | None
    heads: Pair | None
    v_dims: Pair | None  # value dims per head
    mlp: Pair | None
    tokens_in: Pair | None
    tokens_out: Pair | None
    flops: int

    def fraction(self, axis: str) -> float | None:
        """Kept fraction on ``axis`` (heads, head_dim, mlp, tokens_in, tokens_out); 0 when removed."""
        pair = getattr(self, "v_dims" if axis == "head_dim" else axis)
        return None if pair is None or not pair[1] else pair[0] / pair[1]


def _kind(attn: dict | None) -> str | None:
    return None if not attn else attn.get("kind", "msa")


def _pair(kept: Any, dense: Any) -> Pair | None:
    return (int(kept or 0), int(dense)) if dense else None


def kept_blocks(report: dict) -> list[KeptBlock]:
    """Per dense block (``dense_blocks``, else ``blocks``), what the compact block of the same name kept."""
    after = {b["name"]: b for b in report.get("blocks") or []}  # compact blocks keep their module names
    rows = []
    for i, d in enumerate(report.get("dense_blocks") or report.get("blocks") or []):
        b = after.get(d["name"])
        da, ba = d.get("attention") or {}, (b or {}).get("attention") or {}
        dm, bm = d.get("mlp") or {}, (b or {}).get("mlp") or {}
        msa = _kind(ba) == "msa"  # a converted or skipped attention keeps no heads and no value dims
        rows.append(KeptBlock(
            index=d.get("index", i), name=d["name"], removed=b is None, kind=_kind(ba),
            dense_kind=_kind(da),
            heads=_pair(ba.get("heads") if msa else 0, da.get("heads")),
            v_dims=_pair(ba.get("v_head_dim", ba.get("head_dim")) if msa else 0,
                         da.get("v_head_dim", da.get("head_dim")) if _kind(da) == "msa" else 0),
            mlp=_pair(bm.get("hidden"), dm.get("hidden")),
            tokens_in=_pair((b or {}).get("tokens_in"), d.get("tokens_in")),
            tokens_out=_pair((b or {}).get("tokens_out"), d.get("tokens_out")),
            flops=int((b or {}).get("flops") or 0)))
    return rows


def embed_kept(report: dict) -> Pair | None:
    """Residual-stream (embedding) channels kept, when the report pruned them."""
    kept, units = report.get("kept") or {}, report.get("units") or {}
    return (int(kept["embed"]), int(units["embed"])) if "embed" in kept and units.get("embed") else None


def report_axes(report: dict, rows: list[KeptBlock]) -> list[str]:
    """The axes the report has, in ``AXES`` order: a width group it pruned or a per-block count that changed,
    its embedding channels, a token axis, an attention that changed kind. A report with none of these (an
    older one, or depth alone) shows heads and MLP units, as the views always did."""
    kept = report.get("kept") or {}
    live = [r for r in rows if not r.removed]
    same = [r for r in live if r.kind == r.dense_kind]  # a converted attention is the attention axis's change

    def changed(field: str, among: list[KeptBlock]) -> bool:
        return any(getattr(r, field) is not None and getattr(r, field)[0] != getattr(r, field)[1] for r in among)

    found = {axis for axis, suffix in WIDTH_KEYS.items() if any(k.endswith(suffix) for k in kept)}
    found |= {axis for axis, field in (("heads", "heads"), ("head_dim", "v_dims")) if changed(field, same)}
    if changed("mlp", live):
        found.add("mlp")
    if embed_kept(report):
        found.add("embed")
    if report.get("tokens") or changed("tokens_in", live) or changed("tokens_out", live):
        found.add("tokens")
    if report.get("conv") or any(r.kind != r.dense_kind for r in live):
        found.add("attention")
    if not found - {"attention"}:
        found |= {axis for axis, field in (("heads", "heads"), ("mlp", "mlp")) if any(getattr(r, field) for r in rows)}
    return [a for a in AXES if a in found]
