"""Property tests: random small ViTs x random decisions on every axis that applies to them.

Models: timm's ``VisionTransformer`` (fused qkv; sdpa or the explicit softmax; class token, registers,
mean pooling or an attention-pool head; layer-scale; q/k norms; qkv bias) and ``tests/handmade.py``
(three separate q/k/v Linears, products spelled as matmul, einsum or bmm), 16-32 px, embed 16-64, 1-4
blocks. Decisions: random masks on every width group (heads, value dims, MLP units, embedding channels;
a whole group may go where its branch can), random block or branch skips, a random exit, random token
keep ratios (one-shot attention scores or learned selectors), a random choice per convertible attention.

For every example: gates open == the original graph exactly; the gated ``eval`` graph == the
materialized compact graph; the compact graph's cost == the pricer's prediction == ``FlopCounterMode``
(math SDPA kernel). Refused combinations raise a ``SpecError`` that names why (see ``refusals``); the
main strategy builds only accepted ones. ONNX parity runs on one example only (export is slow).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import vitgraph as vg
from tests.checks import one_thread, value_dim_mask  # noqa: F401 - one_thread: an autouse fixture
from tests.handmade import HandmadeViT
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.errors import SpecError
from vitgraph.gated import instrument, materialize
from vitgraph.spec import Spec

# no shrink phase: a failing example prints as drawn (shrinking one takes minutes; drop ``phases`` to minimise)
SETTINGS = dict(deadline=None, derandomize=True, phases=[Phase.explicit, Phase.reuse, Phase.generate], suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])
COST_RTOL = 1e-6   # the gates are float32: the pricer's products round a little
TOL = 1e-5         # fp32, relative to the output's scale
LEFT_OVER = ("vg_gates", "vg_blocks", "vg_tokens", "vg_conv")  # (a chosen exit takes the head's names)
GRIDS = ((16, 4), (16, 8), (32, 8), (32, 4))                  # (image, patch): 16, 4, 16, 64 patches


@dataclass(frozen=True)
class Model:
    family: str           # timm | handmade
    image: int
    patch: int
    chans: int
    dim: int
    heads: int
    depth: int
    mlp_ratio: float
    class_token: bool = True
    reg_tokens: int = 0
    pool: str = "token"   # token | avg | map
    layer_scale: bool = False
    qk_norm: bool = False
    fused_attn: bool = True
    qkv_bias: bool = True
    style: str = "matmul"  # handmade: matmul | einsum | bmm

    def build(self) -> vg.VitGraph:
        torch.manual_seed(0)
        if self.family == "handmade":
            m = HandmadeViT(image=self.image, patch=self.patch, dim=self.dim, depth=self.depth, heads=self.heads,
                            hidden=int(self.dim * self.mlp_ratio), style=self.style)
        else:
            from timm.models.vision_transformer import VisionTransformer

            m = VisionTransformer(img_size=self.image, patch_size=self.patch, in_chans=self.chans, num_classes=10,
                                  global_pool=self.pool, embed_dim=self.dim, depth=self.depth, num_heads=self.heads,
                                  mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm,
                                  init_values=0.5 if self.layer_scale else None, class_token=self.class_token,
                                  reg_tokens=self.reg_tokens)
            for mod in m.modules():
                if hasattr(mod, "fused_attn"):
                    mod.fused_attn = self.fused_attn
        chans = 3 if self.family == "handmade" else self.chans
        return vg.trace(m.eval(), torch.randn(2, chans, self.image, self.image))


@st.composite
def models(draw, focus: str = "width") -> Model:
    """A small ViT on which the ``focus`` axis applies (exits and tokens: two blocks or more, no attention pool;
    conv: heads the analysis can see)."""
    staged = focus in ("exits", "tokens")
    image, patch = draw(st.sampled_from(GRIDS))
    heads = draw(st.sampled_from([1, 2, 4]))
    dim = draw(st.sampled_from([d for d in (16, 24, 32, 48, 64) if d % heads == 0 and d // heads >= 4]))
    common = dict(image=image, patch=patch, dim=dim, heads=heads, depth=draw(st.sampled_from([2, 3, 4] if staged else [2, 3, 4, 1])),
                  mlp_ratio=draw(st.sampled_from([1.0, 2.0, 4.0])))
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter of the examples: separate q/k/v
        styles = ["matmul", "einsum"] if focus in ("conv", "tokens") else ["matmul", "einsum", "bmm"]
        return Model("handmade", chans=3, style=draw(st.sampled_from(styles)), **common)
    class_token = draw(st.booleans())
    reg_tokens = draw(st.sampled_from([0, 0, 1, 2]))
    # (timm: a token pool needs a class token)
    pool = draw(st.sampled_from(["token", "avg"] if class_token else ["avg"]) if staged else
                st.sampled_from(["token", "avg", "map"] if class_token else ["avg", "map"]))
    return Model("timm", chans=draw(st.sampled_from([1, 3])), class_token=class_token, reg_tokens=reg_tokens,
                 pool=pool, layer_scale=draw(st.booleans()), qk_norm=draw(st.booleans()),
                 fused_attn=draw(st.booleans()), qkv_bias=draw(st.booleans()), **common)


@dataclass(frozen=True)
class Axes:
    heads: bool = False
    head_dim: bool = False
    mlp: bool = False
    embed: bool = False
    skip_blocks: bool = False
    per_branch: bool = False
    exits: tuple[int, ...] = ()
    stages: tuple[int, ...] = ()
    keep: tuple[float, ...] = ()
    token_method: str = "attention"
    conv: bool = False

    def spec(self) -> Spec:
        d: dict = {"budget": {"flops": 1.0},  # every decision is forced below; 1.0 leaves every budget check open
                   "width": {"method": "magnitude", "heads": self.heads, "head_dim": self.head_dim, "mlp": self.mlp,
                             "embed": self.embed, "align": 1},
                   "depth": {"skip_blocks": self.skip_blocks, "per_branch": self.per_branch,
                             "exits": list(self.exits)},
                   "attention": {"to_conv": self.conv},
                   # steps > 0: the learned axes wait for the decisions written below instead of freezing
                   "train": {"steps": 10}}
        if self.stages:
            d["tokens"] = {"method": self.token_method, "stages": list(self.stages), "keep": list(self.keep)}
        return Spec.from_dict(d)


def refusals(a: Axes, model: Model) -> list[str]:
    """The SpecErrors a combination gets by design, as patterns (empty: accepted); instrument raises the
    first one its axes meet. What vitgraph refuses, and why:
    - tokens.method spvit with depth.exits (an exit would pool the dead tokens the masked graph keeps flowing);
      (with depth.skip_blocks and width.embed it combines: tests/test_combine_spvit.py; not with width.embed
      and width.head_dim together: the scorers are packed after the widths, and the key masks still stand in
      for the attention core the value-dim cut rewrites);
    - attention.to_conv combines with heads, value dims, embedding channels and exits;
    - to_conv with tokens: only attentions before the first stage (attention scores: before the block
      that scores it) convert, so a first stage at block 0 (learned) or 1 (attention scores) leaves none;
    - one-shot attention scores cannot stage at block 0 (no attention before it to read);
    - width.heads or head_dim alone where no attention shows its heads (one head is not separable; the
      handmade ``bmm`` style folds the heads into the batch), with nothing else to gate; and to_conv and
      one-shot token scores there;
    - an attention-pool head (global_pool "map") is a block of its own, seeing its one latent query:
      depth.exits (no other block's output has its shape) and tokens.method spvit (its key masks need a
      self-attention) are refused; one-shot token scores drop tokens that reach the pool as fewer keys,
      but only where the pool's keys are the whole stream: timm's pool reads the patch tokens alone when
      there are prefix tokens, and that block is refused by name;
    - a spec that compresses nothing."""
    tokens = bool(a.stages)
    hidden = model.style == "bmm" and model.family == "handmade"
    gated = a.mlp or a.embed or (a.heads and model.heads > 1 and not hidden) or (a.head_dim and not hidden)
    rules = [
        (not (a.heads or a.head_dim or a.mlp or a.embed or a.skip_blocks or a.exits or tokens or a.conv),
         "compresses nothing"),
        ((a.heads or a.head_dim) and not gated and not (a.skip_blocks or a.exits), "no site of this model allows it"),
        (a.conv and hidden, "no attention .* can become a convolution .*could not map every head"),
        (a.conv and tokens and a.stages[0] <= (1 if a.token_method == "attention" else 0),
         "no attention .* can become a convolution .*first token stage"),
        (a.exits and model.pool == "map", "no exit after block .* differs from the last block's"),
        (tokens and a.exits and a.token_method == "spvit", "tokens.method spvit with depth.exits: the learned"),
        (tokens and a.token_method == "spvit" and a.embed and a.head_dim,
         "tokens.method spvit with width.embed and width.head_dim: the learned scorers"),
        (tokens and a.token_method == "attention" and a.stages[0] == 0, "before block 0 .*no block before it"),
        (tokens and _pool_skips_prefix(model), "takes .* tokens?, not the .* of the token stream"),
        (tokens and model.pool == "map" and a.token_method == "spvit", "attention is not a self-attention over"),
        (tokens and hidden and a.token_method == "attention", "probabilities are not a \\(batch, heads"),
    ]
    return [why for refused, why in rules if refused]


def _pool_skips_prefix(model: Model) -> bool:
    return model.pool == "map" and (model.class_token or model.reg_tokens > 0)


@st.composite
def axes_for(draw, model: Model, accepted: bool = True, focus: str = "width") -> Axes:
    """Axes on ``model``: only accepted combinations (``accepted``), the ``focus`` axis on; or any."""
    depth = model.depth
    tokens = depth >= 2 and (not _pool_skips_prefix(model) or not accepted) and draw(st.booleans())
    method = draw(st.sampled_from(["attention", "spvit"]))
    stages: tuple[int, ...] = ()
    keep: tuple[float, ...] = ()
    if tokens:  # (one-shot attention scores read the attention before the stage: none before block 0)
        lowest = 1 if accepted and method == "attention" else 0
        stages = tuple(sorted(draw(st.sets(st.integers(lowest, depth - 1), min_size=1, max_size=2))))
        keep = tuple(sorted(draw(st.lists(st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]), min_size=len(stages),
                                          max_size=len(stages))), reverse=True))
    conv = draw(st.booleans())
    exits = tuple(sorted(draw(st.sets(st.integers(1, depth - 1), max_size=2)))) if depth >= 2 and draw(
        st.booleans()) else ()
    a = Axes(heads=draw(st.booleans()), head_dim=draw(st.booleans()), mlp=draw(st.booleans()),
             embed=draw(st.booleans()), skip_blocks=draw(st.booleans()), per_branch=draw(st.booleans()),
             exits=exits, stages=stages, keep=keep, token_method=method, conv=conv)
    if not accepted:
        return a
    # one axis family is the example's focus: it stays on, and the refused pairs go against the others
    open_pool = model.pool != "map" and depth >= 2
    if focus == "exits" and open_pool:
        a = Axes(**{**a.__dict__, "exits": a.exits or (draw(st.integers(1, depth - 1)),), "stages": (), "keep": ()})
    elif focus == "tokens" and depth >= 2 and not _pool_skips_prefix(model):
        lowest = 1 if method == "attention" else 0
        if not a.stages:
            a = Axes(**{**a.__dict__, "stages": (draw(st.integers(lowest, depth - 1)),), "keep": (0.5,)})
        a = Axes(**{**a.__dict__, "conv": a.conv and a.stages[0] > lowest + 1, "exits": ()})
    elif focus == "conv" and not (model.style == "bmm" and model.family == "handmade"):
        a = Axes(**{**a.__dict__, "conv": True})
    elif focus == "depth":
        a = Axes(**{**a.__dict__, "skip_blocks": True})
    elif focus == "width":
        a = Axes(**{**a.__dict__, "mlp": a.mlp or not (a.heads or a.head_dim or a.embed)})
    # resolve every refused pair in favour of the coarser axis (see ``refusals``)
    if a.stages or model.pool == "map":
        a = Axes(**{**a.__dict__, "exits": ()})
    if model.style == "bmm" and model.family == "handmade":  # (no heads to read scores from or convert)
        a = Axes(**{**a.__dict__, "conv": False, "stages": (), "keep": ()})
    if a.conv:
        if a.stages and a.stages[0] <= (1 if a.token_method == "attention" else 0):
            a = Axes(**{**a.__dict__, "stages": (), "keep": ()})
    if a.stages and model.pool == "map":  # (the pool reads fewer keys; spvit's key masks need self-attention)
        a = Axes(**{**a.__dict__, "token_method": "attention"})
        if a.stages[0] < 1:
            a = Axes(**{**a.__dict__, "stages": (), "keep": ()})
    if a.conv and a.stages and a.stages[0] <= (1 if a.token_method == "attention" else 0):  # (after the map pool's
        a = Axes(**{**a.__dict__, "stages": (), "keep": ()})                                 # switch to attention)
    if a.stages and a.token_method == "spvit" and a.embed:  # (see ``refusals``)
        a = Axes(**{**a.__dict__, "head_dim": False})
    if a.stages and a.skip_blocks:  # (listed token ratios fix the tokens at instrument; depth alone must then
        a = Axes(**{**a.__dict__, "mlp": True})  # reach the budget in whole blocks, or instrument refuses it)
    if refusals(a, model):  # compresses nothing, or single heads alone
        a = Axes(**{**a.__dict__, "mlp": True})
    assert not refusals(a, model), (a, refusals(a, model))
    return a


FRACTIONS = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])


def decide(gated, draw) -> None:
    """Random decisions on every axis the model has, written where each axis keeps its frozen ones."""
    if "width" in gated.axes:
        method = gated.axes["width"].method
        # the heads of an attention a token stage reads its scores from keep one at least (as WidthAxis.freeze)
        needed = {b for a in gated.axes.values() for b in a.needed_blocks()}
        for i, site in enumerate(method.sites):
            gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
            if site.kind == "head_dim":  # the same count in every head, each head its own channels
                per = site.units // site.segments
                mask = value_dim_mask(site, draw(st.integers(1, per)), gen)
            else:
                least = 1 if site.kind == "heads" and gated.graph.structure.group(site.name).block in needed else 0
                k = max(site.min_units, least, round(draw(FRACTIONS) * site.units))
                mask = torch.zeros(site.units, dtype=torch.bool)
                mask[torch.randperm(site.units, generator=gen)[:k]] = True
            getattr(method, f"frozen_{i}").copy_(mask)
        method.is_frozen.fill_(True)
    if "depth" in gated.axes:
        depth = gated.axes["depth"]
        pinned = depth.pinned(list(gated.axes.values()))  # blocks a token stage reads its scores from
        keep = draw(st.lists(st.booleans(), min_size=len(depth.units), max_size=len(depth.units)))
        keep = [k or u.block in pinned for k, u in zip(keep, depth.units)]
        depth.frozen_keep.copy_(torch.tensor(keep))
        depth.is_frozen.fill_(True)
    if "exits" in gated.axes:
        exits = gated.axes["exits"]
        exits.exit_chosen.fill_(draw(st.sampled_from([0, *exits.exits])))
    if "conv" in gated.axes:
        conv = gated.axes["conv"]
        conv.choice.copy_(torch.tensor(draw(st.lists(st.integers(0, 3), min_size=len(conv.sites),
                                                     max_size=len(conv.sites)))))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
        with torch.no_grad():  # BatchNorm statistics and tap assignments away from their identity start
            for gate in conv.gates:
                for bn in (gate.bn1, gate.bn3):
                    bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
                    bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) * 1.5 + 0.5)
                    bn.weight.copy_(torch.randn(bn.weight.shape, generator=gen))
                    bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen))
                gate.tap_logits.copy_(torch.randn(gate.tap_logits.shape, generator=gen) * 0.02)
    gated.freeze()  # what is left: learned token selectors take their keep ratios
    gated.eval()
    gated.set_mode("eval")


def close(got: torch.Tensor, want: torch.Tensor) -> float:
    """The error relative to the output's scale (at least 1)."""
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


def compress(model: Model, axes: Axes, data) -> tuple[vg.VitGraph, object, torch.fx.GraphModule]:
    g = model.build()
    return (g, *compress_graph(g, instrument(g, axes.spec()), data))


def compress_graph(g: vg.VitGraph, gated, data) -> tuple[object, torch.fx.GraphModule]:
    """Gates open == ``g``; then random decisions (``decide``) and the compact graph."""
    x = g.example_inputs[0]
    with torch.no_grad():
        assert torch.equal(gated.set_mode("open")(x), g.gm(x)), "gates open must be exactly the original graph"
    decide(gated, data.draw)
    return gated, materialize(gated)


def assert_invariants(g: vg.VitGraph, gated, compact: torch.fx.GraphModule) -> None:
    """Gated ``eval`` == compact at two batch sizes; no gate left; priced == compact == FlopCounterMode."""
    x = g.example_inputs[0]
    with torch.no_grad():
        for inputs in (x, torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(1))):
            want = gated(inputs)
            err = close(compact(inputs), want)
            assert err <= TOL, f"compact graph differs from the gated eval graph by {err:.2e}"
    code = compact.code
    assert not [name for name in LEFT_OVER if name in code]
    cg = vg.trace(compact, g.example_inputs)
    priced = gated.cost()["flops"]
    assert cg.structure.flops == pytest.approx(priced, rel=COST_RTOL), "priced cost != compact graph's cost"
    assert flop_counter_flops(compact, g.example_inputs, 2) == pytest.approx(cg.structure.flops, rel=COST_RTOL)


def gated_axes(a: Axes) -> set[str]:
    """The axis families a spec turns on."""
    on = {"width": a.heads or a.head_dim or a.mlp or a.embed, "depth": a.skip_blocks, "exits": bool(a.exits),
          "tokens": bool(a.stages), "conv": a.conv}
    return {k for k, v in on.items() if v}


FOCI = ("width", "depth", "exits", "tokens", "conv")


@pytest.mark.parametrize("focus", FOCI)
@settings(max_examples=6, **SETTINGS)
@given(data=st.data())
def test_open_original_eval_compact_and_cost_agree(focus, data):
    model = data.draw(models(focus))
    axes = data.draw(axes_for(model, focus=focus))
    assert focus == "width" or focus in gated_axes(axes)
    g, gated, compact = compress(model, axes, data)
    for name in gated.axes:
        event(f"axis {name}")
    x = g.example_inputs[0]
    with torch.no_grad():
        event("the decisions changed the output" if close(gated(x), g.gm(x)) > 1e-3 else "nothing changed")
    assert_invariants(g, gated, compact)


@settings(max_examples=40, **SETTINGS)
@given(model=models(), data=st.data())
def test_refused_combinations_say_why(model, data):
    axes = data.draw(axes_for(model, accepted=False))
    reasons = refusals(axes, model)
    event(f"refused: {reasons[0]}" if reasons else "accepted")
    if not reasons:
        return  # accepted: the test above holds it to the invariants
    with pytest.raises(SpecError) as refused:
        instrument(model.build(), axes.spec())
    assert any(re.search(why, str(refused.value)) for why in reasons), (str(refused.value), reasons)


@settings(max_examples=1, **SETTINGS)
@given(model=models(), data=st.data())
def test_onnx_matches_the_compact_graph(model, data, tmp_path_factory):
    onnx_target = pytest.importorskip("vitgraph.targets.onnx")
    axes = data.draw(axes_for(model))
    g, gated, compact = compress(model, axes, data)
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    report = onnx_target.lower(compact, gated.example_inputs(), path, atol=1e-4)
    assert report.max_abs_err <= 1e-4, axes
