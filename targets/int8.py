"""INT8 target: an fp32 ONNX file -> ONNX Runtime's quantizer -> one int8 ``.onnx``, checked by top-1 agreement.

Invariant: :func:`quantize` returns only after ONNX Runtime has loaded the int8 file (and run it, when
plans were compared), and
:func:`lower_int8` only after the int8 model's top-1 agrees with the fp32 model's on at least
``tolerance`` of the checked images (the validation batches given, else seeded random inputs, and the
report says which; on random inputs, near-ties are not judged: see :func:`decisive_agreement`); below it,
:class:`AgreementError` (a :class:`~vitgraph.errors.ParityError`).

Two modes, both ``onnxruntime.quantization`` after its ``quant_pre_process`` (optimisation and symbolic
shape inference): ``dynamic`` (int8 weights per channel, activations quantized at run time, no data) and
``static`` (QDQ: activation ranges calibrated on batches with MinMax, percentile or entropy; uint8
activations and int8 weights, ORT's advice for x86 with VNNI).

Which ops stay fp32 is measured, not assumed: each :data:`PLANS` entry (the weight products only, plus the
activation x activation attention products, plus the patch convolution, everything ORT can quantize) is
quantized, checked for agreement and timed interleaved in ORT (spinning off); the fastest one that agrees
wins, and the report names the op types left in fp32 (``fp32_ops``), read from the quantized graph itself.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitgraph.errors import ParityError, SpecError
from vitgraph.targets import _feeds as fd
from vitgraph.targets._common import LoweringError, check_example_inputs, describe_failure, model_name
from vitgraph.targets._feeds import DECISIVE, agreement, decisive_agreement, random_feeds

__all__ = ["DEFAULT_TOLERANCE", "METHODS", "MODES", "PLANS", "AgreementError", "Int8Config", "Int8Report",
           "Plan", "agreement", "check", "fp32_ops", "lower_int8", "quantizable", "quantize"]

MODES = ("dynamic", "static")
METHODS = ("minmax", "percentile", "entropy")
DEFAULT_TOLERANCE = 0.97       # top-1 agreement with the fp32 model, the parity INT8 is held to
CALIBRATION_IMAGES = 256       # static mode calibrates on at most this many images
TIE = 0.03                     # plans within 3 % of the fastest median count as equally fast
# shape and layout ops: no arithmetic, so "left in fp32" says nothing about them
_LAYOUT = frozenset({"Reshape", "Transpose", "Slice", "Squeeze", "Unsqueeze", "Concat", "Shape", "Gather",
                     "Expand", "Flatten", "Identity", "Constant", "Cast", "Split", "ConstantOfShape", "Range",
                     "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
_NO_DATA_FIX = "pass --data digits or --data imagefolder:PATH for calibration batches, or use dynamic mode"


class AgreementError(ParityError):
    """The int8 model's top-1 agrees with the fp32 model's on fewer images than the tolerance asks."""


@dataclass(frozen=True)
class Plan:
    """Which ops ORT quantizes: ``op_types`` (None: every type it can) and whether a MatMul needs a weight
    as its second input (``const_b_only``: the attention products q@k and attn@v stay fp32); ``fused``: the
    attention sites first fused into ORT's fp32 MultiHeadAttention kernel (:mod:`.ort_attention`)."""

    name: str
    op_types: tuple[str, ...] | None
    const_b_only: bool
    fused: bool = False


# in the order of what they quantize, least first (a tie in speed goes to the earlier plan)
PLANS = (Plan("products", ("MatMul", "Gemm"), True),
         Plan("products+mha", ("MatMul", "Gemm"), True, fused=True),  # ORT-only: after the portable plan
         Plan("products+attention", ("MatMul", "Gemm"), False),
         Plan("products+conv", ("MatMul", "Gemm", "Conv"), True),
         Plan("all", None, False))


@dataclass(frozen=True)
class Int8Config:
    """How ``compile --quantize int8`` / ``export --target onnx-int8`` quantize. ``mode`` None: static when
    calibration data is given, else dynamic. ``plan`` "auto" measures :data:`PLANS`; a name picks one."""

    mode: str | None = None
    method: str = "minmax"
    per_channel: bool = True
    tolerance: float = DEFAULT_TOLERANCE
    plan: str = "auto"
    keep_fp32: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise SpecError(f"int8: unknown quantization mode {self.mode!r}; choose dynamic (int8 weights, no "
                            f"data needed) or static (QDQ, calibrated: {_NO_DATA_FIX.split(', or')[0]})")
        if self.method not in METHODS:
            raise SpecError(f"int8: unknown calibration method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.tolerance <= 1.0:
            raise SpecError(f"int8: the agreement tolerance is a fraction of images in [0, 1], got {self.tolerance}")
        if self.plan != "auto" and self.plan not in {p.name for p in PLANS}:
            raise SpecError(f"int8: unknown plan {self.plan!r}; choose auto or one of "
                            f"{', '.join(p.name for p in PLANS)}")

    def resolved_mode(self, has_data: bool) -> str:
        if self.mode == "static" and not has_data:
            raise SpecError(f"int8: static quantization calibrates activation ranges on data, and none was "
                            f"given: {_NO_DATA_FIX}")
        return self.mode or ("static" if has_data else "dynamic")


@dataclass
class Int8Report:
    """One quantization: where it went, what stayed fp32, how it agrees with fp32 and how fast it runs."""

    path: str
    mode: str
    calibration: str | None              # the calibration method (static), None for dynamic
    plan: str
    fp32_ops: list[str]                   # arithmetic op types left in fp32 ("MatMul" when some MatMuls are)
    fp32_nodes: dict[str, int]            # and how many nodes of each
    quantized_nodes: int
    plans_ms: dict[str, float]            # batch-1 median of every plan measured ({} when one was named)
    bytes: dict[str, int]                 # {"fp32", "int8"} file sizes
    seconds: float
    tolerance: float = DEFAULT_TOLERANCE
    agreement: float | None = None        # fraction of checked images whose top-1 matches fp32
    max_abs_err: float | None = None      # largest logit difference on them
    checked_on: str | None = None         # "validation data (N images)" or "random inputs (N images)"
    top1: dict[str, float | None] = field(default_factory=lambda: {"fp32": None, "int8": None})
    latency_ms: dict[str, float] = field(default_factory=dict)
    judged: float | None = None           # the agreement held to ``tolerance`` (random inputs: decisive rows)

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json["int8"]`` record."""
        d = asdict(self)
        d["path"] = Path(self.path).name
        return d


def quantizable(plan: Plan, mode: str) -> frozenset[str]:
    """The op types ``plan`` lets ORT quantize in ``mode`` (its registry of the mode when the plan says all)."""
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

    if plan.op_types is not None:
        return frozenset(plan.op_types)
    return frozenset(IntegerOpsRegistry if mode == "dynamic" else QDQRegistry)


def fp32_ops(fp32_path: Path, int8_path: Path, types: frozenset[str]) -> tuple[dict[str, int], int]:
    """({op type: nodes} of the fp32 graph's arithmetic left in fp32, quantized node count), read from the
    quantized graph (``fp32_path``: the graph the quantizer was given, after ``quant_pre_process``).

    A node is int8 when the quantizer replaced it by an integer kernel named after it (dynamic:
    ``<name>_quant``, a ``MatMulInteger``/``ConvInteger``), or, kept and of a quantized type (``types``),
    it reads every input through DequantizeLinear or from a weight (static QDQ: ORT fuses it into an integer
    kernel). Anything else computes in fp32, a node rewritten in float (dynamic turns Gemm into MatMul + Add)
    included."""
    import onnx

    before = onnx.load(os.fspath(fp32_path), load_external_data=False).graph.node
    after = onnx.load(os.fspath(int8_path), load_external_data=False).graph
    plain = {o for n in after.node if n.op_type == "DequantizeLinear" for o in n.output}
    plain |= {i.name for i in after.initializer} | {""}
    kept = {n.name: n for n in after.node}
    integer = {n.name for n in after.node if n.op_type.endswith(("Integer", "IntegerToFloat"))
               or n.op_type.startswith("QLinear") or n.op_type == "DynamicQuantizeMatMul"}
    left: Counter[str] = Counter()
    quantized = 0
    for node in before:
        if node.op_type in _LAYOUT:
            continue
        same = kept.get(node.name)
        if same is None:
            replaced = f"{node.name}_quant" in integer  # ORT names the integer kernel after the node
        else:
            replaced = same.op_type == node.op_type and node.op_type in types and plain.issuperset(same.input)
        if replaced:
            quantized += 1
        else:
            left[node.op_type] += 1
    return dict(sorted(left.items())), quantized


def _quantize_one(pre: Path, out: Path, plan: Plan, mode: str, reader: fd.Reader | None, method: str,
                  per_channel: bool, cache: Path) -> None:
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    options = {"MatMulConstBOnly": plan.const_b_only}
    if mode == "dynamic":
        quantize_dynamic(pre, out, op_types_to_quantize=plan.op_types, per_channel=per_channel,
                         weight_type=QuantType.QInt8, extra_options=options)
        return
    assert reader is not None
    reader.rewind()
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    # the histogram calibrators print their progress; the "all" plan's per-channel pass warns, on the root
    # logger, of each 1-D LayerNorm weight it quantizes per tensor instead: nothing a user can act on
    with contextlib.redirect_stdout(io.StringIO()), _root_log_level(logging.ERROR):
        quantize_static(pre, out, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=plan.op_types,
                        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calib, extra_options=options, calibration_cache_path=cache)


@contextlib.contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    root = logging.getLogger()
    before = root.level
    root.setLevel(max(level, before))
    try:
        yield
    finally:
        root.setLevel(before)


def _plans(plan: str, keep_fp32: Sequence[str] | None, present: set[str]) -> list[Plan]:
    if keep_fp32 is not None:
        keep = set(keep_fp32)
        types = tuple(sorted(present - keep - _LAYOUT))
        return [Plan("keep:" + ",".join(sorted(keep)), types, "MatMul:activations" in keep)]
    if plan == "auto":  # the widest first: its calibration covers every other plan's tensors
        return sorted(PLANS, key=lambda p: p.op_types is not None)
    return [p for p in PLANS if p.name == plan]


def quantize(fp32_onnx_path: str | os.PathLike, out_path: str | os.PathLike, *, mode: str = "dynamic",
             calibration: Iterable[Any] | None = None, method: str = "minmax", per_channel: bool = True,
             keep_fp32: Sequence[str] | None = None, plan: str = "auto", tolerance: float = DEFAULT_TOLERANCE,
             threads: int | None = None, repeats: int = 15) -> Int8Report:
    """Quantize ``fp32_onnx_path`` into ``out_path`` with ONNX Runtime and pick what stays fp32 by measurement.

    ``keep_fp32`` (op types, "MatMul:activations" for the attention products) names the fp32 ops outright;
    otherwise ``plan`` ("auto": every one of :data:`PLANS`, the fastest that agrees with fp32 on random
    inputs at ``tolerance`` wins). Raises SpecError for a bad mode/method or static mode without batches,
    LoweringError when ONNX Runtime cannot quantize or load the model."""
    import onnx

    config = Int8Config(mode=mode, method=method, per_channel=per_channel, tolerance=tolerance, plan=plan)
    fp32, out = Path(fp32_onnx_path), Path(out_path)
    name, _, fixed = fd.model_input(fp32)
    batches = fd.feeds(calibration, name, CALIBRATION_IMAGES, fixed)
    mode = config.resolved_mode(bool(batches))
    reader = fd.Reader(batches) if mode == "static" else None
    present = {n.op_type for n in onnx.load(os.fspath(fp32), load_external_data=False).graph.node}
    candidates = _plans(plan, keep_fp32, present)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vitgraph-int8-") as scratch:
        tmp = Path(scratch)
        pre = {False: _preprocess(fp32, tmp / "pre.onnx")} if not all(p.fused for p in candidates) else {}
        if any(p.fused for p in candidates):
            fused = _fused(fp32, tmp)
            if fused is not None:
                pre[True] = fused
            elif len(candidates) == 1:
                raise LoweringError(f"int8: plan {plan} fuses attention, and {fp32} has no attention site "
                                    "ONNX Runtime's MultiHeadAttention can replace (or the fused file failed "
                                    "ORT's pre-processing); use plan products or auto.")
            candidates = [p for p in candidates if p.fused in pre]
        made = {}
        for p in candidates:
            made[p.name] = tmp / f"{len(made)}.onnx"
            _try_quantize(pre[p.fused], made[p.name], p, mode, reader, method, per_channel,
                          tmp / f"calibration{'-fused' * p.fused}.json", fp32)  # fused: other tensors
        chosen, plans_ms = _choose(fp32, made, candidates, tolerance, threads, repeats)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(made[chosen], out)
        by_name = {p.name: p for p in candidates}
        left, quantized = fp32_ops(pre[by_name[chosen].fused], out, quantizable(by_name[chosen], mode))
    if not quantized:
        raise LoweringError(f"int8: ONNX Runtime quantized no node of {fp32} (plan {chosen}); the model has no "
                            "MatMul, Gemm or Conv with weights. Keep it in fp32 (--target onnx).")
    return Int8Report(str(out), mode, method if mode == "static" else None, chosen, list(left), left, quantized,
                      plans_ms, {"fp32": fp32.stat().st_size, "int8": out.stat().st_size},
                      time.perf_counter() - start, tolerance)


def _preprocess(fp32: Path, pre: Path) -> Path:
    """``quant_pre_process`` (ORT optimisation + symbolic shape inference); without symbolic shapes when that
    fails, as it does on some exported control flow."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(fp32, pre)
    except Exception:  # noqa: BLE001 - retry without the symbolic pass, then report
        try:
            quant_pre_process(fp32, pre, skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001
            raise LoweringError(f"int8: ONNX Runtime cannot pre-process {fp32} for quantization: "
                                f"{describe_failure(exc)}. Keep this model in fp32 (--target onnx), or simplify "
                                "the op named above.") from exc
    return pre


def _fused(fp32: Path, tmp: Path) -> Path | None:
    """``fp32`` with its attention sites fused (:mod:`.ort_attention`) and pre-processed, or None where no site
    fuses or the fused file cannot be pre-processed: an optimisation that does not apply leaves the other plans."""
    from vitgraph.targets.ort_attention import fuse_attention

    try:
        if not fuse_attention(fp32, tmp / "fused.onnx"):
            return None
        return _preprocess(tmp / "fused.onnx", tmp / "pre-fused.onnx")
    except Exception:  # noqa: BLE001 - e.g. a model over protobuf's 2 GB written without external data
        return None


def _try_quantize(pre: Path, out: Path, plan: Plan, mode: str, reader: fd.Reader | None, method: str,
                  per_channel: bool, cache: Path, fp32: Path) -> None:
    try:
        _quantize_one(pre, out, plan, mode, reader, method, per_channel, cache)
    except Exception as exc:  # noqa: BLE001 - ORT's quantizer raises bare errors: one readable message
        raise LoweringError(f"int8: ONNX Runtime cannot quantize {fp32} ({mode}, plan {plan.name}): "
                            f"{describe_failure(exc)}. Keep the failing op types in fp32 (keep_fp32=...), "
                            "try the other mode, or deploy the fp32 file (--target onnx).") from exc


def _choose(fp32: Path, made: dict[str, Path], plans: list[Plan], tolerance: float, threads: int | None,
            repeats: int) -> tuple[str, dict[str, float]]:
    """The fastest plan whose top-1 agrees with fp32 on random inputs at ``tolerance`` (decisive rows, see
    :func:`decisive_agreement`; else the most agreeing plan, which the caller's check may reject); one plan
    is taken as it is."""
    from vitgraph.targets import onnx as onnx_target
    from vitgraph.targets._timing import measure

    threads = threads or torch.get_num_threads()
    sessions = {}
    for p in plans:
        try:
            sessions[p.name] = onnx_target.session(made[p.name], threads=threads)
        except LoweringError as exc:
            raise LoweringError(f"int8: ONNX Runtime quantized {fp32} (plan {p.name}) into a file it cannot "
                                f"run: {exc}. Keep that plan's ops in fp32 or deploy fp32 (--target onnx).") from exc
    if len(plans) == 1:
        return plans[0].name, {}
    feeds = random_feeds(fp32)
    reference = fd.logits(onnx_target.session(fp32, threads=threads), feeds)
    agree = {n: decisive_agreement(reference, fd.logits(s, feeds))[0] for n, s in sessions.items()}
    one = {k: v[:1] for k, v in feeds[0].items()}
    timing = measure({n: (lambda s=s: s.run(None, one)) for n, s in sessions.items()}, repeats=repeats)
    plans_ms = {n: round(t.median_ms, 4) for n, t in timing.items()}
    good = [p.name for p in PLANS if p.name in sessions and agree[p.name] >= tolerance]  # fewest ops first
    if not good:
        return max(agree, key=agree.__getitem__), plans_ms
    fastest = min(plans_ms[n] for n in good)
    # within the timing noise of the fastest, the plan that quantizes least (earliest in PLANS) wins
    return next(n for n in good if plans_ms[n] <= fastest * (1 + TIE)), plans_ms


def lower_int8(module: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike, *,
               data_batches: Iterable[Any] | None = None, calibration: Iterable[Any] | None = None,
               config: Int8Config = Int8Config(), fp32_path: str | os.PathLike | None = None,
               threads: int | None = None, name: str | None = None) -> Int8Report:
    """Export ``module`` to fp32 ONNX (checked against eager), quantize it to ``path`` and check the int8 model.

    ``data_batches`` ((inputs, labels) pairs or inputs) are where agreement, max logit error and top-1 are
    measured, else seeded random inputs; ``calibration`` feeds static mode (default: ``data_batches``).
    ``fp32_path`` keeps the fp32 file (else a temporary one). Raises :class:`AgreementError`, and writes
    nothing at ``path``, when top-1 agreement with fp32 is below ``config.tolerance``."""
    from vitgraph.targets import onnx as onnx_target

    name = model_name(module, name)
    example = check_example_inputs(example_inputs, "onnx-int8")
    data = list(data_batches) if data_batches is not None else None
    calib = list(calibration) if calibration is not None else data
    mode = config.resolved_mode(bool(calib))  # before the export: a bad request fails fast
    with tempfile.TemporaryDirectory(prefix="vitgraph-int8-") as scratch:
        fp32 = Path(fp32_path) if fp32_path is not None else Path(scratch) / "fp32.onnx"
        onnx_target.lower(module, example, fp32, check_batches=(1,), name=name)
        staged = Path(scratch) / "int8.onnx"  # moved to ``path`` only once it agrees
        report = quantize(fp32, staged, mode=mode, calibration=calib if mode == "static" else None,
                          method=config.method, per_channel=config.per_channel, keep_fp32=config.keep_fp32,
                          plan=config.plan, tolerance=config.tolerance, threads=threads)
        check(report, fp32, data, threads=threads, name=name, where=Path(path))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staged, path)
    report.path = str(path)
    return report


def check(report: Int8Report, fp32: Path, data: list[Any] | None, *, threads: int | None = None,
          name: str = "model", repeats: int = 20, where: Path | None = None, images: int = fd.CHECK_IMAGES
          ) -> Int8Report:
    """Fill ``report``'s agreement, max abs logit error, top-1 (with labels) and batch-1 latency (fp32 and
    int8 timed interleaved); raise :class:`AgreementError` below the tolerance. Without data the agreement is
    checked on ``images`` random images."""
    from vitgraph.targets import onnx as onnx_target
    from vitgraph.targets._timing import measure

    threads = threads or torch.get_num_threads()
    sessions = {"fp32": onnx_target.session(fp32, threads=threads),
                "int8": onnx_target.session(report.path, threads=threads)}
    input_name, _, fixed = fd.model_input(fp32)
    feeds = fd.feeds(data, input_name, fixed=fixed) if data else random_feeds(fp32, images)
    labels = fd.labels(data) if data else None
    logits = {k: fd.logits(s, feeds) for k, s in sessions.items()}
    images = len(logits["fp32"])
    report.agreement, report.max_abs_err = agreement(logits["fp32"], logits["int8"])
    report.checked_on = f"{'validation data' if data else 'random inputs'} ({images} images)"
    judged = report.agreement
    if not data:  # noise images: near-ties everywhere; judge the images whose class is not a coin toss
        judged, decisive = decisive_agreement(logits["fp32"], logits["int8"])
        report.checked_on += (f"; judged on the {decisive} whose fp32 top-1 leads by over {DECISIVE:g}x the "
                              f"median logit error: {100 * judged:.1f} % agree")
    if labels is not None and len(labels) == images:
        report.top1 = {k: float(np.mean(v.argmax(-1) == labels)) for k, v in logits.items()}
    one = {k: v[:1] for k, v in feeds[0].items()}
    timing = measure({k: (lambda s=s: s.run(None, one)) for k, s in sessions.items()}, repeats=repeats)
    report.latency_ms = {k: round(t.median_ms, 4) for k, t in timing.items()}
    report.judged = judged
    if judged < report.tolerance:
        file = f"{where}, not written" if where is not None else report.path
        raise AgreementError(
            f"onnx-int8: the {report.mode} int8 model of {name} ({file}) agrees with fp32 on the top-1 "
            f"class of {100 * report.agreement:.1f} % of {report.checked_on}, below the tolerance "
            f"{100 * report.tolerance:.1f} % (max abs logit error {report.max_abs_err:.3g}). Fix: calibrate "
            "static mode on real data (--data), try --calibration percentile or entropy, keep more ops in fp32, "
            "or lower the tolerance (--int8-tolerance) if this agreement is acceptable.")
    return report
