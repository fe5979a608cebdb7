"""The generic loop: learning, phases and groups, dual ascent, bit-exact resume, checkpoints, DDP."""
from __future__ import annotations

import contextlib
import json
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from vitgraph.train.data import load_data
from vitgraph.errors import SpecError, VitgraphError
from vitgraph.spec import Distill, Train
from vitgraph.train.loop import (Compressible, GroupConfig, Plan, _optimizer, evaluate, fit, lr_at, param_groups,
                            task_loss)


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_data("digits", (1, 16, 16), batch_size=32)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores)
    mask[torch.topk(scores.detach(), k, sorted=True).indices] = 1.0
    return mask


class FakeGated(nn.Module):
    """A compressible module: hidden units kept by topk of arch scores, a dual multiplier on a budget term."""

    def __init__(self, target: float = 0.3, keep: int = 16, arch_every: int = 2) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(256, 32), nn.Linear(32, 10), nn.Dropout(0.2)
        self.scores = nn.Parameter(torch.randn(32) * 0.1)
        self.lam = nn.Parameter(torch.zeros(()))
        self.register_buffer("mask", torch.ones(32))
        self.target, self.keep, self.arch_every = target, keep, arch_every
        self.frozen, self.forwards, self.freezes = False, 0, []
        self.history: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.forwards += 1
        h = self.drop(F.relu(self.fc1(x.flatten(1))))
        if self.frozen:
            mask = self.mask
        else:
            soft = torch.sigmoid(self.scores)
            mask = topk_mask(self.scores, self.keep) + soft - soft.detach()
            self._penalty = self.lam * (soft.mean() - self.target)
        return self.fc2(h * mask)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"weights": [*self.fc1.parameters(), *self.fc2.parameters()], "arch": [self.scores],
                "dual": [self.lam]}

    def optim_defaults(self) -> dict[str, dict[str, Any]]:
        return {"arch": {"lr": 0.05, "every": self.arch_every, "schedule": "cosine"},
                "dual": {"lr": 0.5, "optimizer": "sgd", "momentum": 0.0, "schedule": "constant"}}

    def penalties(self) -> dict[str, torch.Tensor]:
        return {} if self.frozen else {"budget": self._penalty}

    def after_step(self, step: int, lr: float) -> None:
        self.history.append((step, lr, self.scores.detach().clone(), self.lam.detach().clone()))

    def freeze(self) -> None:
        self.mask.copy_(topk_mask(self.scores, self.keep))
        self.frozen = True
        self.freezes.append(self.forwards)

    def status(self) -> dict[str, float]:
        return {"kept": float(self.mask.mean()) if self.frozen else self.keep / 32}


class NoisyDigits(Dataset):
    """Not a TensorDataset: random augmentation from the torch and python RNGs, per sample."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[i]
        return x + 0.1 * torch.randn_like(x) + random.random() * 0.01, int(y)


class Crash(Exception):
    pass


def _crash_after(model: nn.Module, n: int) -> None:
    calls = [0]

    def hook(module: nn.Module, args: Any) -> None:
        if module.training:
            calls[0] += 1
            if calls[0] > n:
                raise Crash

    model.register_forward_pre_hook(hook)


# -- learning -----------------------------------------------------------------------------------------------

def tiny_vit() -> nn.Module:
    import timm

    return timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=10,
                             embed_dim=32, depth=2, num_heads=2, global_pool="avg")


@pytest.mark.parametrize("build, lr, loss_ratio, top1", [(mlp, 3e-3, 0.5, 0.85), (tiny_vit, 5e-3, 0.9, 0.3)],
                         ids=["mlp", "tiny-vit"])
def test_learns_digits(digits: Any, tmp_path: Path, build: Any, lr: float, loss_ratio: float, top1: float) -> None:
    model = build()
    before = evaluate(model, digits.val, 256)
    cfg = Train(steps=60, batch_size=64, lr=lr, warmup_steps=5, log_every=10, weight_decay=0.01)
    result = fit(model, digits.train, cfg, val_data=digits.val, out_dir=tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 6 and losses[-1] < loss_ratio * losses[0]
    assert result.top1 is not None and result.top1 > top1 > before + 0.1
    assert result.steps == 60 and result.images_per_s > 0 and result.history == tmp_path / "metrics.jsonl"
    assert lines[-1] == {"step": 60, "phase": "end", "top1": result.top1}
    assert set(lines[0]) >= {"step", "phase", "loss", "terms", "lr", "status", "images_per_s"}
    assert lines[0]["phase"] == "train" and lines[0]["terms"].keys() == {"task"}
    assert lines[0]["lr"]["weights"] == pytest.approx(lr_at(9, lr, 1e-5, "cosine", 0, 60, 5))


def test_distillation_and_amp(digits: Any) -> None:
    torch.manual_seed(1)
    teacher = mlp()
    student = FakeGated()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = Train(steps=4, batch_size=16, lr=1e-3, amp=True, distill=Distill(alpha=0.5, tau=2.0), log_every=2)
    result = fit(student, digits.train, cfg, teacher=teacher, progress=False)
    assert result.loss is not None and result.loss == result.loss  # finite, not NaN
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher is frozen
    assert not teacher.training


def test_task_loss_formula() -> None:
    s, t, y = torch.randn(5, 7), torch.randn(5, 7), torch.randint(0, 7, (5,))
    loss, terms = task_loss(s, y)
    assert torch.equal(loss, F.cross_entropy(s, y)) and set(terms) == {"task"}
    loss, terms = task_loss(s, y, t, Distill(alpha=0.25, tau=2.0))
    p_t = F.softmax(t / 2, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert torch.allclose(terms["distill"], kl, atol=1e-6)
    assert torch.allclose(loss, 0.75 * F.cross_entropy(s, y) + 0.25 * kl, atol=1e-6)


# -- groups, phases, schedules ------------------------------------------------------------------------------

def test_schedules() -> None:
    assert [lr_at(i, 1.0, 0.0, "cosine", 0, 10, 2) for i in (0, 1)] == [0.5, 1.0]  # linear warm-up
    assert lr_at(2, 1.0, 0.1, "cosine", 0, 10, 2) == 1.0 and lr_at(9, 1.0, 0.1, "cosine", 0, 10, 2) == pytest.approx(0.1)
    assert lr_at(5, 1.0, 0.1, "constant", 0, 10) == 1.0
    plan = Plan.of(Train(steps=10, search=0.4, lr=1.0, min_lr=0.1, warmup_steps=2), has_arch=True)
    cfg = Train(steps=10, search=0.4, lr=1.0, min_lr=0.1, warmup_steps=2)
    weights = GroupConfig("weights", lr=1.0, schedule="constant")
    assert [plan.phase(s) for s in (0, 3, 4, 9)] == ["search", "search", "finetune", "finetune"]
    assert plan.lr(weights, 0, cfg) == 0.5 and plan.lr(weights, 3, cfg) == 1.0
    assert plan.lr(weights, 4, cfg) == 1.0 and plan.lr(weights, 9, cfg) == pytest.approx(0.1)  # cosine restarts
    assert Plan.of(cfg, has_arch=False).phase(7) == "train"


def test_weight_decay_skips_1d_params() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = _optimizer(GroupConfig("weights", lr=1e-3, weight_decay=0.05), list(model.parameters()))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}
    assert isinstance(opt, torch.optim.AdamW)


def test_groups_phases_every_and_freeze(digits: Any) -> None:
    model = FakeGated(arch_every=2)
    assert isinstance(model, Compressible) and not isinstance(mlp(), Compressible)
    cfg = Train(steps=8, batch_size=16, search=0.5, arch_lr=0.1, log_every=4)
    fit(model, digits.train, cfg, progress=False)
    assert model.freezes == [4] and model.frozen  # freeze() once, before the 5th step's forward
    assert not model.scores.requires_grad and not model.lam.requires_grad
    scores = [h[2] for h in model.history]
    changed = [not torch.equal(a, b) for a, b in zip(scores, scores[1:])]
    # arch steps every 2nd step (steps 1 and 3 of the search), never after the freeze
    assert changed == [True, False, True, False, False, False, False]
    weights_lr = [h[1] for h in model.history]
    assert weights_lr[3] == pytest.approx(cfg.min_lr) and weights_lr[4] == pytest.approx(cfg.lr)


@pytest.mark.parametrize("target, rises", [(-1.0, True), (2.0, False)])
def test_dual_ascent_and_clamp(digits: Any, target: float, rises: bool) -> None:
    model = FakeGated(target=target)
    fit(model, digits.train, Train(steps=6, batch_size=16, search=1.0), progress=False)
    lams = [float(h[3]) for h in model.history]
    assert all(v >= 0.0 for v in lams)
    if rises:  # d penalty / d lambda = mean(sigmoid) - target > 0: ascent pushes lambda up every step
        assert all(b > a for a, b in zip([0.0] + lams, lams))
    else:  # the gradient is negative: ascent would go below zero, the clamp holds it at 0
        assert lams == [0.0] * 6
    assert model.frozen  # a run that only searched still ends with fixed decisions


# -- checkpoints and resume -------------------------------------------------------------------------------------

def _model_kinds() -> list[Any]:
    return [pytest.param("mlp", "tensor", 0.5, id="mlp-dropout"),
            pytest.param("mlp", "noisy", 0.5, id="mlp-augmented-dataset"),
            pytest.param("gated", "tensor", 0.5, id="gated-frozen-before-resume"),
            pytest.param("gated", "tensor", 0.8, id="gated-freeze-after-resume")]


@pytest.mark.parametrize("kind, data_kind, search", _model_kinds())
def test_resume_is_bit_exact(digits: Any, tmp_path: Path, kind: str, data_kind: str, search: float) -> None:
    data = digits.train if data_kind == "tensor" else NoisyDigits(digits.train)
    cfg = Train(steps=10, batch_size=16, lr=3e-3, search=search, warmup_steps=2, checkpoint_every=3, log_every=2,
                distill=Distill(alpha=0.3, tau=2.0))
    teacher = None
    if kind == "gated":
        torch.manual_seed(7)
        teacher = mlp()

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return mlp() if kind == "mlp" else FakeGated(arch_every=4)  # accumulating across the checkpoint

    straight = build(0)
    workers = 0 if data_kind == "tensor" else 2  # augmentation in worker processes: seeded per sample
    fit(straight, data, cfg, teacher=teacher, out_dir=tmp_path / "a", progress=False, num_workers=workers)

    crashed = build(0)
    _crash_after(crashed, 6)
    with pytest.raises(Crash):
        fit(crashed, data, cfg, teacher=teacher, out_dir=tmp_path / "b", progress=False, num_workers=workers)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 6
    resumed = build(123)  # a fresh process: other weights, other RNG state until the checkpoint is read
    random.seed(5)
    fit(resumed, data, cfg, teacher=teacher, out_dir=tmp_path / "b", resume=True, progress=False, num_workers=workers)

    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    if kind == "gated":
        assert resumed.frozen and torch.equal(straight.mask, resumed.mask)
    lines = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in "ab"]
    assert [(r["step"], r.get("loss")) for r in lines[0]] == [(r["step"], r.get("loss")) for r in lines[1]]
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")]


def test_resume_errors(digits: Any, tmp_path: Path) -> None:
    cfg = Train(steps=2, batch_size=16)
    with pytest.raises(VitgraphError, match=f"{tmp_path / 'nothing' / 'checkpoint.pt'} does not exist"):
        fit(mlp(), digits.train, cfg, out_dir=tmp_path / "nothing", resume=True, progress=False)
    fit(mlp(), digits.train, cfg, out_dir=tmp_path, progress=False)
    other = nn.Sequential(nn.Flatten(), nn.Linear(256, 48), nn.ReLU(), nn.Dropout(0.3), nn.Linear(48, 10))
    with pytest.raises(VitgraphError, match="different model"):
        fit(other, digits.train, cfg, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(VitgraphError, match="different model"):
        fit(FakeGated(), digits.train, cfg, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(VitgraphError, match="train.batch_size"):
        fit(mlp(), digits.train, Train(steps=2, batch_size=8), out_dir=tmp_path, resume=True, progress=False)


def test_bad_input(digits: Any) -> None:
    with pytest.raises(SpecError, match=r"training needs data.*--data digits.*imagefolder:PATH"):
        fit(mlp(), None, Train(steps=5), progress=False)
    with pytest.raises(SpecError, match="fewer than one batch"):
        fit(mlp(), TensorDataset(torch.randn(3, 1, 16, 16), torch.zeros(3, dtype=torch.long)), Train(steps=1),
            progress=False)

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.net(x), self.net(x)

    with pytest.raises(VitgraphError, match="tensor of logits"):
        fit(Pair(), digits.train, Train(steps=1, batch_size=8), progress=False)

    class Shared(FakeGated):
        def param_groups(self) -> dict[str, list[nn.Parameter]]:
            return {"weights": [self.scores], "arch": [self.scores]}

    with pytest.raises(VitgraphError, match="both 'weights' and 'arch'"):
        param_groups(Shared())
    result = fit(mlp(), None, Train(steps=0), progress=False)  # one-shot: nothing to train, no data needed
    assert result.steps == 0 and result.loss is None and result.top1 is None


def test_evaluate_counts_exactly() -> None:
    x = torch.eye(4).repeat(2, 1)                  # 8 samples, one-hot of class i % 4
    y = torch.tensor([0, 1, 2, 3, 0, 1, 3, 0])     # the last two labels disagree with the one-hot
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(4))
    model.train()
    assert evaluate(model, TensorDataset(x, y), batch_size=3) == 0.75
    assert model.training  # mode restored


# -- DDP ----------------------------------------------------------------------------------------------------

def ddp_join(rank: int, world: int, port: int) -> None:
    """Join a gloo process group of ``world`` processes on 127.0.0.1:``port`` (one thread each)."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


@contextlib.contextmanager
def ddp_rank(rank: int, world: int, port: int) -> Iterator[Any]:
    """One rank of a ``world``-process gloo group: yields digits at 16 px with this rank's own seed set after
    (other weights on every rank: DDP must start them all from rank 0's); leaves the group on the way out."""
    ddp_join(rank, world, port)
    try:
        data = load_data("digits", (1, 16, 16), batch_size=16)
        torch.manual_seed(100 + rank)
        yield data
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    with ddp_rank(rank, world, port) as digits:
        model = FakeGated(arch_every=1)
        cfg = Train(steps=8, batch_size=16, search=0.5, log_every=2, checkpoint_every=4)
        result = fit(model, digits.train, cfg, val_data=digits.val, out_dir=out, progress=False)
        torch.save({"state": model.state_dict(), "frozen": model.frozen, "top1": result.top1},
                   Path(out) / f"rank{rank}.pt")


def test_ddp_two_processes_agree(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["frozen"] and r1["frozen"] and r0["top1"] == r1["top1"]
    assert r0["state"].keys() == r1["state"].keys()
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert int(r0["state"]["mask"].sum()) == 16  # the decisions: a topk of the arch scores, the same on both
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [2, 4, 6, 8]  # rank 0 alone writes
    assert lines[-2]["images_per_s"] > 0 and lines[0]["status"] == {"kept": 0.5}
    assert lines[-1] == {"step": 8, "phase": "end", "top1": r0["top1"]}
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["data"]["world_size"] == 2
