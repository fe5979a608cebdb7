"""The generic training loop: task loss + distillation + the model's own penalties, one optimizer per group.

Invariant: a run is a function of (model, data, spec.train, world size) alone. Batches are a seeded
permutation per epoch indexed by the step, learning rates are functions of the step, and a checkpoint
holds every other piece of state (optimizers, half-accumulated gradients, every rank's RNGs), so
``fit(..., resume=True)`` ends with parameters bit-for-bit equal to those of an uninterrupted run::

    result = fit(gated, data.train, spec.train, teacher=dense, val_data=data.val, out_dir="run")
    result.top1, result.history          # 0.93, run/metrics.jsonl

Steps ``[0, search_steps)`` train every group (``weights``, ``arch``, ``dual``); at ``search_steps`` the
model's ``freeze()`` fixes its decisions and only ``weights`` train on. Under ``torchrun`` (or an
initialised process group) the model runs in DistributedDataParallel; ``train.batch_size`` is per
process (as in timm), and each rank takes its slice of the same permutation.
"""
from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from vitgraph.errors import SpecError, VitgraphError
from vitgraph.spec import Distill, Train
from vitgraph.train.groups import (GROUPS, GroupConfig, Plan, _optimizer, group_configs, kind,  # noqa: F401 - API
                                   lr_at, param_groups)
from vitgraph.train.state import (FORMAT, _batches, _Batches, _changed_settings, _load, _Metrics, _restore_model,
                                  _rng_state, _save, _set_rng_state, _Window, _World)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@runtime_checkable
class Compressible(Protocol):
    """What :func:`fit` asks of a gated model besides being an ``nn.Module`` (duck-typed).

    - ``param_groups()``: ``{"weights" | "arch" | "dual": [parameters]}``; a parameter in one group only.
      ``"arch:NAME"`` / ``"dual:NAME"`` are further groups of that kind with settings of their own.
    - ``optim_defaults()``: per group ``{"lr", "weight_decay", "every", "schedule": "cosine" | "constant",
      "optimizer": "adamw" | "sgd", "momentum"}``; see :class:`GroupConfig`. ``train.lr`` (and
      ``train.weight_decay``) override the ``weights`` entry, ``train.arch_lr`` / ``train.dual_lr`` the others.
    - ``penalties()``: loss terms computed by the last forward, still in the autograd graph; ``fit`` adds them.

    Optional, called when present:

    - ``after_step(step, lr)``: after the optimizers stepped (proximal updates, re-applied masks);
      ``lr`` is the ``weights`` learning rate of that step.
    - ``freeze()``: once, when the search ends: decisions become fixed. ``fit`` then stops training
      ``arch`` and ``dual``. On resume it is called again *after* the arch parameters are restored, so it
      must be a function of the module's state.
    - ``status()``: ``{"flops": 0.53, ...}`` shown in the progress bar and logged.
    - ``aux_logits()``: ``{name: logits}`` of the last forward (exit classifiers); each gets the task loss.
    - ``searches``: True when the model must search and ``freeze`` even without ``arch`` parameters.

    ``dual`` parameters take gradient *ascent* steps and are clamped at >= 0 after each step.
    """

    def param_groups(self) -> dict[str, list[nn.Parameter]]: ...

    def optim_defaults(self) -> dict[str, dict[str, Any]]: ...

    def penalties(self) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class FitResult:
    steps: int                  # optimizer steps done in total (including those before a resume)
    loss: float | None          # mean loss over the last logging window (None when no step ran)
    top1: float | None          # validation top-1 accuracy at the end (None without val_data)
    seconds: float              # wall time of this call
    images_per_s: float         # training throughput of this call, all processes together
    history: Path | None        # metrics.jsonl (None without out_dir)


# -- losses and evaluation ---------------------------------------------------------------------------------

def task_loss(student: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor | None = None,
              distill: Distill = Distill()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, terms)``: CE, or ``(1 - alpha) CE + alpha tau^2 KL(student/tau || teacher/tau)`` with a teacher."""
    ce = F.cross_entropy(student, target)
    if teacher is None:
        return ce, {"task": ce}
    tau = distill.tau
    kl = F.kl_div(F.log_softmax(student / tau, -1), F.log_softmax(teacher / tau, -1), reduction="batchmean",
                  log_target=True) * tau * tau
    return (1.0 - distill.alpha) * ce + distill.alpha * kl, {"task": ce, "distill": kl}


def _logits(out: Any, who: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise VitgraphError(f"{who} returned {type(out).__name__}; fit and evaluate need a tensor of logits "
                            f"(wrap the model so that forward returns them)")
    return out.float()


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset | DataLoader, batch_size: int = 256, *, num_workers: int = 0) -> float:
    """Top-1 accuracy of ``model`` on ``data``; under torch.distributed every rank scores a shard (collective)."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if len(dataset) == 0:
        raise VitgraphError("evaluate: the validation set is empty; pass val_data with at least one image")
    world = _World.current()
    device = next(iter(model.parameters()), torch.empty(0)).device
    shard = list(range(world.rank, len(dataset), world.size))
    if isinstance(dataset, TensorDataset):
        index = torch.tensor(shard, dtype=torch.long)
        batches: Any = ((dataset.tensors[0][i], dataset.tensors[1][i]) for i in index.split(batch_size))
    else:
        batches = DataLoader(Subset(dataset, shard), batch_size=batch_size, num_workers=num_workers)
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for x, y in batches:
            y = torch.as_tensor(y).to(device)
            pred = _logits(model(x.to(device)), type(model).__name__).argmax(-1)
            counts += torch.stack([(pred == y).sum().double(), torch.tensor(float(y.numel()), device=device)])
    finally:
        model.train(was_training)
    if world.distributed:
        torch.distributed.all_reduce(counts)
    return float(counts[0] / counts[1])


# -- processes ---------------------------------------------------------------------------------------------

class _WithPenalties(nn.Module):
    """Returns the penalties next to the logits so DDP sees every parameter they reach."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        out = self.model(x)
        penalties = self.model.penalties() if isinstance(self.model, Compressible) else {}
        aux = self.model.aux_logits() if hasattr(self.model, "aux_logits") else {}
        return out, penalties, aux


def _wrap(model: nn.Module, world: _World, device: torch.device) -> nn.Module:
    net = _WithPenalties(model)
    if not world.distributed:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP

    # find_unused_parameters: sampled gates may bypass a branch in a step
    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


# -- logging -----------------------------------------------------------------------------------------------

class _Bar:
    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=Console(stderr=True))
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        self.progress.start()

    def update(self, done: int, phase: str, info: str | None = None) -> None:
        if self.progress is not None:
            fields = {"info": info} if info is not None else {}
            self.progress.update(self.task, completed=done, description=phase, **fields)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# -- the loop ----------------------------------------------------------------------------------------------

class _Run:
    """A run's training state: groups, optimizers, phase. ``state()``/``restore()`` are all of it."""

    def __init__(self, model: nn.Module, cfg: Train, world: _World, device: torch.device) -> None:
        self.model, self.cfg, self.world, self.device = model, cfg, world, device
        self.groups = param_groups(model)
        self.configs = group_configs(model, self.groups, cfg)
        searches = any(kind(k) == "arch" for k in self.groups) or bool(getattr(model, "searches", False))
        self.plan = Plan.of(cfg, searches)
        self.optimizers = {name: _optimizer(self.configs[name], ps) for name, ps in self.groups.items()}
        self.params = [p for ps in self.groups.values() for p in ps]
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
        self.frozen = False
        self.lrs: dict[str, float] = {}
        self.window = _Window()

    def switch(self) -> None:
        """The search ends: the model fixes its decisions, arch and dual stop training."""
        self.frozen = True
        if hasattr(self.model, "freeze"):
            self.model.freeze()
        for name, params in self.groups.items():
            if kind(name) != "weights":
                for p in params:
                    p.requires_grad_(False)
                    p.grad = None

    def step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, teacher: nn.Module | None,
             step: int) -> dict[str, torch.Tensor]:
        """One forward/backward; each active group's optimizer steps on its k-th step. Returns the loss terms."""
        cfg, scaler = self.cfg, self.scaler
        active = [k for k in self.optimizers if k == "weights" or not self.frozen]
        self.lrs = {k: self.plan.lr(self.configs[k], step, cfg) for k in active}
        for k in active:
            for pg in self.optimizers[k].param_groups:
                pg["lr"] = self.lrs[k]
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype, enabled=cfg.amp):
            out, penalties, aux = net(x)
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits = _logits(teacher(x), "the teacher")
        loss, terms = task_loss(_logits(out, type(self.model).__name__), y, t_logits, cfg.distill)
        for name, logits in aux.items():  # exit classifiers: the same task loss, weight 1 (methods.md §2.3)
            terms[name], _ = task_loss(_logits(logits, name), y, t_logits, cfg.distill)
            loss = loss + terms[name]
        for name, value in penalties.items():
            terms[name] = value.float()
            loss = loss + terms[name]
        # GradScaler (CUDA float16) rescales every step: groups with every > 1 then sum differently scaled grads
        scaler.scale(loss).backward()
        for k in active:
            if (step + 1) % self.configs[k].every:
                continue  # this group accumulates gradients until its k-th step
            opt = self.optimizers[k]
            if k == "weights" and cfg.clip_grad > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self.groups[k], cfg.clip_grad)
            scaler.step(opt)
            if kind(k) == "dual":
                with torch.no_grad():
                    for p in self.groups[k]:
                        p.clamp_(min=0.0)
            opt.zero_grad(set_to_none=True)
        scaler.update()
        if hasattr(self.model, "after_step"):
            self.model.after_step(step, self.lrs.get("weights", 0.0))
        return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}

    def state(self, step: int, loss: float | None, order: _Batches) -> dict[str, Any] | None:
        """The checkpoint (on rank 0; None elsewhere). Collective under DDP: it gathers every rank's RNGs and
        unlogged loss window (so the first log line after a resume averages the same steps)."""
        mine = {"rng": _rng_state(), "window": self.window.state()}
        ranks: list[Any] = [None] * self.world.size
        if self.world.distributed:
            torch.distributed.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if self.world.rank != 0:
            return None
        return {"format": FORMAT, "step": step, "frozen": self.frozen, "loss": loss,
                "model": self.model.state_dict(), "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "grads": [p.grad for p in self.params], "rng": [r["rng"] for r in ranks],
                "window": [r["window"] for r in ranks], "data": order.fingerprint(),
                "train": dataclasses.asdict(self.cfg)}

    def restore(self, state: dict[str, Any], path: Path) -> None:
        _restore_model(self.model, state["model"], state["frozen"], self.switch, path)
        try:
            for name, opt in self.optimizers.items():
                opt.load_state_dict(state["optimizers"][name])
        except (KeyError, ValueError) as e:
            raise VitgraphError(f"cannot resume: the optimizer state in {path} does not fit this model's parameter "
                                f"groups ({e}); resume with the model of that run") from None
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        for p, g in zip(self.params, state["grads"]):
            p.grad = None if g is None else g.to(self.device)
        if "window" in state:  # absent from checkpoints written before it was kept
            self.window.load(state["window"][self.world.rank], self.device)
        _set_rng_state(state["rng"][self.world.rank])  # last: freeze() above may draw random numbers


def fit(model: nn.Module, train_data: Dataset | DataLoader | None, cfg: Train, *, teacher: nn.Module | None = None,
        val_data: Dataset | DataLoader | None = None, out_dir: str | Path | None = None,
        resume: bool | str | Path = False, progress: bool = True, evaluate_every: int = 0,
        num_workers: int | None = None) -> FitResult:
    """Train ``model`` for ``cfg.steps`` steps (see the module docstring); returns what happened.

    ``train_data`` yields ``(image, label)``; a DataLoader is accepted for its dataset (and workers) — the
    batch order is always fit's own. ``out_dir`` receives checkpoint.pt and metrics.jsonl (rank 0 writes);
    ``resume`` is True to continue from ``out_dir``'s checkpoint.pt, or the path of the checkpoint to continue.
    A fresh run seeds torch, numpy and ``random`` with ``train.seed + rank``; a resumed one restores them.
    """
    t_begin = time.perf_counter()
    if isinstance(train_data, DataLoader):
        num_workers = train_data.num_workers if num_workers is None else num_workers
        train_data = train_data.dataset
    workers = num_workers or 0
    if cfg.steps > 0 and train_data is None:
        raise SpecError(f"train.steps is {cfg.steps} but there is no training data: training needs data "
                        f"(--data digits or --data imagefolder:PATH), or set train.steps: 0 for one-shot")
    if resume and out_dir is None:
        raise SpecError("resume=True needs out_dir, the folder holding the run's checkpoint.pt")
    world = _World.setup()
    device = next(iter(model.parameters()), torch.empty(0)).device
    if world.distributed and torch.distributed.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and world.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT if out is not None else None

    run = _Run(model, cfg, world, device)
    order = _Batches(train_data, cfg.batch_size, cfg.seed, world) if cfg.steps > 0 else None
    source = ckpt if isinstance(resume, bool) else Path(resume)
    start, last_loss = _begin(run, order, source, bool(resume))

    def checkpoint(step: int) -> None:
        state = run.state(step, last_loss, order) if ckpt is not None else None
        if state is not None:
            _save(ckpt, state)

    metrics = _Metrics(out / METRICS if out is not None and world.rank == 0 else None, start, resume)
    log_every = cfg.log_every if cfg.log_every > 0 else max(cfg.steps, 1)
    bar = _Bar(progress and world.rank == 0 and sys.stderr.isatty(), cfg.steps, start)
    window, images, top1 = run.window, 0, None
    model.train()
    net = _wrap(model, world, device)
    t_loop = time.perf_counter()
    try:
        data_iter = _batches(train_data, order, start, cfg.steps, workers, device) if order else iter(())
        for step, (x, y) in zip(range(start, cfg.steps), data_iter):
            if run.plan.two_phase and step == run.plan.search_end and not run.frozen:
                run.switch()
                net = _wrap(model, world, device)  # DDP must forget the parameters that stopped training
            window.add(run.step(net, x, y, teacher, step), x.shape[0] * world.size)
            images += x.shape[0] * world.size
            done, phase, info = step + 1, run.plan.phase(step), None
            if done % log_every == 0 or done == cfg.steps:
                last_loss, info = _log(window, run, metrics, done, phase)
            if val_data is not None and evaluate_every > 0 and done % evaluate_every == 0 and done < cfg.steps:
                metrics.write({"step": done, "phase": phase,
                               "top1": evaluate(model, val_data, cfg.batch_size, num_workers=workers)})
            if cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                checkpoint(done)
            bar.update(done, phase, info)
    finally:
        bar.close()
    train_seconds = time.perf_counter() - t_loop

    if run.plan.two_phase and not run.frozen:  # a run that only searched still ends with fixed decisions
        run.switch()
    if val_data is not None:
        top1 = evaluate(model, val_data, cfg.batch_size, num_workers=workers)
        metrics.write({"step": cfg.steps, "phase": "end", "top1": top1})
    if cfg.steps > 0:
        checkpoint(cfg.steps)
    return FitResult(steps=cfg.steps, loss=last_loss, top1=top1, seconds=time.perf_counter() - t_begin,
                     images_per_s=images / train_seconds if train_seconds > 0 else 0.0, history=metrics.path)


def _begin(run: _Run, order: _Batches | None, ckpt: Path | None, resume: bool) -> tuple[int, float | None]:
    """(first step, last logged loss): a resumed run's from its checkpoint; a fresh run seeds every RNG."""
    cfg, world = run.cfg, run.world
    if not resume:
        torch.manual_seed(cfg.seed + world.rank)
        random.seed(cfg.seed + world.rank)
        np.random.seed((cfg.seed + world.rank) % 2**32)
        return 0, None
    state = _load(ckpt)
    if order is not None and state["data"] != order.fingerprint():
        raise VitgraphError(f"cannot resume: {ckpt} was written for data/batching {state['data']}, this run has "
                            f"{order.fingerprint()}; use the same data, train.batch_size, train.seed and "
                            f"number of processes")
    differ = _changed_settings(state.get("train"), cfg)
    if differ:
        raise VitgraphError(f"cannot resume: {ckpt} was written with other train settings ({'; '.join(differ)}); "
                            f"resume with that run's settings (only train.steps, checkpoint_every and log_every "
                            f"may change), or start fresh in another out_dir")
    if state["step"] > cfg.steps:
        raise VitgraphError(f"cannot resume: {ckpt} is at step {state['step']}, past train.steps={cfg.steps}; "
                            f"raise train.steps or start fresh in another out_dir")
    run.restore(state, ckpt)
    return state["step"], state["loss"]


def _log(window: _Window, run: _Run, metrics: _Metrics, done: int, phase: str) -> tuple[float, str]:
    """Flush the window into metrics.jsonl: (the mean loss, the progress bar's text); a non-finite loss stops."""
    terms, rate = window.flush(run.world)
    loss = terms.pop("loss")
    if not math.isfinite(loss):
        raise VitgraphError(f"the loss is {loss} at step {done} (terms {terms}); lower train.lr, "
                            f"keep train.clip_grad on, or check the model's penalties")
    status = _status(run.model) if run.world.rank == 0 else {}
    metrics.write({"step": done, "phase": phase, "loss": loss, "terms": terms, "lr": run.lrs,
                   "status": status, "images_per_s": rate})
    return loss, "  ".join([f"loss {loss:.4f}", *(f"{k} {v:.3g}" for k, v in status.items()), f"{rate:.0f} img/s"])


def _status(model: nn.Module) -> dict[str, float]:
    return {k: float(v) for k, v in model.status().items()} if hasattr(model, "status") else {}
