"""Parameter groups of a run and their schedules: which optimizer, learning rate and step each group gets.

A model's groups are ``weights``, ``arch`` and ``dual`` (and ``arch:NAME`` / ``dual:NAME`` with settings
of their own); ``dual`` groups take ascent steps. Learning rates are functions of the step alone (``Plan``),
which is what makes a resumed run equal an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from vitgraph.errors import VitgraphError
from vitgraph.spec import Train

GROUPS = ("weights", "arch", "dual")


@dataclass(frozen=True)
class GroupConfig:
    """How one parameter group is optimised. ``every=k`` steps its optimizer every k-th step (summing grads)."""

    name: str
    lr: float
    weight_decay: float = 0.0
    every: int = 1
    schedule: str = "cosine"
    optimizer: str = "adamw"
    momentum: float = 0.0         # SGD only; explicit settings opt into momentum
    beta1: float = 0.9            # AdamW only: 0 stops a parameter as soon as its gradient does

    def __post_init__(self) -> None:
        problem = (f"lr must be a number >= 0, got {self.lr!r}" if not isinstance(self.lr, (int, float)) or self.lr < 0
                   else f"every must be an integer >= 1, got {self.every!r}" if not isinstance(self.every, int)
                   or self.every < 1
                   else f"schedule must be 'cosine' or 'constant', got {self.schedule!r}"
                   if self.schedule not in ("cosine", "constant")
                   else f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}"
                   if self.optimizer not in ("adamw", "sgd") else None)
        if problem:
            raise VitgraphError(f"optimizer settings of group {self.name!r}: {problem}")


# -- parameter groups and schedules ------------------------------------------------------------------------

def kind(group: str) -> str:
    """``weights``, ``arch`` or ``dual``: what a group name (``"arch:blocks"``) is."""
    return group.split(":", 1)[0]


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's groups (all trainable parameters are ``weights`` for a plain module), checked."""
    if not hasattr(model, "param_groups"):
        return {"weights": [p for p in model.parameters() if p.requires_grad]}
    groups = {k: list(v) for k, v in model.param_groups().items() if len(v)}
    unknown = sorted(g for g in groups if kind(g) not in GROUPS or g.startswith("weights:"))
    if unknown:
        raise VitgraphError(f"{type(model).__name__}.param_groups() has group {unknown[0]!r}; "
                            f"groups are {', '.join(GROUPS)}, or arch:NAME / dual:NAME")
    seen: dict[int, str] = {}
    for name, params in groups.items():
        for p in params:
            if id(p) in seen:
                raise VitgraphError(f"{type(model).__name__}.param_groups(): a parameter of shape {tuple(p.shape)} "
                                    f"is in both {seen[id(p)]!r} and {name!r}; give it one group")
            seen[id(p)] = name
    return {name: groups[name] for k in GROUPS for name in groups if kind(name) == k}


def group_configs(model: nn.Module, groups: dict[str, list[nn.Parameter]], cfg: Train) -> dict[str, GroupConfig]:
    defaults = model.optim_defaults() if hasattr(model, "optim_defaults") else {}
    overrides = {"weights": {"lr": cfg.lr, "weight_decay": cfg.weight_decay}, "arch": {"lr": cfg.arch_lr},
                 "dual": {"lr": cfg.dual_lr}}
    allowed = [f.name for f in dataclasses.fields(GroupConfig) if f.name != "name"]
    out = {}
    for name in groups:
        settings = dict(defaults.get(name, {}))
        settings.update({k: v for k, v in overrides.get(name, {}).items() if v is not None})
        bad = [k for k in settings if k not in allowed]
        if bad:
            raise VitgraphError(f"{type(model).__name__}.optim_defaults()[{name!r}] has key {bad[0]!r}; "
                                f"allowed: {', '.join(allowed)}")
        if "lr" not in settings:
            raise VitgraphError(f"{type(model).__name__}.optim_defaults() gives no lr for group {name!r}; "
                                f"add one there or set train.{name}_lr in the spec")
        out[name] = GroupConfig(name=name, **settings)
    return out


def lr_at(step: int, base: float, floor: float, kind: str, start: int, end: int, warmup: int = 0) -> float:
    """The rate at ``step`` of a phase ``[start, end)``: linear warm-up, then constant or cosine down to ``floor``."""
    i = step - start
    if i < warmup:
        return base * (i + 1) / warmup
    if kind == "constant":
        return base
    t = min(1.0, (i - warmup) / max(end - start - warmup - 1, 1))
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Plan:
    """The phases of a run: ``search`` [0, search_end) then ``finetune``, or one ``train`` phase."""

    steps: int
    search_end: int
    two_phase: bool

    @classmethod
    def of(cls, cfg: Train, has_arch: bool) -> Plan:
        return cls(cfg.steps, min(cfg.search_steps, cfg.steps) if has_arch else cfg.steps, has_arch)

    def phase(self, step: int) -> str:
        return "train" if not self.two_phase else "search" if step < self.search_end else "finetune"

    def lr(self, g: GroupConfig, step: int, cfg: Train) -> float:
        if kind(g.name) != "weights":  # arch and dual only train while searching
            return lr_at(step, g.lr, g.lr * cfg.min_lr / cfg.lr, g.schedule, 0, self.search_end)
        if step < self.search_end:  # the warm-up belongs to the first phase that trains weights
            return lr_at(step, g.lr, cfg.min_lr, g.schedule, 0, self.search_end, min(cfg.warmup_steps, self.search_end))
        warmup = cfg.warmup_steps if self.search_end == 0 else 0
        return lr_at(step, g.lr, cfg.min_lr, "cosine", self.search_end, self.steps, min(warmup, self.steps))


def _optimizer(g: GroupConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if g.name == "weights":  # no decay on biases, norms and other 1-D parameters (as timm does)
        decay = [p for p in params if p.ndim > 1]
        rest = [p for p in params if p.ndim <= 1]
        groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, g.weight_decay), (rest, 0.0)) if ps]
    else:
        groups = [{"params": params, "weight_decay": g.weight_decay}]
    ascent = kind(g.name) == "dual"
    if g.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=g.lr, momentum=g.momentum, maximize=ascent)
    return torch.optim.AdamW(groups, lr=g.lr, betas=(g.beta1, 0.999), maximize=ascent)
