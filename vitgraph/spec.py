"""The compression spec: what to compress, by which method, under which budget.

A spec is YAML (or a dict) validated on load into frozen dataclasses. Unknown keys are errors that
name the key and list the allowed ones; ``preset`` fills the defaults of a published method first,
then the user's keys override it::

    preset: wdpruning
    budget: {flops: 0.5}
    train: {steps: 300}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from vitgraph.errors import SpecError

WIDTH_METHODS = ("magnitude", "taylor", "wdpruning", "uvc", "spvit")
TOKEN_METHODS = ("spvit", "attention")
ONE_SHOT = ("magnitude", "taylor")
WIDTH_ALLOCATIONS = ("uniform", "global")
LATENCY_TARGETS = ("onnx", "onnx-int8", "eager", "compile")  # onnx-int8: dynamic INT8, against dense fp32 ONNX


@dataclass(frozen=True)
class Budget:
    flops: float | None = 0.5    # target fraction of the dense model's FLOPs (None: latency only)
    tolerance: float = 0.03      # the compact model lands within +- this fraction of the dense FLOPs
    latency: float | None = None  # target fraction of the dense model's measured latency on `target`
    target: str = "onnx"         # where latency is measured: onnx | onnx-int8 | eager | compile
    batch: int = 1               # the batch size latency is measured at
    latency_tolerance: float = 0.05  # the measured latency ratio lands within +- this
    table: str | None = None     # a `vitgraph profile` table (JSON); None: the cached one, or profile now
    rounds: int = 2              # measured-feedback rounds when the measurement misses (one-shot specs)

    def __post_init__(self) -> None:
        if self.flops is None and self.latency is None:
            raise SpecError("budget needs flops or latency (a fraction of the dense model's FLOPs or latency)")
        if self.flops is not None and not 0.0 < self.flops <= 1.0:
            raise SpecError(f"budget.flops must be a fraction of the dense FLOPs in (0, 1], got {self.flops}")
        if not 0.0 < self.tolerance < 0.5:
            raise SpecError(f"budget.tolerance must be in (0, 0.5), got {self.tolerance}")
        if self.latency is not None and not 0.0 < self.latency <= 1.0:
            raise SpecError(f"budget.latency must be a fraction of the dense model's latency in (0, 1], "
                            f"got {self.latency}")
        if not 0.0 < self.latency_tolerance < 0.5:
            raise SpecError(f"budget.latency_tolerance must be in (0, 0.5), got {self.latency_tolerance}")
        if self.target not in LATENCY_TARGETS:
            raise SpecError(f"budget.target {self.target!r} is not one of {', '.join(LATENCY_TARGETS)}")
        if self.batch < 1:
            raise SpecError(f"budget.batch must be a positive integer, got {self.batch}")
        if not 0 <= self.rounds <= 5:
            raise SpecError(f"budget.rounds (measured-feedback rounds) must be in 0..5, got {self.rounds}")

    @property
    def metric(self) -> str:
        """What the axes' decisions are priced in: ``latency`` when budget.latency is set, else ``flops``."""
        return "flops" if self.latency is None else "latency"

    @property
    def fraction(self) -> float:
        """The target the axes project their decisions onto, as a fraction of the dense model's cost."""
        return float(self.latency if self.latency is not None else self.flops)  # type: ignore[arg-type]

    @property
    def slack(self) -> float:
        """The tolerance of ``fraction``."""
        return self.latency_tolerance if self.latency is not None else self.tolerance

    @property
    def key(self) -> str:
        """The spec key of ``fraction``, for messages."""
        return f"budget.{self.metric}"


@dataclass(frozen=True)
class Width:
    method: str = "magnitude"    # magnitude | taylor (one-shot) | wdpruning | uvc | spvit (learned)
    heads: bool = True
    head_dim: bool = False       # UVC value-dim pruning
    mlp: bool = True
    embed: bool = False          # the residual stream's channels (one group through every block)
    align: int = 8               # kept MLP units rounded to multiples of this (heads: whole heads)
    allocation: str = "uniform"  # one-shot methods: uniform (one keep ratio) | global (ranked across layers)

    def __post_init__(self) -> None:
        if self.method not in WIDTH_METHODS:
            raise SpecError(f"width.method {self.method!r} is not one of {', '.join(WIDTH_METHODS)}")
        if self.allocation not in WIDTH_ALLOCATIONS:
            raise SpecError(f"width.allocation {self.allocation!r} is not one of {', '.join(WIDTH_ALLOCATIONS)}")
        if self.align < 1:
            raise SpecError(f"width.align must be a positive integer, got {self.align}")

    @property
    def enabled(self) -> bool:
        return self.heads or self.head_dim or self.mlp or self.embed


@dataclass(frozen=True)
class Depth:
    skip_blocks: bool = False    # UVC block gates: learn which residual blocks to delete
    per_branch: bool = False     # one gate per branch (attention, MLP) instead of per block
    warmup: float = 0.0          # fraction of the search with every gate fixed at 0.5 (UVC: 1/6)
    exits: tuple[int, ...] = ()  # WDPruning exit classifiers after these blocks (1-based)
    exit: int | None = None      # cut the model at this exit; None: the shallowest within exit_tolerance
    exit_tolerance: float = 0.01  # top-1 (0..1) an exit may lose against the final head on validation data

    def __post_init__(self) -> None:
        if any(not isinstance(e, int) or isinstance(e, bool) or e < 1 for e in self.exits):
            raise SpecError(f"depth.exits are 1-based block numbers (an exit after block e), got {list(self.exits)}")
        if self.exit is not None and (not isinstance(self.exit, int) or self.exit < 1):
            raise SpecError(f"depth.exit is a 1-based block number from depth.exits, got {self.exit!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise SpecError(f"depth.warmup is a fraction of the search steps in [0, 1), got {self.warmup}")
        if not 0.0 <= self.exit_tolerance <= 1.0:
            raise SpecError(f"depth.exit_tolerance is a top-1 difference in [0, 1], got {self.exit_tolerance}")


@dataclass(frozen=True)
class Attention:
    to_conv: bool = False        # SPViT (He et al.)


@dataclass(frozen=True)
class Tokens:
    method: str = "spvit"         # spvit (learned selectors, Kong et al.) | attention (one-shot: attention received)
    stages: tuple[int, ...] = ()  # selectors before these blocks (0-based); empty: L/4, L/2, 3L/4 when enabled
    keep: tuple[float, ...] = ()  # kept fraction of the patch tokens after each stage; empty: from budget.flops
    mode: str = "static"          # static (top-K + package token, fixed shapes) | dynamic (per-image gather)
    enabled: bool | None = None   # None: on when stages or keep are given; a spec file's non-empty tokens: sets it

    def __post_init__(self) -> None:
        if self.method not in TOKEN_METHODS:
            raise SpecError(f"tokens.method must be one of {', '.join(TOKEN_METHODS)}, got {self.method!r}")
        if self.mode not in ("static", "dynamic"):
            raise SpecError(f"tokens.mode must be static or dynamic, got {self.mode!r}")
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.stages) \
                or list(self.stages) != sorted(set(self.stages)):
            raise SpecError(f"tokens.stages are increasing 0-based block indices, got {list(self.stages)}")
        if any(not isinstance(k, (int, float)) or isinstance(k, bool) or not 0.0 < k <= 1.0 for k in self.keep) \
                or list(self.keep) != sorted(self.keep, reverse=True):
            raise SpecError(f"tokens.keep are kept fractions in (0, 1], one per stage, not increasing; got "
                            f"{list(self.keep)}")
        if self.stages and self.keep and len(self.keep) != len(self.stages):
            raise SpecError(f"tokens.keep has {len(self.keep)} ratios for {len(self.stages)} tokens.stages; give one "
                            f"per stage, or none to derive them from budget.flops")

    @property
    def on(self) -> bool:
        return bool(self.stages or self.keep) if self.enabled is None else self.enabled


@dataclass(frozen=True)
class Distill:
    alpha: float = 0.5           # weight of the KL term; 1 - alpha weighs the task loss
    tau: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0 or self.tau <= 0:
            raise SpecError(f"train.distill needs 0 <= alpha <= 1 and tau > 0, got alpha={self.alpha} tau={self.tau}")


@dataclass(frozen=True)
class Train:
    steps: int = 0               # 0 = one-shot; otherwise learn gates, then fine-tune
    batch_size: int = 64
    lr: float = 5.0e-4           # weights
    distill: Distill = field(default_factory=Distill)
    search: float = 0.5          # fraction of the steps spent learning the gates (the rest fine-tunes)
    arch_lr: float | None = None  # gates' learning rate (None: the method's default)
    dual_lr: float | None = None  # multipliers' ascent rate (None: the method's default)
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr: float = 1.0e-5       # cosine schedules end here
    clip_grad: float = 1.0       # max gradient norm (0 = off)
    amp: bool = False            # autocast (bfloat16 on CPU, float16 on CUDA)
    checkpoint_every: int = 0    # steps between checkpoints (0 = only at the end)
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise SpecError(f"train needs steps >= 0, batch_size >= 1 and lr > 0 "
                            f"(got steps={self.steps}, batch_size={self.batch_size}, lr={self.lr})")
        if not 0.0 <= self.search <= 1.0:
            raise SpecError(f"train.search is the fraction of steps spent searching, in [0, 1]; got {self.search}")

    @property
    def search_steps(self) -> int:
        return round(self.steps * self.search)


@dataclass(frozen=True)
class Spec:
    preset: str | None = None
    budget: Budget = field(default_factory=Budget)
    width: Width = field(default_factory=Width)
    depth: Depth = field(default_factory=Depth)
    attention: Attention = field(default_factory=Attention)
    tokens: Tokens = field(default_factory=Tokens)
    train: Train = field(default_factory=Train)

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Spec:
        path = Path(path)
        example = ("a spec is a YAML mapping such as `budget: {flops: 0.5}` or `preset: wdpruning` "
                   "(see README, 'The spec')")
        if path.is_dir():
            raise SpecError(f"spec file {path} is a folder; name the YAML file inside it ({example})")
        if not path.is_file():
            raise SpecError(f"spec file {path} does not exist; write one ({example})")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise SpecError(f"spec file {path} is not UTF-8 text (a binary or otherwise encoded file?); "
                            "a spec is a YAML file, e.g. examples/specs/wdpruning.yaml") from None
        except yaml.YAMLError as e:
            raise SpecError(f"spec file {path} is not valid YAML: {_yaml_problem(e)}; fix that line") from None
        except OSError as e:  # unreadable: permissions, a device, a broken mount
            raise SpecError(f"spec file {path} cannot be read ({e.strerror or e}); check the path and its "
                            "permissions") from None
        if data is None:  # an empty file, or comments only: almost always the wrong file, not "all defaults"
            raise SpecError(f"spec file {path} is empty; {example}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "spec") -> Spec:
        if not isinstance(data, dict):
            raise SpecError(f"{source}: a spec is a mapping of keys (budget, width, ...), got {type(data).__name__}")
        data = dict(data)
        budget = data.get("budget")
        latency_only = isinstance(budget, dict) and budget.get("latency") is not None and "flops" not in budget
        preset = data.get("preset")
        if preset is not None:
            if not isinstance(preset, str) or preset not in PRESETS:
                raise SpecError(f"{source}: unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
            data = _merge(PRESETS[preset], data)
        if latency_only:  # a latency budget alone does not also hold the model to a preset's FLOPs
            data["budget"] = {**data["budget"], "flops": None}
        tokens = data.get("tokens")
        if isinstance(tokens, dict) and tokens and "enabled" not in tokens:  # a tokens section asks for tokens
            data = {**data, "tokens": {**tokens, "enabled": True}}
        spec = _build(cls, data, source, "")
        if spec.tokens.on and "width" not in data:  # a spec that names only tokens compresses only tokens
            spec = dataclasses.replace(spec, width=Width(heads=False, mlp=False))
        return spec

    @classmethod
    def preset_spec(cls, name: str, **overrides: Any) -> Spec:
        return cls.from_dict({"preset": name, **overrides})

    # -- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, tuple):
                return list(v)
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v
        return plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @property
    def learned(self) -> bool:
        """Whether the width decisions are learned (wdpruning, uvc, spvit) rather than scored once."""
        return self.width.enabled and self.width.method not in ONE_SHOT

    @property
    def trains(self) -> bool:
        """Whether anything in the spec needs training to decide (learned widths, block gates, exits, conv
        choices, learned token selectors)."""
        return self.learned or self.depth.skip_blocks or bool(self.depth.exits) or self.attention.to_conv \
            or (self.tokens.on and self.tokens.method == "spvit")


# Defaults of the published methods (../shared/methods.md); user keys override them.
PRESETS: dict[str, dict[str, Any]] = {
    "wdpruning": {"budget": {"flops": 0.5},
                  "width": {"method": "wdpruning", "heads": True, "head_dim": False, "mlp": True, "align": 16},
                  "train": {"steps": 300, "lr": 5.0e-4, "search": 0.5}},
    # methods.md §4: heads, value dims inside the heads, MLP units and block gates under one budget
    "uvc": {"budget": {"flops": 0.5},
            "width": {"method": "uvc", "heads": True, "head_dim": True, "mlp": True, "align": 8},
            "depth": {"skip_blocks": True, "warmup": 0.167},
            "train": {"steps": 300, "lr": 1.0e-4, "distill": {"alpha": 0.1, "tau": 1.0}, "search": 0.5}},
    # methods.md §3: learned selectors at L/4, L/2, 3L/4, ratios from the budget, KD on the logits (and, in
    # the token axis, on the kept tokens); (decision) 30 % of the steps search, as the demo does
    "spvit_tokens": {"budget": {"flops": 0.6},
                     "tokens": {"enabled": True, "method": "spvit", "stages": [], "keep": []},
                     "width": {"heads": False, "mlp": False},
                     "train": {"steps": 300, "lr": 5.0e-4, "search": 0.3, "distill": {"alpha": 0.5, "tau": 1.0}}},
    # methods.md §1: attention -> conv choices and MLP units under the quadratic FLOPs loss; (decision) the
    # search is half the steps (the paper: 20 of 150 epochs, far longer runs), weights lr 1e-4
    "spvit_conv": {"budget": {"flops": 0.6}, "attention": {"to_conv": True},
                   "width": {"method": "spvit", "heads": False, "mlp": True, "align": 1},
                   "train": {"steps": 300, "lr": 1.0e-4, "search": 0.5}},
}


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML parser error on one line: ``line 2, column 6: expected ',' or '}', but got ':'``."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls: type, data: dict[str, Any], source: str, prefix: str) -> Any:
    allowed = {f.name: f for f in fields(cls)}
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise SpecError(f"{source}: unknown key {prefix + unknown[0]!r}; allowed keys"
                        f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(allowed)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = allowed[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise SpecError(f"{source}: {key} must be a mapping with keys "
                                f"{', '.join(x.name for x in fields(default))}, got {value!r}")
            kwargs[name] = _build(type(default), value, source, key + ".")
        else:
            kwargs[name] = _coerce(value, default, f.type, key, source)
    try:
        return cls(**kwargs)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None


def _coerce(value: Any, default: Any, annotation: Any, key: str, source: str) -> Any:
    """Check a leaf value against its default's type (ints may stand for floats)."""
    if value is None:
        if default is None or "None" in str(annotation):
            return None
        raise SpecError(f"{source}: {key} cannot be empty")
    if isinstance(default, bool) or "bool" in str(annotation):
        if not isinstance(value, bool):
            raise SpecError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if isinstance(default, tuple):
        if isinstance(value, (int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{source}: {key} must be a list, got {value!r}")
        return tuple(value)
    if "float" in str(annotation):
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "5e-4" as a string
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SpecError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if "int" in str(annotation):
        if not isinstance(value, int) or isinstance(value, bool):
            raise SpecError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if "str" in str(annotation) and not isinstance(value, str):
        raise SpecError(f"{source}: {key} must be a string, got {value!r}")
    return value
