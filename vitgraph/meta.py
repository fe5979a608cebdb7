"""Every ``node.meta`` key vitgraph writes, and the typed values stored under them.

Analyses write these keys; passes read them and never re-derive roles on their own. Values are
frozen dataclasses validated in ``__post_init__``, and refer to other nodes *by name* (``str``) so
they survive graph copies; resolve a name with ``VitGraph.node(name)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# -- node.meta keys -------------------------------------------------------------------------------
SHAPE = "vg.shape"    # tuple[int, ...] for a tensor, a tuple of those for a tuple of tensors
VALUE = "vg.value"    # the python value of a non-tensor node (sizes, ints, tuples of ints)
DTYPE = "vg.dtype"    # torch.dtype of a tensor node
ROLE = "vg.role"      # Role: what the node is in the recognised structure
COST = "vg.cost"      # NodeCost: FLOPs and parameter count of the node
CARRIES = "vg.carries"  # str: on a call an instrument pass put into a stream, the stream node it passes on
LEAF_FLOPS = "vg.leaf_flops"  # FLOPs FlopCounterMode measured inside an opaque leaf call (whole batch)
GROUP_SLICES = "vg.group_slices"  # on a call a rewrite added: {channel group name: the SliceRefs it follows}

# -- graph-wide names the instrument passes give their submodules ----------------------------------
GATES = "vg_gates"         # every width (unit) gate: vg_gates.<group with "." -> "_">
BLOCK_GATES = "vg_blocks"  # every block or branch gate: vg_blocks.<unit with "." -> "_">
EXITS = "vg_exits"         # every exit classifier: vg_exits.exit<e>
TOKENS = "vg_tokens"       # token selectors vg_tokens.<block>, key masks vg_tokens.mask_<i>, vg_tokens.final
CONV_GATES = "vg_conv"     # attention -> convolution choices: vg_conv.<attention with "." -> "_">


def submodule_name(root: str, name: str) -> str:
    """Where an instrument pass registers the module for ``name`` (a group or unit) under ``root``."""
    return f"{root}.{name.replace('.', '_')}"

ROLE_KINDS = frozenset({
    "attn.qkv",      # fused projection producing q, k and v
    "attn.qk",       # fused projection producing q and k only
    "attn.kv",       # fused projection producing k and v
    "attn.q", "attn.k", "attn.v",
    "attn.q_norm", "attn.k_norm",
    "attn.core",     # scaled_dot_product_attention call, or the softmax of an explicit attention
    "attn.proj",     # output projection consuming the merged heads
    "mlp.fc1",       # first linear (or one of the two of a gated MLP)
    "mlp.act",
    "mlp.fc2",
    "residual.add",  # x + f(x)
    "tokens.embed",  # the patch embedding producing the token grid
    "head.pool",     # the op that pools tokens for the classifier
    "head.fc",       # the classifier
})


@dataclass(frozen=True)
class Role:
    """What a node is: ``Role(kind="attn.qkv", block=3, site="blocks.3.attn")``."""

    kind: str
    block: int | None = None
    site: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ROLE_KINDS:
            raise ValueError(f"unknown role kind {self.kind!r}; known: {sorted(ROLE_KINDS)}")


@dataclass(frozen=True)
class NodeCost:
    """Per-image cost of one node. ``factors`` names the prunable dimensions the FLOPs scale with."""

    flops: int
    params: int = 0
    factors: tuple[str, ...] = ()
    # shares of ``flops`` that scale with further factors too: a fused qkv's v rows, sdpa's attn @ v
    parts: tuple[tuple[int, tuple[str, ...]], ...] = ()

    def rows(self) -> list[tuple[int, tuple[str, ...]]]:
        """(FLOPs, factors) pieces summing to ``flops``: the parts, then the rest with ``factors`` alone."""
        rest = self.flops - sum(f for f, _ in self.parts)
        return [(f, self.factors + extra) for f, extra in self.parts] + ([(rest, self.factors)] if rest else [])


@dataclass(frozen=True)
class Linear:
    """A linear-like op: ``call_module`` nn.Linear, ``F.linear`` on a weight attribute, or a pointwise
    (1x1, stride 1, unpadded, ungrouped) nn.Conv2d, which is a linear over its channel axis."""

    node: str
    weight: str          # qualified parameter name of the weight: (out, in) or (out, in, 1, 1)
    bias: str | None
    in_features: int
    out_features: int
    channel_axis: int = -1  # the axis of the input and output holding the features: 1 for a conv

    def __post_init__(self) -> None:
        if self.channel_axis not in (-1, 1):
            raise ValueError(f"{self.node}: channel_axis is -1 (a linear) or 1 (a pointwise conv), "
                             f"got {self.channel_axis}")


@dataclass(frozen=True)
class AttentionSite:
    """One attention: its core op, projections, heads and where each pass may apply."""

    name: str                     # module path of the attention, e.g. "blocks.3.attn"
    core: str                     # node of sdpa, or of the softmax of an explicit attention
    impl: str                     # "sdpa" | "explicit"
    mode: str                     # "token" (softmax over tokens) | "channel" (XCiT-style, over head dims)
    #                               | "separable" (MobileViT-v2: a softmax over tokens pools the keys into one vector)
    heads: int
    head_dim: int                 # width of q and k per head
    v_head_dim: int               # width of v per head
    tokens_q: int
    tokens_kv: int
    q: str                        # linear nodes producing q, k, v (the same node when fused)
    k: str
    v: str
    proj: str | None              # output projection linear
    fused: str                    # "qkv" | "q+kv" | "qk+v" | "separate"
    q_norm: str | None = None
    k_norm: str | None = None
    bias: str | None = None       # "rel_pos_table" | "mask" | "params" | None — what is added to the logits
    block: int | None = None
    prunable: dict[str, str | None] = field(default_factory=dict)  # axis -> None (ok) or the reason not
    mixes: tuple[str, ...] = ()   # talking heads: the nodes mixing the attention maps across heads, in order
    head_cores: tuple[str, ...] = ()  # heads run one per chunk (cascaded group attention): the other heads' cores

    def __post_init__(self) -> None:
        if self.impl not in ("sdpa", "explicit") or self.mode not in ("token", "channel", "separable"):
            raise ValueError(f"bad attention site {self.name}: impl={self.impl} mode={self.mode}")
        if self.heads < 1 or self.head_dim < 1:
            raise ValueError(f"bad attention site {self.name}: heads={self.heads} head_dim={self.head_dim}")


@dataclass(frozen=True)
class MlpSite:
    """Linear -> activation -> Linear, or a gated variant (two fc1 halves multiplied)."""

    name: str
    fc1: tuple[str, ...]          # one linear, or (value, gate) linears of a gated MLP
    act: str | None
    fc2: str
    hidden: int
    gated: bool
    block: int | None = None
    prunable: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Residual:
    """``out = skip + branch``: the add node, the skip operand and the branch's site."""

    add: str
    skip: str
    branch_out: str
    kind: str                     # "attn" | "mlp" | "attn+mlp" | "mixer" (a conv token mixer)
    layer_scale: str | None = None
    drop_path: str | None = None
    identity_skip: bool = True    # the skip operand is the branch's own input (no projection/pooling)
    skip_scale: str | None = None  # a learned res-scale multiplying the shortcut (MetaFormer's res_scale)
    removable: bool = True         # the branch may be deleted (not when it is all that links tokens to the output)


@dataclass(frozen=True)
class Block:
    """One transformer block: an attention and/or an MLP site with their residual adds."""

    index: int
    name: str
    attention: AttentionSite | None
    mlp: MlpSite | None
    residuals: tuple[Residual, ...]
    input: str
    output: str
    tokens_in: int
    tokens_out: int
    skippable: bool
    skip_reason: str | None
    token_prunable: bool
    token_reason: str | None
    nodes: tuple[str, ...] = ()   # every node of the block's branches and adds
    flops: int = 0
    params: int = 0
    mixer: str | None = None      # a token mixer that is not an attention: "conv3" (spatial conv) | "conv1"

    def token_axis(self, stream: int) -> int:
        """The size of the token axes that scale when the stream's tokens are dropped before this block:
        its own token count, or its key count for a reader block (an attention pool: a few queries of its
        own attending over the stream's ``stream`` tokens, or over its own queries and the stream's tokens, as
        CaiT's class attention does)."""
        return self.attention.tokens_kv if self.reads_stream(stream) else self.tokens_in

    def reads_stream(self, stream: int) -> bool:
        """Its queries are its own (fewer tokens than the stream) and its keys/values are the stream's tokens,
        alone or after its own queries (``cat(queries, stream)``)."""
        a = self.attention
        return (a is not None and self.tokens_in < stream and a.tokens_q == self.tokens_in
                and a.tokens_kv in (stream, stream + self.tokens_in))


@dataclass(frozen=True)
class MixerSite:
    """A residual branch that mixes tokens without attention (a converted attention's convolution)."""

    name: str
    kind: str                     # "conv3" | "conv1"


@dataclass(frozen=True)
class DepthUnit:
    """A skippable block or branch: the stream nodes its gate sits between."""

    name: str                   # "blocks.3" (a whole block) or "blocks.3.attn" (one branch)
    block: int
    kind: str                   # "block" | "attn" | "mlp"
    start: str                  # block: the stream entering it; branch: the shortcut operand of its add
    end: str                    # block: the stream leaving it; branch: its residual add

    def __post_init__(self) -> None:
        if self.kind not in ("block", "attn", "mlp"):
            raise ValueError(f"bad depth unit {self.name}: kind {self.kind!r} is not block, attn or mlp")

    @property
    def gate(self) -> str:
        return submodule_name(BLOCK_GATES, self.name)


@dataclass(frozen=True)
class SliceRef:
    """A slice of a parameter or a dimension of a node that one coupled unit owns.

    ``indices[u]`` lists the positions along ``axis`` that unit ``u`` of the group owns.
    """

    target: str                   # parameter name, or node name for activations
    axis: int
    indices: tuple[tuple[int, ...], ...]
    what: str                     # "weight.out" | "weight.in" | "bias" | "norm" | ...

    def describe(self) -> str:
        first = self.indices[0] if self.indices else ()
        span = f"{first[0]}..{first[-1]}" if len(first) > 1 else (str(first[0]) if first else "-")
        return f"{self.target}.{self.what}[{len(self.indices)}x{len(first)}: unit0={span}]"


@dataclass(frozen=True)
class ConstRef:
    """A reshape/view argument that must change when the group shrinks.

    ``per_unit`` is how much the argument moves per removed unit (1 for a head count, head_dim for a
    merged width); ``literal`` is False when the value comes from another node (e.g. ``x.shape[2]``)
    and the rewrite must replace that argument.
    """

    node: str
    arg_index: int
    value: int
    per_unit: int
    literal: bool


@dataclass(frozen=True)
class UnitInput:
    """An input the group's gate masks where it enters ``node`` (argument ``arg``), one entry per unit along
    ``axis``: the logits of every head entering a talking-heads mix, whose slice the cut removes."""

    node: str
    arg: int
    axis: int


@dataclass(frozen=True)
class CoupledGroup:
    """Dimensions that must shrink together: ``blocks.0.attn.qkv.out[6 heads] => blocks.0.attn.proj.in``."""

    name: str
    kind: str                     # "heads" | "head_dim" | "mlp" | "embed"
    site: str
    block: int | None
    units: int                    # number of prunable units (heads, units)
    unit_width: int               # channels per unit in the producer
    slices: tuple[SliceRef, ...]
    constants: tuple[ConstRef, ...] = ()
    norms: tuple[str, ...] = ()   # embed: the LayerNorms over its channels (statistics over kept channels)
    unit_inputs: tuple[UnitInput, ...] = ()  # heads: maps entering a talking-heads mix, masked per head

    @property
    def branch(self) -> str:
        """The residual branch the group lives in: "attn" (heads, value dims), "mlp", or "stream" (embed)."""
        return "attn" if self.kind in ("heads", "head_dim") else "stream" if self.kind == "embed" else "mlp"

    def __str__(self) -> str:
        parts = " => ".join(
            f"{s.target.removesuffix('.weight')}.{s.what.split('.')[-1]}[{self.units}x{len(s.indices[0]) if s.indices else 0}]"
            for s in self.slices)
        return f"{self.name}: {parts}" + (f"  (+{len(self.constants)} reshape constants)" if self.constants else "")


@dataclass(frozen=True)
class TokenInfo:
    """The token axis: embedding, grid, prefix tokens, pooling."""

    embed: str | None             # patch-embedding node
    grid: tuple[int, int] | None  # (Gh, Gw) patch grid
    embed_dim: int
    tokens: int                   # tokens entering the first block (prefix + patches)
    prefix_tokens: int
    pooling: str                  # "token" | "avg" | "attn" | "none" | "unknown"
    layout: str                   # "sequence" (B, N, C) | "grid" (B, H, W, C) | "channels" (B, C, H, W)
    pool: str | None = None       # the node that pools tokens for the head
    head: str | None = None       # the classifier linear


@dataclass(frozen=True)
class Structure:
    """Everything recognised in one traced ViT."""

    blocks: tuple[Block, ...]
    attention: tuple[AttentionSite, ...]
    mlps: tuple[MlpSite, ...]
    tokens: TokenInfo
    groups: tuple[CoupledGroup, ...]
    flops: int
    params: int
    notes: tuple[str, ...] = ()
    embed_reason: str | None = None  # why the stream's channels cannot narrow (None: the "embed" group exists)

    def group(self, name: str) -> CoupledGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def attention_site(self, name: str) -> AttentionSite:
        for a in self.attention:
            if a.name == name:
                return a
        raise KeyError(name)


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The tensor shape recorded on a node (None when it is not a single tensor)."""
    s = node.meta.get(SHAPE)
    if isinstance(s, tuple) and all(isinstance(d, int) for d in s):
        return s
    return None
