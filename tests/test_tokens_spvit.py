"""Token axis, learned (SPViT) selectors: open == original; with the same (top-K) decisions the masked
``eval`` graph == the gathered compact graph; the scorer and package recomputed independently from the
selector's weights; dead keys get no attention; the gradient reaches the selectors through the key masks;
a short training run learns toward its keep targets and still materializes exactly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitgraph as vg
from tests.test_tokens import FAMILIES, _model
from vitgraph.gated import instrument, materialize
from vitgraph.spec import Spec
from vitgraph.gates.tokens import KeyMask, LearnedTokenSelector


def _spec(**tokens) -> Spec:
    return Spec.from_dict({"budget": {"flops": 0.6}, "width": {"heads": False, "mlp": False},
                           "tokens": {"method": "spvit", "stages": [1, 2], "keep": [0.5, 0.25], **tokens}})


@pytest.mark.parametrize("key", [*FAMILIES, "hugging_face", "handmade"])
def test_masked_eval_equals_the_gathered_graph(key):
    g = _model(key)
    x = g.example_inputs[0]
    gated = instrument(g, _spec())
    with torch.no_grad():
        assert torch.equal(gated.set_mode("open")(x), g.gm(x))
    gated.freeze()
    assert list(gated.axes["tokens"].decisions().values()) == [32, 16]
    gated.set_mode("eval")
    dense = g.gm(x)
    with torch.no_grad():
        masked = gated(x)
    assert (masked - dense).abs().max() > 1e-3 * dense.abs().max()  # the masks changed the output
    compact = materialize(gated)
    code = compact.code
    assert "vg_tokens" not in code and "topk" in code and "token_scores" in code
    with torch.no_grad():
        for inputs in (x, torch.randn(3, *x.shape[1:])):
            want = gated(inputs)
            assert (compact(inputs) - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    cg = vg.trace(compact, g.example_inputs)
    assert cg.structure.flops == pytest.approx(gated.cost()["flops"], rel=1e-9)
    assert cg.structure.tokens.tokens == g.structure.tokens.tokens  # the input side is untouched


def _scorer(sel: LearnedTokenSelector, content: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """pi_keep recomputed from the selector's weights, head by head, written out (methods.md §3.2)."""
    b, n, c = content.shape
    heads = sel.heads
    d = c // heads
    lin = [m for m in sel.head_net if isinstance(m, torch.nn.Linear)]
    means = content.reshape(b, n, heads, d).mean(-1)
    w = torch.sigmoid(F.linear(F.gelu(F.linear(means, lin[0].weight, lin[0].bias)), lin[1].weight, lin[1].bias))
    norm, e1 = sel.embed[0], sel.embed[1]
    d1, d2, d3 = (m for m in sel.decide if isinstance(m, torch.nn.Linear))
    pis = []
    for h in range(heads):
        part = content[..., h * d:(h + 1) * d]
        e = F.gelu(F.linear(F.layer_norm(part, (d,), norm.weight, norm.bias, norm.eps), e1.weight, e1.bias))
        half = d // 2
        glob = (e[..., half:] * alive[..., None]).sum(1, keepdim=True) / alive.sum(1)[:, None, None]
        z = torch.cat([e[..., :half], glob.expand(-1, n, -1)], -1)
        a = F.linear(F.gelu(F.linear(F.gelu(F.linear(z, d1.weight, d1.bias)), d2.weight, d2.bias)), d3.weight, d3.bias)
        pis.append(a.softmax(-1)[..., 0])
    return (torch.stack(pis, -1) * w).sum(-1) / w.sum(-1)


def test_package_and_scores_recomputed_independently():
    g = _model("deit")
    x = g.example_inputs[0]
    gated = instrument(g, _spec())
    gated.freeze()
    gated.eval()
    seen = {}
    sel = gated.gm.get_submodule("vg_tokens.blocks_2")
    sel.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        gated(x)
    stream, alive = seen["args"]
    out, flags = seen["out"]
    p, s = sel.prefix, sel.patches
    pi = _scorer(sel, stream[:, p:], alive[:, p:])
    cand = alive[:, p:p + s]
    score = torch.where(cand > 0, pi[:, :s], torch.full_like(pi[:, :s], -1.0))
    keep = torch.zeros_like(cand)
    for i in range(x.shape[0]):
        keep[i, torch.argsort(score[i], descending=True)[:16]] = 1
    assert torch.equal(flags[:, p:p + s], keep)
    dropped = (cand - keep) * pi[:, :s]
    package = (dropped[..., None] * stream[:, p:p + s]).sum(1)
    assert torch.allclose(out[:, -1], package, atol=1e-5)
    assert torch.equal(out[:, :-1], stream)  # masked: every token keeps flowing


def test_dead_keys_get_no_attention_and_a_query_keeps_its_own_key():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    alive = torch.tensor([[1.0, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
    out = KeyMask("sdpa")(q, k, v, alive)
    probs = KeyMask("probs")(torch.softmax(q @ k.transpose(-2, -1) / 2, -1), alive)
    for i, row in enumerate(alive):
        for t in range(5):
            keys = [j for j in range(5) if row[j] > 0 or j == t]
            want = F.scaled_dot_product_attention(q[i:i + 1, :, t:t + 1], k[i:i + 1, :, keys], v[i:i + 1, :, keys])
            assert torch.allclose(out[i:i + 1, :, t:t + 1], want, atol=1e-6)
            dead = [j for j in range(5) if j not in keys]
            assert not dead or probs[i, :, t, dead].abs().max() == 0
            assert torch.allclose(probs[i, :, t].sum(-1), torch.ones(3))
    assert torch.equal(KeyMask("sdpa")(q, k, v, None), F.scaled_dot_product_attention(q, k, v))


def test_training_reaches_the_selectors_through_the_masks_and_materializes(tmp_path):
    import json

    from torch.utils.data import TensorDataset

    from vitgraph.train.loop import fit

    g = _model("deit")
    spec = Spec.from_dict({"budget": {"flops": 0.6}, "tokens": {"stages": [1, 2]},
                           "train": {"steps": 12, "batch_size": 8, "lr": 1e-3, "search": 0.75, "log_every": 1}})
    gated = instrument(g, spec)
    rho = gated.axes["tokens"].targets
    assert rho is not None and rho[0] > rho[1]  # derived from the budget
    gated.train()
    x = g.example_inputs[0]
    gated(x)[:, 0].sum().backward()  # the task output alone: the gradient comes through masks and packages
    grads = [p.grad for p in gated.gm.get_submodule("vg_tokens.blocks_1").parameters()]
    assert all(gr is not None for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)
    gated.zero_grad()
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, *x.shape[1:], generator=gen), torch.randint(0, 10, (64,), generator=gen))
    fit(gated, data, spec.train, teacher=g.gm, progress=False, out_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*(r.get("terms", {}) for r in rows))
    assert {"tokens.ratio", "tokens.distill"} <= logged, logged
    assert gated.frozen
    assert list(gated.axes["tokens"].decisions().values()) == gated.axes["tokens"].counts(rho)
    compact = materialize(gated)
    gated.eval()
    with torch.no_grad():
        assert (compact(x) - gated(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("key", ["deit", "mean_pool", "handmade"])
def test_dynamic_mode_gathers_each_images_tokens(key, tmp_path):
    from vitgraph import targets

    g = _model(key)
    gated = instrument(g, _spec(mode="dynamic"))
    with torch.no_grad():  # untrained scorers drop (almost) everything; spread their keep/drop logits
        for sel in gated.axes["tokens"].selectors:
            sel.decide[-1].weight.mul_(50.0)
            sel.decide[-1].bias.zero_()
    gated.freeze()
    gated.set_mode("eval")
    compact = materialize(gated)
    assert compact.serving_batch == 1 and "nonzero" in compact.code
    last = g.structure.blocks[-1].output  # the stream after the last block: its token count varies per image
    counts = set()
    with torch.no_grad():
        for x in torch.randn(6, 1, *g.example_inputs[0].shape[1:]):
            want = gated(x)
            assert (compact(x) - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
            env = {}
            interp = torch.fx.Interpreter(compact)
            interp.run_node = lambda n, run=interp.run_node: env.setdefault(n.name, run(n))
            interp.run(x)
            counts.add(env[last].shape[1] if last in env else None)
    assert key != "deit" or (len(counts) > 1 and None not in counts), counts
    with pytest.raises(AssertionError, match="batch 1"):
        compact(torch.randn(2, *g.example_inputs[0].shape[1:]))
    if key == "deit":
        rep = targets.onnx.lower(compact, tuple(x[:1] for x in g.example_inputs), tmp_path / "m.onnx")
        assert set(rep.per_batch) == {1} and rep.max_abs_err <= 1e-4
