"""Token axis (one-shot attention scores, static packaging): selectors open == original; gated ``eval`` ==
the compact graph with its packaging nodes; the scores and the package recomputed independently; priced cost
== compact cost == FlopCounterMode; refusals name the block and the reason.
"""
from __future__ import annotations

import pytest
import timm
import torch

import vitgraph as vg
from tests.handmade import handmade_vit
from tests.test_groups import _graph
from vitgraph.analysis.cost import flop_counter_flops
from vitgraph.errors import SpecError
from vitgraph.gated import instrument, materialize
from vitgraph.spec import Spec

SMALL = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=4, num_heads=2)
FAMILIES = {  # 64 patches each (embed 48: no reshape confuses channels with the 64 tokens)
    "deit": ("deit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),          # 2 prefix tokens
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", {"reg_tokens": 4}),  # 5 prefix tokens
    "mean_pool": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),  # no prefix at all
}


def _model(key: str) -> vg.VitGraph:
    torch.manual_seed(0)
    if key == "handmade":  # explicit softmax: the selector reads the probabilities
        return vg.trace(handmade_vit(image=32, patch=4, dim=48, depth=4, heads=2), torch.randn(2, 3, 32, 32))
    if key == "hugging_face":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96,
                                     image_size=32, patch_size=4, num_channels=1, num_labels=10)
        return vg.trace(transformers.ViTForImageClassification(cfg).eval(), torch.randn(2, 1, 32, 32))
    name, kw = FAMILIES[key]
    m = timm.create_model(name, **{**SMALL, **kw}).eval()
    with torch.no_grad():  # open the layer scales (1e-5) so that every token shows in the output
        for pname, p in m.named_parameters():
            if "gamma" in pname:
                p.fill_(1.0)
    return vg.trace(m, torch.randn(2, 1, 32, 32))


def _spec(**tokens) -> Spec:
    return Spec.from_dict({"budget": {"flops": 0.6}, "width": {"heads": False, "mlp": False},
                           "tokens": {"method": "attention", "stages": [1, 2], **tokens}})


@pytest.mark.parametrize("key", [*FAMILIES, "hugging_face", "handmade"])
def test_open_equals_original_and_eval_equals_the_packed_graph(key):
    g = _model(key)
    x = g.example_inputs[0]
    gated = instrument(g, _spec())
    with torch.no_grad():
        assert torch.equal(gated.set_mode("open")(x), g.gm(x))
        expected = gated.set_mode("eval")(x)
    dense = g.gm(x)
    assert (expected - dense).abs().max() > 1e-3 * dense.abs().max()  # dropping tokens changed the output
    compact = materialize(gated)
    with torch.no_grad():
        fresh = torch.randn(3, *x.shape[1:])
        for inputs in (x, fresh):
            want = gated(inputs)
            assert (compact(inputs) - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    assert "vg_tokens" not in compact.code and "topk" in compact.code
    cg = vg.trace(compact, g.example_inputs)
    assert cg.structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-9)
    assert cg.structure.flops == flop_counter_flops(compact, g.example_inputs, 2)
    tokens = [b.tokens_in for b in cg.structure.blocks]
    prefix = g.structure.tokens.prefix_tokens
    kept = gated.axes["tokens"].decisions()
    assert tokens[0] == g.structure.tokens.tokens and tokens[1] == prefix + list(kept.values())[0] + 1
    assert tokens[3] == prefix + list(kept.values())[1] + 2  # earlier packages stay, at the end


def test_scores_and_package_recomputed_from_the_dense_model():
    g = _model("deit")
    model = g.gm
    x = g.example_inputs[0]
    spec = Spec.from_dict({"budget": {"flops": 0.62}, "width": {"heads": False, "mlp": False},
                           "tokens": {"method": "attention", "stages": [2], "keep": [0.25]}})
    gated = instrument(g, spec)
    seen = {}
    gated.gm.get_submodule("vg_tokens.blocks_2").register_forward_hook(lambda m, args, out: seen.update(out=out))
    with torch.no_grad():
        gated.set_mode("eval")(x)
    # independently: the stream entering blocks 1 and 2 of the timm model, and block 1's attention
    timm_model = timm.create_model("deit_tiny_patch16_224", **SMALL).eval()
    timm_model.load_state_dict({k: v for k, v in model.state_dict().items()})
    with torch.no_grad():
        h = timm_model._pos_embed(timm_model.patch_embed(x))
        h = timm_model.blocks[0](h)
        blk = timm_model.blocks[1]
        b, n, c = h.shape
        qkv = blk.attn.qkv(blk.norm1(h)).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        probs = torch.softmax(q @ k.transpose(-2, -1) / (c // 2) ** 0.5, dim=-1)
        stream = blk(h)
    score = probs[:, :, 0].mean(1)[:, 1:]  # attention each patch receives from the class token
    out = seen["out"]
    assert out.shape == (2, 1 + 16 + 1, c)
    for i in range(2):
        top = torch.argsort(score[i], descending=True)[:16]
        assert torch.allclose(out[i, 1:17], stream[i, 1:][top], atol=1e-6)
        drop = torch.ones(64, dtype=torch.bool)
        drop[top] = False
        w = score[i][drop]
        package = (w[:, None] * stream[i, 1:][drop]).sum(0) / w.sum()
        assert torch.allclose(out[i, -1], package, atol=1e-5)


def test_token_only_spec_lands_on_the_budget_and_exports_with_a_dynamic_batch(tmp_path):
    from vitgraph.targets import onnx as onnx_target

    g = _model("deit")
    spec = Spec.from_dict({"budget": {"flops": 0.5}, "tokens": {"method": "attention", "stages": [1, 2]},
                           "width": {"heads": False, "mlp": False}})
    result = vg.compress(g, spec, data="none", progress=False, latency_targets=())
    assert abs(result.report["budget"]["achieved"] - 0.5) <= 0.03
    assert result.report["parity"]["max_abs_err"] <= 1e-4
    assert result.report["tokens"]["kept_tokens"] and result.report["blocks"][3]["tokens_in"] < 65
    lowering = onnx_target.lower(result.compact, g.example_inputs, tmp_path / "tokens.onnx", check_batches=(1, 3))
    assert lowering.max_abs_err <= 1e-4


def test_explicit_keep_ratios():
    gated = instrument(_model("deit"), _spec(keep=[0.5, 0.25]))
    assert gated.axes["tokens"].decisions() == {"blocks.1": 32, "blocks.2": 16}


def test_refusals_name_the_block_and_the_reason():
    with pytest.raises(SpecError, match="cannot drop tokens before block 1 .*"):
        instrument(_graph("swin"), _spec(stages=[1]))
    with pytest.raises(SpecError, match="cannot drop tokens before block 1 .*"):
        instrument(_graph("beit"), _spec(stages=[1]))
    g = _model("deit")
    with pytest.raises(SpecError, match="before block 0 .*no block before it"):
        instrument(g, _spec(stages=[0]))
    with pytest.raises(SpecError, match="blocks 0..3, so no block 7"):
        instrument(g, _spec(stages=[7]))
    with pytest.raises(SpecError, match="dynamic with tokens.method attention"):
        instrument(g, _spec(mode="dynamic"))
    with pytest.raises(SpecError, match="width learns after the token ratios are fixed.*list tokens.keep"):
        instrument(g, Spec.from_dict({"budget": {"flops": 0.5}, "width": {"method": "wdpruning", "heads": False},
                                      "tokens": {"method": "attention", "stages": [1]}, "train": {"steps": 2}}))
    with pytest.raises(SpecError, match="one per stage"):
        Spec.from_dict({"tokens": {"stages": [1, 2], "keep": [0.5]}})
    with pytest.raises(SpecError, match="tokens.method spvit with depth.exits: the learned selectors"):
        instrument(g, Spec.from_dict({"width": {"heads": False}, "depth": {"exits": [2]},
                                      "tokens": {"method": "spvit", "stages": [1]}}))


def test_tokens_with_depth_keep_the_score_sources_and_remove_stage_blocks():
    """Depth skips blocks around the selectors: a skipped stage block leaves its selector in front of the next
    block; the blocks whose attention scores a stage stay. eval == compact, priced == compact FLOPs."""
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", **{**SMALL, "depth": 8}).eval()
    spec = Spec.from_dict({"budget": {"flops": 0.3}, "depth": {"skip_blocks": True},
                           "width": {"method": "magnitude", "heads": False, "mlp": True, "embed": True, "align": 4},
                           "tokens": {"method": "attention", "keep": [0.8, 0.6, 0.4]}})
    result = vg.compress(vg.trace(m, torch.randn(2, 1, 32, 32)), spec, data="none", progress=False,
                         latency_targets=())
    report = result.report
    removed = {int(b.split(".")[-1]) for b in report["depth"]["removed_blocks"]}
    stages = set(report["tokens"]["stages"])
    assert removed & stages, "the test needs a removed stage block"
    assert not removed & {s - 1 for s in stages}, "a score source was removed"
    assert set(report["depth"]["projection"]["kept_for_other_axes"]) == {f"blocks.{s - 1}" for s in stages}
    assert abs(report["budget"]["achieved"] - 0.3) <= 0.03 and report["parity"]["max_abs_err"] <= 1e-4
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(result.gated(x), result.compact(x), atol=1e-4)
    assert report["compressed"]["flops"] == pytest.approx(result.gated.cost()["flops"], rel=1e-6)  # float32 gates
    assert flop_counter_flops(result.compact, (x,), 3) == report["compressed"]["flops"]


def test_tokens_and_widths_share_one_budget():
    g = _model("deit")
    spec = Spec.from_dict({"budget": {"flops": 0.45}, "width": {"method": "magnitude", "heads": False, "align": 4},
                           "tokens": {"method": "attention", "stages": [1, 2], "keep": [0.7, 0.5]}})
    result = vg.compress(g, spec, data="none", progress=False, latency_targets=())
    report = result.report
    assert abs(report["budget"]["achieved"] - 0.45) <= 0.03 and report["parity"]["max_abs_err"] <= 1e-4
    assert report["tokens"]["kept_tokens"] == {"blocks.1": 45, "blocks.2": 32}
    assert sum(report["kept"].values()) < sum(report["units"].values())  # the widths closed the rest
    priced = result.gated.cost()["flops"]
    assert report["compressed"]["flops"] == pytest.approx(priced, rel=1e-9)


def run_tiny_deit(spec: dict, data, out, crash_at: int | None = None, resume: bool = False, seed: int = 0):
    """A tiny deit (16 px, 64 patches) instrumented with ``spec`` and trained (a checkpoint every step); with
    ``crash_at``, a Crash after that many steps (returns None). Shared by the resume tests of the axes."""
    from tests.test_train import Crash, _crash_after
    from vitgraph.train.loop import fit

    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=2, in_chans=1, num_classes=10,
                          embed_dim=24, depth=3, num_heads=2).eval()
    spec = Spec.from_dict(spec)
    gated = instrument(vg.trace(m, torch.randn(2, 1, 16, 16)), spec)
    torch.manual_seed(seed)
    if crash_at is not None:
        _crash_after(gated, crash_at)
        with pytest.raises(Crash):
            fit(gated, data.train, spec.train, teacher=m, out_dir=out, progress=False)
        return None
    fit(gated, data.train, spec.train, teacher=m, out_dir=out, resume=resume, progress=False)
    return gated


def _tokens_run(seed: int, data, out, crash_at: int | None = None, resume: bool = False, method: str = "attention"):
    spec = {"budget": {"flops": 0.7}, "tokens": {"method": method, "stages": [1]},
            "train": {"steps": 8, "batch_size": 16, "checkpoint_every": 1}}
    return run_tiny_deit(spec, data, out, crash_at, resume, seed)


@pytest.mark.parametrize("method,crash_at", [("attention", 5), ("spvit", 2), ("spvit", 6)])
def test_resume_with_selectors_is_bit_exact(tmp_path, method, crash_at):
    """spvit: a crash in the search (Gumbel samples, arch optimizer) and one after the freeze."""
    from vitgraph.train.data import load_data

    data = load_data("digits", (1, 16, 16), batch_size=16)
    straight = _tokens_run(0, data, tmp_path / "a", method=method)
    _tokens_run(0, data, tmp_path / "b", crash_at=crash_at, method=method)
    resumed = _tokens_run(99, data, tmp_path / "b", resume=True, method=method)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and "axes.tokens.kept" in a and int(a["axes.tokens.kept"][0]) > 0
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def _ddp_tokens_worker(rank: int, world: int, port: int, out: str, method: str) -> None:
    import os

    from tests.test_train import ddp_rank
    from vitgraph.train.loop import fit

    with ddp_rank(rank, world, port) as data:
        m = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=2, in_chans=1, num_classes=10,
                              embed_dim=24, depth=3, num_heads=2).eval()
        spec = Spec.from_dict({"budget": {"flops": 0.7}, "tokens": {"method": method, "stages": [1]},
                               "train": {"steps": 4, "batch_size": 16}})
        gated = instrument(vg.trace(m, torch.randn(2, 1, 16, 16)), spec)
        fit(gated, data.train, spec.train, progress=False)
        picked = {}
        selector = gated.gm.get_submodule("vg_tokens.blocks_1")
        # gathered tokens (attention), or the keep flags over every token (spvit: masked)
        selector.register_forward_hook(lambda mod, args, y: picked.update(tokens=y[1] if isinstance(y, tuple) else y))
        with torch.no_grad():
            gated.set_mode("eval")(data.val.tensors[0][:8])
        torch.save({"state": gated.state_dict(), "tokens": picked["tokens"]}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("method", ["attention", "spvit"])
def test_ddp_ranks_take_identical_token_decisions(tmp_path, method):
    import torch.multiprocessing as mp

    from tests.test_train import free_port

    mp.spawn(_ddp_tokens_worker, args=(2, free_port(), str(tmp_path), method), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert torch.equal(r0["tokens"], r1["tokens"])  # the same kept tokens
    if method == "attention":
        assert r0["tokens"].shape[1] < 65
    else:
        assert 0 < int(r0["tokens"][:, 1:65].sum(1).max()) < 64


def test_torch_compile_does_not_recompile_for_new_batch_sizes():
    """Static token counts: after the first dynamic-batch recompile, new batch sizes reuse the graph."""
    from torch._dynamo.testing import CompileCounter

    g = _model("deit")
    gated = instrument(g, _spec())
    compact = materialize(gated)
    counter = CompileCounter()
    torch._dynamo.reset()
    fn = torch.compile(compact, backend=counter)
    with torch.no_grad():
        for b in (2, 3, 5, 7, 16):  # (batch 1 is specialised by dynamo for every model, dense ones too)
            x = torch.randn(b, *g.example_inputs[0].shape[1:])
            assert (fn(x) - compact(x)).abs().max() <= 1e-5
    assert counter.frame_count <= 2, counter.frame_count  # batch 2 static, batch 3 dynamic, then no more
    torch._dynamo.reset()
