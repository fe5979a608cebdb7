"""Residual blocks and the token axis.

A site (attention or MLP) is *residual* when its output reaches an add through ops that keep the
values per position (dropout, drop-path, layer-scale, a post-norm, window reversal) and the other
operand of that add is an ancestor of the site's input: ``x + f(x)``. An attention residual and the
MLP residual that follows it on the same stream form one block. The token analysis finds the patch
grid, the prefix tokens, how the head pools, and where tokens may be dropped.
"""
from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch.fx as fx

from vitgraph.analysis.ops import common_prefix, linear_info, op_kind, tensor_args
from vitgraph.meta import COST, SHAPE, AttentionSite, Block, MixerSite, MlpSite, Residual, TokenInfo, shape_of

_TO_ADD = {"dropout", "mul", "div", "norm", "shape", "function", "module", "method"}


def ancestors(node: fx.Node, follow: Callable[[fx.Node], bool] = lambda n: True) -> set[fx.Node]:
    """``node`` and every node it depends on through inputs accepted by ``follow``."""
    seen, stack = {node}, [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen and follow(a):
                seen.add(a)
                stack.append(a)
    return seen


def _after(floor: int, order: dict[fx.Node, int]) -> Callable[[fx.Node], bool]:
    return lambda n: order[n] >= floor


def _under_res_scale(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, str | None]:
    """The stream beneath an Identity or a learned scale on a shortcut, and the scaling node if any."""
    scale = None
    while True:
        kind = op_kind(node, gm)
        same = [a for a in tensor_args(node) if a.op != "get_attr" and shape_of(a) == shape_of(node)]
        if len(same) != 1 or kind not in ("dropout", "mul") or (kind == "mul" and scale is not None):
            return node, scale
        scale = node.name if kind == "mul" else scale
        node = same[0]


def _residual(out: fx.Node, site_input: fx.Node, gm: fx.GraphModule, kind: str,
              order: dict[fx.Node, int]) -> Residual | None:
    """The residual add a site's output flows into, if any."""
    node, scale, drop = out, None, None
    for _ in range(12):
        # data flows to users taking the node as first argument; x.reshape_as(node) only reads a shape
        data_users = [u for u in node.users if not (
            u.op == "call_method" and u.target in ("reshape_as", "view_as", "expand_as", "type_as")
            and u.args[0] is not node)]
        if len(data_users) != 1:
            return None
        user = data_users[0]
        k = op_kind(user, gm)
        if k == "add" and len(tensor_args(user)) == 2:
            skip = next(a for a in tensor_args(user) if a is not node)
            stream, skip_scale = _under_res_scale(skip, gm)
            identity = stream in ancestors(site_input, _after(order[stream], order))
            return Residual(add=user.name, skip=skip.name, branch_out=out.name, kind=kind,
                            layer_scale=scale, drop_path=drop, identity_skip=identity, skip_scale=skip_scale)
        if k not in _TO_ADD:
            return None
        if k == "mul" or (k == "module" and "scale" in str(user.target).lower()):
            scale = scale or user.name
        if k == "dropout" and user.op == "call_module" and "path" in type(gm.get_submodule(user.target)).__name__.lower():
            drop = user.name
        node = user
    return None


@dataclass(frozen=True)
class _Unit:
    """One site with its residual add, while blocks are being assembled."""

    kind: str                       # "attn" | "mlp" | "mixer"
    site: AttentionSite | MlpSite | MixerSite
    residual: Residual | None
    output: fx.Node                 # the site's last linear (or attention core)
    start: fx.Node                  # the residual stream entering the unit (its input without a residual)
    end: fx.Node                    # the residual stream leaving the unit (its output without a residual)
    spatial: bool = False           # an MLP whose hidden units pass through a k x k conv (it mixes tokens)


def _units(gm: fx.GraphModule, attention: list[AttentionSite], mlps: list[MlpSite],
           order: dict[fx.Node, int]) -> list[_Unit]:
    nodes = {n.name: n for n in gm.graph.nodes}
    sites = [("attn", a, nodes[a.proj] if a.proj else nodes[a.core], nodes[a.q].args[0]) for a in attention]
    sites += [("mlp", m, nodes[m.fc2], nodes[m.fc1[0]].args[0]) for m in mlps]
    units = []
    for kind, site, out, inp in sites:
        res = _residual(out, inp, gm, kind, order)
        units.append(_Unit(kind, site, res, out, inp if res is None else nodes[res.skip],
                           out if res is None else nodes[res.add], kind == "mlp" and _spatial(gm, site, nodes, order)))
    units += _conv_mixers(gm, units, order)
    return sorted(units, key=lambda u: order[u.output])


def _spatial(gm: fx.GraphModule, site: MlpSite, nodes: dict[str, fx.Node], order: dict[fx.Node, int]) -> bool:
    """Whether an MLP's hidden units pass through a spatial (k x k, depthwise) conv: PVT-v2's MLP, or
    CAFormer's SepConv token mixer (pointwise -> act -> depthwise 7x7 -> pointwise)."""
    floor = min(order[nodes[f]] for f in site.fc1)
    hidden = ancestors(nodes[site.fc2].args[0], _after(floor + 1, order))
    return any(op_kind(n, gm) == "conv" and linear_info(n, gm) is None for n in hidden)


def _conv_mixers(gm: fx.GraphModule, units: list[_Unit], order: dict[fx.Node, int]) -> list[_Unit]:
    """Residual branches ``x + f(x)`` whose f runs a convolution over the stream and holds no attention or
    MLP (an attention that became a conv3, XCiT's local patch interaction): token mixers without attention."""
    covered = {u.residual.add for u in units if u.residual is not None}
    sites = {u.output for u in units}
    inside = set().union(*(ancestors(u.output, _after(order[u.start] + 1, order)) for u in units)) if units else set()
    out = []
    for add in gm.graph.nodes:
        args = tensor_args(add)
        if op_kind(add, gm) != "add" or add.name in covered or add in inside or len(args) != 2 \
                or shape_of(args[0]) != shape_of(args[1]):  # (an add inside a site: MViT's residual pooling)
            continue
        for skip, branch in (args, args[::-1]):
            members = ancestors(branch, _after(order[skip] + 1, order))
            conv = next((m for m in members if op_kind(m, gm) == "conv"), None)
            if conv is not None and not members & sites and any(skip in m.all_input_nodes for m in members):
                res = Residual(add=add.name, skip=skip.name, branch_out=branch.name, kind="mixer")
                out.append(_Unit("mixer", MixerSite(_path(conv, gm), "conv3"), res, branch, skip, add))
                break
    return out


def _path(node: fx.Node, gm: fx.GraphModule) -> str:
    return str(node.target).rsplit(".", 1)[0] if node.op == "call_module" else node.name


def _pair(units: list[_Unit], order: dict[fx.Node, int]) -> list[list[_Unit]]:
    """An attention unit and the MLP unit right after it on the same stream form one block."""
    groups: list[list[_Unit]] = []
    i = 0
    while i < len(units):
        u, nxt = units[i], units[i + 1] if i + 1 < len(units) else None
        after = units[i + 2] if i + 2 < len(units) else None
        if u.kind == "attn" and nxt is not None and nxt.kind == "mixer" and after is not None \
                and after.kind == "mlp" and after.residual is not None:  # attention, a conv mixer, the MLP (XCiT)
            groups.append([u, nxt, after])
            i += 3
            continue
        # a token mixer (attention, a conv, or a residual MLP that an MLP follows: a converted conv1, a
        # separable conv) and the MLP after it on the same stream
        mixes = u.kind in ("attn", "mixer") or (u.kind == "mlp" and u.residual is not None
                                                 and (_patch_slice(u) or u.spatial))
        if mixes and nxt is not None and nxt.kind == "mlp" and nxt.residual is not None \
                and u.end in ancestors(nxt.start, _after(order[u.end], order)):
            if u.kind == "mlp" and u.spatial:  # its residual is the mixer's, not a removable MLP branch
                u = replace(u, kind="mixer", residual=replace(u.residual, kind="mixer"))
            groups.append([u, nxt])
            i += 2
        else:
            if not (u.kind == "mlp" and u.residual is None):  # a head MLP (pre-logits) is not a block
                groups.append([u])
            i += 1
    return groups


def _patch_slice(u: _Unit) -> bool:
    """Whether an MLP reads a slice of the tokens (``x[:, p:]``, the patches): a converted conv1 mixer,
    not a block's MLP (which reads every token)."""
    node = u.output
    for _ in range(8):  # fc2 <- act <- fc1 <- (the slice)
        if node.op == "call_function" and node.target is operator.getitem:
            idx = node.args[1]
            return isinstance(idx, tuple) and len(idx) == 2 and isinstance(idx[1], slice) and idx[1].start is not None
        if node is u.start or not node.all_input_nodes:
            return False
        node = node.all_input_nodes[0]
    return False


def _fate(node: fx.Node) -> str:
    """Where a site's output goes instead of a residual add, in a few words."""
    seen = 0
    while len(node.users) == 1 and seen < 6:  # through layer-scale, dropout, reshapes
        user = next(iter(node.users))
        kind = user.target if user.op == "call_method" else getattr(user.target, "__name__", str(user.target))
        if kind in ("stack", "cat"):
            return f"it is combined with other branches by {kind} before the add, which recognition does not take apart"
        if user.op == "output":
            return "it is the model's output"
        node, seen = user, seen + 1
    return "a stage transition: the stream changes shape or is projected after it"


def _skip_reason(group: list[_Unit], start: fx.Node, end: fx.Node) -> str | None:
    missing = next((u for u in group if u.residual is None), None)
    if missing is not None:
        return f"{missing.site.name} is not added to a residual stream ({_fate(missing.output)})"
    if not all(u.residual.identity_skip for u in group):
        return "the shortcut is projected or pooled (a stage transition)"
    scaled = next((u.residual.skip_scale for u in group if u.residual.skip_scale), None)
    if scaled is not None:
        return f"the shortcut is scaled (res-scale %{scaled}): removing the block leaves x * scale, not x"
    if not _same_stream(shape_of(start), shape_of(end)):
        return f"block input {shape_of(start)} and output {shape_of(end)} differ"
    return None


def _escapes(members: set[fx.Node], end: fx.Node, live: set[fx.Node]) -> str | None:
    """Why deleting the block would leave later nodes without a value they read from inside it."""
    computed = {n for n in members if n.meta.get(COST) is not None and n.meta[COST].flops > 0}
    for n in members:
        outside = [u for u in n.users if u not in members and u in live]  # dead trace leftovers do not count
        if n is end or not outside:
            continue
        if computed & ancestors(n, lambda a: a in members):
            outside = outside[0]
            return (f"%{outside.name} after the block reads %{n.name} computed inside it (e.g. a pooled feature "
                    f"size): the block cannot be deleted")
    return None


def find_blocks(gm: fx.GraphModule, attention: list[AttentionSite], mlps: list[MlpSite]) -> list[Block]:
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    live = ancestors(next(n for n in gm.graph.nodes if n.op == "output"))
    blocks = []
    for idx, group in enumerate(_pair(_units(gm, attention, mlps, order), order)):
        attn = next((u.site for u in group if u.kind == "attn"), None)
        mlp = group[-1].site if group[-1].kind == "mlp" else None
        mixer = "conv3" if group[0].kind == "mixer" else "conv1" if len(group) == 2 and group[0].kind == "mlp" \
            else None
        start, end = group[0].start, group[-1].end
        members = ancestors(end, _after(order[start] + 1, order)) - {start}
        reason = _skip_reason(group, start, end) or _escapes(members, end, live)
        member_names = tuple(n.name for n in gm.graph.nodes if n in members)
        flops = sum(nodes[n].meta[COST].flops for n in member_names if COST in nodes[n].meta)
        params = sum(nodes[n].meta[COST].params for n in member_names if COST in nodes[n].meta)
        blocks.append(Block(
            index=idx, name=_block_name([u.site.name for u in group]),
            attention=replace(attn, block=idx) if attn is not None else None,
            mlp=replace(mlp, block=idx) if mlp is not None else None,
            residuals=tuple(u.residual for u in group if u.residual is not None), input=start.name,
            output=end.name, tokens_in=_tokens(shape_of(start)), tokens_out=_tokens(shape_of(end)),
            skippable=reason is None, skip_reason=reason, token_prunable=False, token_reason=None,
            nodes=member_names, flops=flops, params=params, mixer=mixer))
    return _unique_names(_last_reader_stays(blocks))


def _last_reader_stays(blocks: list[Block]) -> list[Block]:
    """The last block whose attention reads more tokens than its own (CaiT's class attention over the patch
    tokens) is what connects those tokens to the output: neither it nor its attention branch may go."""
    readers = [b for b in blocks if b.attention is not None and b.attention.tokens_kv > b.tokens_in]
    if not readers:
        return blocks
    last = readers[-1]
    why = (f"its attention is the last reader of the {last.attention.tokens_kv} tokens it attends over (its own "
           f"{last.tokens_in} and the stream's): removing it would cut the stream off from the output")
    kept = replace(last, skippable=False, skip_reason=last.skip_reason or why,
                   residuals=tuple(replace(r, removable=False) if r.kind == "attn" else r for r in last.residuals))
    return [kept if b is last else b for b in blocks]


def _unique_names(blocks: list[Block]) -> list[Block]:
    """Blocks are decided by name: two residual blocks in one module (TNT's inner and outer transformer) are
    told apart by their attention site's own name (``blocks.0.attn_in``), else by their index."""
    names = [b.name for b in blocks]
    out = []
    for b in blocks:
        if names.count(b.name) > 1:
            own = b.attention.name if b.attention is not None else None
            unique = own if own and [x.attention.name if x.attention else None for x in blocks].count(own) == 1 \
                else f"{b.name}#{b.index}"
            b = replace(b, name=unique)
        out.append(b)
    return out


def _same_stream(a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> bool:
    """Equal, or equal up to a reshape between (B, H, W, C) and (B, H*W, C)."""
    if a is None or b is None:
        return False
    return a == b or (a[0] == b[0] and a[-1] == b[-1] and math.prod(a) == math.prod(b))


def _tokens(shape: tuple[int, ...] | None) -> int:
    if not shape or len(shape) < 3:
        return 0
    if len(shape) == 3:
        return shape[1]
    return shape[1] * shape[2]  # (B, H, W, C) grid layout


def _block_name(paths: list[str]) -> str:
    prefix = common_prefix(paths)
    if len(paths) == 1 or not prefix:
        return paths[0].rsplit(".", 1)[0] if paths and "." in paths[0] else (paths[0] if paths else "")
    return prefix


def find_tokens(gm: fx.GraphModule, blocks: list[Block]) -> TokenInfo:
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first_in = nodes[_token_start(gm, blocks, order, nodes).input] if blocks else None
    stream = shape_of(first_in) if first_in is not None else None
    embed = None
    if first_in is not None:
        convs = [n for n in gm.graph.nodes if order[n] < order[first_in] and op_kind(n, gm) == "conv"]
        embed = convs[-1] if convs else None
    grid = None
    if embed is not None and shape_of(embed) and len(shape_of(embed)) == 4:
        grid = tuple(shape_of(embed)[-2:])
    layout, tokens, dim = "sequence", 0, 0
    if stream is not None and len(stream) == 3:
        tokens, dim = stream[1], stream[2]
    elif stream is not None and len(stream) == 4:
        layout = "grid" if grid and stream[1:3] == grid else "channels"
        tokens = stream[1] * stream[2] if layout == "grid" else stream[2] * stream[3]
        dim = stream[3] if layout == "grid" else stream[1]
    prefix = max(0, tokens - grid[0] * grid[1]) if grid and layout == "sequence" else 0
    pooling, pool = _pooling(gm, blocks, order, nodes)
    head = _classifier(gm, pool)
    return TokenInfo(embed=embed.name if embed is not None else None, grid=grid, embed_dim=dim, tokens=tokens,
                     prefix_tokens=prefix, pooling=pooling, layout=layout,
                     pool=pool.name if pool is not None else None, head=head.name if head is not None else None)


def _token_start(gm: fx.GraphModule, blocks: list[Block], order: dict, nodes: dict) -> Block:
    """The block the tokens enter: the first, or in a hybrid (a CNN backbone's residual stages, then a patch
    embedding, then attention blocks) the first attention block after that embedding convolution."""
    at = next((i for i, b in enumerate(blocks) if b.attention is not None), 0)
    if at == 0:
        return blocks[0]
    lo, hi = order[nodes[blocks[at - 1].output]], order[nodes[blocks[at].input]]
    embeds = [n for n in gm.graph.nodes if lo < order[n] < hi and op_kind(n, gm) == "conv"]
    return blocks[at] if embeds else blocks[0]


def _classifier(gm: fx.GraphModule, pool: fx.Node | None) -> fx.Node | None:
    """The last linear between the pooling op and the output (None for a feature extractor)."""
    if pool is None:
        return None
    feeding = ancestors(next(n for n in gm.graph.nodes if n.op == "output"))
    after = False
    head = None
    for n in gm.graph.nodes:
        after = after or n is pool
        if after and n in feeding and op_kind(n, gm) == "linear":
            head = n
    return head


def _pooling(gm: fx.GraphModule, blocks: list[Block], order: dict, nodes: dict) -> tuple[str, fx.Node | None]:
    """How the classifier reads the tokens (class token(s), a mean, an attention pool), and the op."""
    if not blocks:
        return "unknown", None
    floor = order[nodes[blocks[-1].output]]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    queue, seen = deque(out.all_input_nodes), set()
    while queue:
        n = queue.popleft()
        if n in seen or order[n] < floor:
            continue
        seen.add(n)
        kind = op_kind(n, gm)
        src = shape_of(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if kind == "shape" and n.op == "call_function" and n.target.__name__ == "getitem" and src and len(src) == 3:
            if _from_latent_query(n.args[0], blocks, nodes):
                return "attn", n
            idx = n.args[1]
            if isinstance(idx, tuple) and len(idx) >= 2 and isinstance(idx[1], int):
                return "token", n
            if isinstance(idx, tuple) and len(idx) >= 2 and isinstance(idx[1], slice) and idx[1].start:
                queue.extend(n.all_input_nodes)  # x[:, prefix:] before a mean
                continue
        if kind in ("reduce", "pool"):
            return "avg", n
        if kind in ("sdpa", "softmax"):
            return "attn", n
        queue.extend(n.all_input_nodes)
    return "none", None


def _from_latent_query(node: fx.Node, blocks: list[Block], nodes: dict) -> bool:
    """Whether ``node`` is the output of a block whose queries are learned latents (attention pooling)."""
    for b in blocks:
        if b.output == node.name and b.attention is not None:
            # follow tensors only: x.shape[0] for expand() is not data
            q_from = ancestors(nodes[b.attention.q].args[0], lambda n: n.meta.get(SHAPE) is not None)
            return not any(n.op == "placeholder" for n in q_from)
    return False


def branch_members(gm: fx.GraphModule, block: Block, residual: Residual) -> set[str]:
    """Names of the nodes that only ``residual``'s branch computes (what deleting the branch removes)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    add, skip = nodes[residual.add], nodes[residual.skip]
    inside = set(block.nodes)

    def upstream(start: fx.Node) -> set[str]:
        return {n.name for n in ancestors(start, lambda a: a.name in inside) if n.name in inside}

    operand = next(a for a in add.args if isinstance(a, fx.Node) and a is not skip)
    return upstream(operand) - upstream(skip)


def removable_residual(block: Block | None, kind: str) -> Residual | None:
    """The residual of ``block`` whose branch is the ``kind`` ("attn" | "mlp") site alone, whose shortcut is a
    plain identity (deleting that branch leaves exactly the stream) and which nothing else needs (``removable``)."""
    for r in block.residuals if block is not None else ():
        if r.kind == kind and r.identity_skip and r.skip_scale is None and r.removable:
            return r
    return None
