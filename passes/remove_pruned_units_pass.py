"""Materialize: strip the gates and physically remove the units they closed.

For each coupled group with pruned units: every slice (qkv rows and biases, per-head tables,
norms, fc1 rows, the depthwise filters between fc1 and fc2, the proj / fc2 input columns) keeps only
the kept units' indices, and every reshape/view constant of the group moves by ``per_unit`` for
each removed unit. A group with no unit left loses its whole residual branch: the add becomes its skip
input. Then dead nodes and unused modules go, so the compact graph holds no trace of the gates. Slices
and constants inside blocks an earlier rewrite deleted (a stream group spans every block; depth may
remove some) are left alone: the graph no longer uses them. Layers an earlier rewrite added on a group's
channels (the convolutions that replace attention, on the stream's) declare the slices they follow on their
call nodes (``node.meta[GROUP_SLICES]``: group name -> slices) and are sliced with the group.

Invariant (tests/test_width.py): the gated graph in ``eval`` mode equals the result.
"""
from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vitgraph.passes.base import PassResult, VitPass, drop_root, ensure_no_calls, require_nodes
from vitgraph.passes.insert_unit_gates_pass import branch_add
from vitgraph.errors import PreconditionError
from vitgraph.meta import GATES, GROUP_SLICES, Block, ConstRef, CoupledGroup, submodule_name



class RemovePrunedUnitsPass(VitPass):
    """After: no gate nodes; each group's tensors are sliced to ``kept[group]`` units; reshape
    constants use the new counts; groups with nothing kept have no residual branch."""

    def __init__(self, groups: Sequence[CoupledGroup], blocks: Sequence[Block], kept: Mapping[str, Sequence[int]]
                 ) -> None:
        self.groups = {g.name: g for g in groups}
        self.blocks = {b.index: b for b in blocks}
        self.kept = {k: sorted(int(u) for u in v) for k, v in kept.items()}

    def requires(self, gm: fx.GraphModule) -> None:
        unknown = [k for k in self.kept if k not in self.groups]
        if unknown:
            raise PreconditionError(f"{self.name}: no coupled group named {unknown[0]!r}")
        for name, units in self.kept.items():
            n = self.groups[name].units
            if any(not 0 <= u < n for u in units):
                raise PreconditionError(f"{self.name}: kept units {units} of {name} are outside 0..{n - 1}")

    def call(self, gm: fx.GraphModule) -> PassResult:
        counters = {"gates_removed": 0, "units_removed": 0, "branches_removed": 0, "groups_gone": 0}
        # a group whose gate is no longer called went with its block or branch (an earlier rewrite): leave it
        live = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        kept = {k: v for k, v in self.kept.items() if submodule_name(GATES, k) in live}
        counters["groups_gone"] = len(self.kept) - len(kept)
        for name, units in kept.items():  # first, while the branch gates still mark the branch operand
            if not units:
                self._remove_branch(gm, name)
                counters["branches_removed"] += 1
        counters["gates_removed"] = _strip_gates(gm, kept)
        present = live_nodes(gm)  # (rewriting constants below changes no node)
        for name in kept:  # sizes computed from a width that shrinks keep their dense meaning (before any rewrite)
            frozen = [c for c in self.groups[name].constants if c.per_unit == 0 and c.node in present]
            _set_constants(gm, frozen, 0, self.name)
        live = self._live_view(gm)
        for name, units in kept.items():
            group = self.groups[name]
            removed = group.units - len(units)
            counters["units_removed"] += removed
            if removed == 0 or not units:
                continue
            group = _with_followers(gm, live(group))
            slice_group(gm, group, units)
            rewrite_constants(gm, group, removed, self.name)
        drop_root(gm, GATES)
        modified = counters["gates_removed"] > 0 or counters["units_removed"] > 0
        return PassResult(gm, modified=modified, counters=counters)

    def _live_view(self, gm: fx.GraphModule) -> Callable[[CoupledGroup], CoupledGroup]:
        """A group without the slices and constants of blocks or branches no longer in the graph (the graph's
        nodes are read once: slicing and moving constants change no node)."""
        nodes = live_nodes(gm)
        # whole blocks, or single branches (depth.per_branch) whose modules went with them
        gone = {n for b in self.blocks.values() for n in b.nodes if n not in nodes}
        used = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}

        def view(group: CoupledGroup) -> CoupledGroup:
            if not gone:
                return group
            slices = tuple(s for s in group.slices if _in_use(s.target, used))
            constants = tuple(c for c in group.constants if c.node in nodes or c.node not in gone)
            return dataclasses.replace(group, slices=slices, constants=constants)
        return view

    def _remove_branch(self, gm: fx.GraphModule, name: str) -> None:
        """The group keeps no unit: its residual add becomes the add's other operand (the stream, which
        may by now be another pass's node, e.g. a block gate's output)."""
        target = submodule_name(GATES, name)
        gate = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == target
                     and n.kwargs.get("branch")), None)
        if gate is None or branch_add(self.blocks, self.groups[name]) is None or len(gate.users) != 1:
            raise PreconditionError(f"{self.name}: every unit of {name} is pruned but its residual branch cannot be "
                                    f"removed; keep at least one unit")
        branch, add = gate, next(iter(gate.users))
        while not _is_add(add) and len(add.users) == 1:  # through other passes' branch gates
            branch, add = add, next(iter(add.users))
        skip = next((a for a in add.args if isinstance(a, fx.Node) and a is not branch), None)
        if not _is_add(add) or skip is None:
            raise PreconditionError(f"{self.name}: the branch of {name} does not end in a residual add "
                                    f"({add.format_node()})")
        add.replace_all_uses_with(skip)
        gm.graph.erase_node(add)

    def ensures(self, gm: fx.GraphModule) -> None:
        super().ensures(gm)
        ensure_no_calls(gm, GATES, self.name, "gate")


def _with_followers(gm: fx.GraphModule, group: CoupledGroup) -> CoupledGroup:
    """``group`` plus the slices live calls declare they follow (``GROUP_SLICES``)."""
    extra = tuple(s for n in gm.graph.nodes for s in n.meta.get(GROUP_SLICES, {}).get(group.name, ()))
    return dataclasses.replace(group, slices=group.slices + extra) if extra else group


def _in_use(target: str, used: set[str]) -> bool:
    """Whether a live attribute read or module call reaches parameter ``target``."""
    return any(target == t or target.startswith(t + ".") for t in used)


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add)) or \
        (node.op == "call_method" and node.target == "add")


def _strip_gates(gm: fx.GraphModule, kept: Mapping[str, Sequence[int]]) -> int:
    """Every gate call goes; a gate standing for a LayerNorm (``eps=``) becomes that norm over the kept channels."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(GATES + "."):
            if node.kwargs.get("eps") is not None:
                gate = gm.get_submodule(node.target)
                size = len(kept.get(gate.group, range(gate.units)))
                with gm.graph.inserting_before(node):
                    norm = gm.graph.call_function(F.layer_norm, (node.args[0], (size,)), {
                        "weight": node.kwargs.get("weight"), "bias": node.kwargs.get("bias"),
                        "eps": node.kwargs["eps"]})
                node.replace_all_uses_with(norm)
            else:
                node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            n += 1
    return n


def slice_group(gm: fx.GraphModule, group: CoupledGroup, units: list[int]) -> None:
    """Keep only ``units`` in every parameter and buffer slice of ``group``."""
    for sl in group.slices:
        owner, _, attr = sl.target.rpartition(".")
        module = gm.get_submodule(owner)
        old = getattr(module, attr)
        idx = torch.tensor(sorted(i for u in units for i in sl.indices[u]), dtype=torch.long, device=old.device)
        new = old.detach().index_select(sl.axis, idx).clone()
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module.register_buffer(attr, new)
        _sync_sizes(module)


def _sync_sizes(module: nn.Module) -> None:
    """Keep the size attributes of standard modules true to their new weights (repr, re-tracing)."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.in_channels == module.out_channels \
            and module.weight.shape[1] == 1:  # a depthwise conv: one (1, k, k) filter per channel, kept or cut
        module.groups = module.in_channels = module.out_channels = module.weight.shape[0]
    elif isinstance(module, nn.Conv2d) and module.groups == 1:  # a pointwise conv: (out, in, 1, 1)
        module.out_channels, module.in_channels = module.weight.shape[:2]
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
        module.num_features = module.weight.shape[0]


def rewrite_constants(gm: fx.GraphModule, group: CoupledGroup, removed: int, pass_name: str = "rewrite") -> None:
    """Move every reshape/view constant of ``group`` by ``per_unit`` for each of ``removed`` units (the frozen
    ones, ``per_unit`` 0, were set before any group moved its own)."""
    _set_constants(gm, [c for c in group.constants if c.per_unit], removed, pass_name)


def live_nodes(gm: fx.GraphModule) -> set[str]:
    return {n.name for n in gm.graph.nodes}


def _set_constants(gm: fx.GraphModule, constants: Sequence[ConstRef], removed: int, pass_name: str) -> None:
    nodes = require_nodes(gm, (c.node for c in constants), pass_name, "reshape")
    for c in constants:
        node = nodes[c.node]
        sizes = list(node.args[1:])  # args[0] is the tensor, for x.view(...) and torch.reshape(x, ...)
        value = c.value - removed * c.per_unit
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            packed = list(sizes[0])
            packed[c.arg_index] = value
            node.args = (node.args[0], tuple(packed))
        else:
            sizes[c.arg_index] = value
            node.args = (node.args[0], *sizes)


def probe(gm: fx.GraphModule, groups: Sequence[CoupledGroup], example_inputs: tuple[torch.Tensor, ...]
          ) -> dict[str, str]:
    """Which groups' rewrite breaks the graph: each keeps every other unit in a copy of the dense graph, which
    must still run on the example (fake tensors). Group name -> the failure; empty when every rewrite runs.
    Where all together fail, each is tried alone, then groups that fail only together (a table two groups
    share) are left out from the last until the rest runs."""
    import copy

    from vitgraph.analysis.shapes import propagate_shapes

    def failure(subset: Sequence[CoupledGroup]) -> str | None:
        trial = copy.deepcopy(gm)
        try:
            for group in subset:
                _set_constants(trial, [c for c in group.constants if c.per_unit == 0], 0, "probe")
            for group in subset:
                slice_group(trial, group, list(range(0, group.units, 2)))
                rewrite_constants(trial, group, group.units // 2, "probe")
            propagate_shapes(trial, example_inputs, fake=True)
        except Exception as exc:  # noqa: BLE001 - the failure is the finding
            return " ".join(str(exc).split("While executing")[0].split())[:240]
        return None

    # heads and MLP units: sliced on the dense graph as is (value dims are split out, and the stream's norms
    # masked, by other passes first; their rewrites are checked by parity like every other)
    many = [g for g in groups if g.units > 1 and g.kind in ("heads", "mlp")]
    if not many or failure(many) is None:
        return {}
    broken = {g.name: why for g in many if (why := failure([g])) is not None}
    rest = [g for g in many if g.name not in broken]
    while rest and (why := failure(rest)) is not None:
        broken[rest.pop().name] = f"with the other groups: {why}"
    return broken
