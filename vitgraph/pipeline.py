"""``vg.compress``: the whole pipeline in one call — trace, instrument, train, materialize, verify.

    result = vg.compress(model, vg.Spec.load("spec.yaml"), example_inputs=(x,), data="digits")
    result.compact          # fx.GraphModule, physically smaller
    result.report           # the report.json contract
    result.save("out/")     # model.pt2, compact.pt, spec.yaml, report.json, report.md, kept.png

``quantize="int8"`` (or a ``vitgraph.targets.int8.Int8Config``) also writes ``model.int8.onnx``: static QDQ
calibrated on the training split when there is data, else dynamic, and ``report["int8"]`` with its top-1
agreement with the fp32 compact model on the validation split (random inputs without data, and it says so).
A latency budget on ``budget.target: onnx-int8`` writes the dynamic INT8 file it was measured on, unasked.

With ``out_dir`` the run builds ``out_dir.partial`` (training checkpoints in its ``train/``) and renames it to
``out_dir`` only when every artifact is written (see ``vitgraph.report.outdir``); ``resume=True`` continues a killed run.

Every result is checked: the compact graph must equal the gated graph in ``eval`` mode (the
decisions it bakes in) and land within ``budget.tolerance`` of ``budget.flops``.
"""
from __future__ import annotations


import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from vitgraph.errors import ParityError, SpecError
from vitgraph.capture.frontend import max_abs_diff
from vitgraph.gated import GatedModel, builder, instrument, materialize
from vitgraph.analysis.graph import VitGraph, block_dict, require_vit, trace
from vitgraph.report.outdir import Output, identity
from vitgraph.spec import Spec

PARITY_ATOL = 1e-4   # gated eval vs compact, fp32, relative to the output's scale


@dataclass
class Result:
    """What ``compress`` produced; ``report`` follows the report.json contract."""

    compact: fx.GraphModule
    dense: VitGraph
    compressed: VitGraph
    gated: GatedModel
    spec: Spec
    report: dict[str, Any]
    fit: Any = None
    files: dict[str, str] = field(default_factory=dict)
    int8: Any = None        # an Int8Config: write() adds model.int8.onnx and report["int8"]
    int8_data: Any = None   # (calibration batches, evaluation batches) for it, or None without data

    def save(self, out_dir: str | Path, *, pt2: bool = True) -> dict[str, str]:
        """Write the artifacts of ``vitgraph compile`` beside ``out_dir``, then rename them into place."""
        output = Output.at(out_dir)
        output.check(resume=False)
        staged = output.stage()
        self.write(staged, pt2=pt2)
        output.commit(staged)
        self.files = {k: str(output.final / Path(v).name) for k, v in self.files.items()}
        return self.files

    def write(self, folder: Path, *, pt2: bool = True) -> dict[str, str]:
        """The artifacts, straight into ``folder`` (``save`` and ``compress`` make it their staging folder)."""
        from vitgraph.report.views import write_markdown

        out = Path(folder)
        files = {}
        if pt2:
            from vitgraph.targets import export as export_target
            path = out / "model.pt2"
            lowering = export_target.lower(self.compact, self.compressed.example_inputs, path,
                                           check_batches=(1,))  # not the export's batch: the batch axis is free
            self.report["parity"]["pt2_max_abs_err"] = lowering.max_abs_err
            self.report["parity"]["max_abs_err"] = max(self.report["parity"]["max_abs_err"], lowering.max_abs_err)
            files["model.pt2"] = str(path)
        if self.int8 is not None:
            files["model.int8.onnx"] = self._write_int8(out / "model.int8.onnx")
        torch.save(self.compact, out / "compact.pt")
        files["compact.pt"] = str(out / "compact.pt")
        self.spec.save(out / "spec.yaml")
        files["spec.yaml"] = str(out / "spec.yaml")
        files.update(write_markdown(self.report, out))
        (out / "report.json").write_text(json.dumps(self.report, indent=2))  # last: the run's "done"
        files["report.json"] = str(out / "report.json")
        self.files = files
        return files

    def _write_int8(self, path: Path) -> str:
        """The compact model in INT8, checked against its fp32 ONNX; raises AgreementError below tolerance."""
        from vitgraph.targets.int8 import lower_int8

        calibration, evaluation = self.int8_data or (None, None)
        rep = lower_int8(self.compact, self.compressed.example_inputs, path, data_batches=evaluation,
                         calibration=calibration, config=self.int8, name=self.dense.name)
        self.report["int8"] = rep.to_dict()
        return str(path)


def compress(model: nn.Module, spec: Spec | dict[str, Any] | str | Path, *, example_inputs: Any = None,
             data: Any = "none", name: str | None = None, out_dir: str | Path | None = None, resume: bool = False,
             progress: bool = True, latency_targets: tuple[str, ...] = ("eager",), quantize: Any = None) -> Result:
    """Compress ``model`` as ``spec`` says. ``data``: "none", "digits", "imagefolder:PATH" or a ``Data``;
    ``quantize``: None, "int8" or an ``Int8Config`` (see the module docstring)."""
    from vitgraph.train.data import Data, load_data
    from vitgraph.train.loop import evaluate, fit

    t0 = time.perf_counter()
    spec = _as_spec(spec)
    output = Output.at(out_dir) if out_dir is not None else None
    if output is not None:  # path and checkpoint errors before the trace and the training, not after
        output.check(resume=resume, spec=spec)
    elif resume:
        raise SpecError("resume=True needs out_dir, the --out of the run to continue")
    g = _graph(model, example_inputs, name)
    require_vit(g)
    size = tuple(g.input_size)
    dataset = data if isinstance(data, Data) else load_data(str(data), size, spec.train.batch_size,
                                                             seed=spec.train.seed)
    calibration = None  # taylor scores and the joint split of the budget read it (see axes.joint)
    if dataset.train is not None:
        calibration = dataset.loader("train", shuffle=True, seed=spec.train.seed)
    _check_exits(spec, dataset)
    if quantize is None and spec.budget.latency is not None and spec.budget.target == "onnx-int8":
        from vitgraph.targets.int8 import Int8Config
        quantize = Int8Config(mode="dynamic")  # the budget was measured on dynamic INT8: deploy that file
    int8 = int8_config(quantize, dataset.train is not None)  # a bad request fails before the work
    source = None
    if output is not None:  # DIR.partial, and the checkpoint to resume from (its model and spec checked)
        trains = spec.train.steps > 0
        source = output.begin(resume=resume, identity=identity(g.name, g.gm, size, spec) if trains else None)
    latency = None
    if spec.budget.latency is not None:
        from vitgraph.cost.profile import table_for
        latency = table_for(g, spec.budget, builder(g), progress)
    gated = instrument(g, spec, calibration=calibration, val_data=dataset.val, latency=latency)

    fitted = None
    if spec.train.steps > 0:
        teacher = g.gm
        fitted = fit(gated, dataset.train, spec.train, teacher=teacher, val_data=dataset.val,
                     out_dir=output.train if output is not None else None, resume=source or False,
                     progress=progress)
    if not gated.frozen:  # learned with no steps: project the untrained (or one-shot) decisions
        gated.freeze()
    gated.eval()

    compact = materialize(gated)
    measured = None
    if latency is not None:  # check the prediction by measurement; one-shot specs are corrected by it
        from vitgraph.cost.profile import land

        build = builder(g, calibration=calibration, val_data=dataset.val, latency=latency)
        gated, compact, measured = land(g, spec, build, gated, compact, progress)
    compressed = trace(compact, gated.example_inputs(), name=f"{g.name} (compressed)")
    parity = _parity(gated, compact, g.example_inputs, gated.serving_batch)
    achieved = _achieved(g, gated, compressed, spec)
    report = _report(g, gated, compressed, spec, parity, _budget_report(spec, gated, achieved, measured))
    if dataset.val is not None:
        report["dense"]["top1"] = evaluate(g.gm, dataset.val, spec.train.batch_size)
        report["compressed"]["top1"] = evaluate(compact, dataset.val, gated.serving_batch or spec.train.batch_size)
    if fitted is not None:
        report["train"] = {"steps": fitted.steps, "seconds": fitted.seconds, "images_per_s": fitted.images_per_s,
                           "final_loss": fitted.loss}
    if latency_targets:
        report["latency_ms"] = _latency(g.gm, compact, g.example_inputs, latency_targets)
    report["seconds"] = time.perf_counter() - t0
    result = Result(compact, g, compressed, gated, spec, report, fitted, int8=int8,
                    int8_data=int8_batches(dataset) if int8 is not None else None)
    if output is not None and _rank() == 0:  # under torchrun every rank holds the same result
        result.write(output.work)
        output.commit()  # DIR appears (or is replaced) only now, complete
        result.files = {k: str(output.final / Path(v).name) for k, v in result.files.items()}
        if fitted is not None and fitted.history is not None:
            result.fit = replace(fitted, history=output.final / "train" / Path(fitted.history).name)
    return result


def int8_config(quantize: Any, has_data: bool) -> Any:
    """``quantize`` ("int8", an Int8Config or None) as an Int8Config whose mode fits the data (or None); a
    SpecError for another name, or static mode without data."""
    from vitgraph.targets.int8 import Int8Config

    if quantize is None:
        return None
    if isinstance(quantize, str):
        if quantize != "int8":
            raise SpecError(f"quantize: unknown target {quantize!r}; vitgraph quantizes to int8 only "
                            "(--quantize int8: static QDQ with --data, dynamic without)")
        quantize = Int8Config()
    return replace(quantize, mode=quantize.resolved_mode(has_data))


def int8_batches(dataset: Any, images: int = 256) -> tuple[list[Any], list[Any]] | None:
    """(calibration: up to ``images`` shuffled training images, evaluation: the validation split) in batches,
    None without data. Calibration never sees the images agreement is measured on."""
    if dataset is None or dataset.train is None:
        return None
    calibration, seen = [], 0
    for x, y in dataset.loader("train", shuffle=True, seed=0):
        calibration.append((x, y))
        seen += len(x)
        if seen >= images:
            break
    evaluation = list(dataset.loader("val")) if dataset.val is not None else None
    return calibration, evaluation


def _report(g: VitGraph, gated: GatedModel, compressed: VitGraph, spec: Spec, parity: float,
            budget: dict[str, Any]) -> dict[str, Any]:
    """report.json but top-1, training and latency: dense and compact structure, parity, budget, axes' parts."""
    report = {
        "model": g.name,
        "input_size": list(g.input_size),
        "spec": spec.to_dict(),
        "dense": {"flops": g.structure.flops, "params": g.structure.params, "top1": None},
        "compressed": {"flops": compressed.structure.flops, "params": compressed.structure.params, "top1": None},
        "blocks": [block_dict(b) for b in compressed.structure.blocks],
        "dense_blocks": [block_dict(b) for b in g.structure.blocks],
        "parity": {"max_abs_err": parity, "gated_vs_compact": parity},
        "latency_ms": {},
        "budget": budget,
        "depth": _depth_report(g, gated),
        "method": " + ".join(a.label for a in gated.axes.values()),  # e.g. "wdpruning + depth"
        "train": None,
    }
    for part in gated.report().values():  # each axis's part: kept units, gates, exits, ...
        _merge(report, part)
    return report


def _graph(model: nn.Module | VitGraph, example_inputs: Any, name: str | None) -> VitGraph:
    from vitgraph.capture.models import default_input_size

    if isinstance(model, VitGraph):
        return model
    if example_inputs is None:
        size = default_input_size(model)
        if size is None:
            raise SpecError("compress needs example_inputs: this model does not say which input size it expects")
        torch.manual_seed(0)
        example_inputs = (torch.randn(2, *size),)
    return trace(model, example_inputs, name=name)


def _check_exits(spec: Spec, dataset: Any) -> None:
    if spec.depth.exits and spec.train.steps == 0:
        raise SpecError("depth.exits adds fresh exit classifiers, which need training: set train.steps > 0 and "
                        "pass --data digits or --data imagefolder:PATH")
    if spec.depth.exits and spec.depth.exit is None and dataset.val is None:
        raise SpecError("depth.exits with no depth.exit chooses the exit by validation top-1, and there is no "
                        "validation data: pass --data, or name the exit to cut at with depth.exit")


def _achieved(g: VitGraph, gated: GatedModel, compressed: VitGraph, spec: Spec) -> float:
    """The compact model's fraction of the dense FLOPs, checked against the budget. A graph with per-image
    token counts (a serving batch) is priced at its keep targets, and its structure says so."""
    achieved = compressed.structure.flops / g.structure.flops
    if gated.serving_batch is not None:
        achieved = gated.cost()["fraction"]
        compressed.structure = replace(compressed.structure, flops=round(gated.cost()["flops"]))
    b = spec.budget
    if b.flops is None:  # a latency budget alone: the measurement decides (profile.land)
        return achieved
    # FLOPs alone land on their target; beside a latency budget they are a ceiling (both must hold)
    miss = achieved - b.flops if b.latency is not None else abs(achieved - b.flops)
    if miss > b.tolerance:
        raise SpecError(f"{g.name}: the compact model has {achieved:.3f} of the dense FLOPs, outside budget.flops "
                        f"{b.flops} +- {b.tolerance}: the allowed sites cannot reach it "
                        f"(see 'vitgraph inspect' for which sites the spec can prune)")
    return achieved


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _budget_report(spec: Spec, gated: GatedModel, achieved: float, latency: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Target and achieved FLOPs fraction (``target``: the budget's own, FLOPs or latency); when a method
    learned against the budget, also where learning stopped, and whether the final projection had to move
    the decisions to reach the budget; for a latency budget, predicted and measured latency."""
    out: dict[str, Any] = {"metric": spec.budget.metric, "target": spec.budget.fraction, "flops": spec.budget.flops,
                           "achieved": achieved, "tolerance": spec.budget.slack}
    if latency is not None:
        out["latency"] = latency
    if gated.serving_batch is not None:
        out["per_image"] = "FLOPs vary per image (dynamic token counts); achieved is the cost at the keep targets"
    if gated.budget is not None and gated.learned is not None:
        out["learned"] = gated.learned
        out["projected"] = abs(gated.learned - float(gated.pricer("eval"))) > 1e-6
    return out


def _depth_report(g: VitGraph, gated: GatedModel) -> dict[str, Any]:
    """Blocks before and after; the axes that remove blocks add what they skipped, cut and why."""
    names = {b.index: b.name for b in g.structure.blocks}
    removed = gated.removed_blocks()
    return {"blocks": {"dense": len(names), "compressed": len(names) - len(removed)},
            "removed_blocks": [names[i] for i in removed], "skipped_branches": [], "not_skippable": {}}


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    """``part`` into ``into``, dictionaries merged key by key."""
    for k, v in part.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _as_spec(spec: Spec | dict[str, Any] | str | Path) -> Spec:
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, dict):
        return Spec.from_dict(spec)
    return Spec.load(spec)


def _parity(gated: GatedModel, compact: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...],
            batch: int | None = None) -> float:
    """Max abs error, compact vs the gated graph in eval mode, on the example and on a fresh input of another
    batch size (one image, or two for an example of one), or in slices of ``batch`` images for a compact
    graph that serves that batch only. A 1024-px encoder spends seconds per image: each is run once."""
    gen = torch.Generator().manual_seed(1)
    other = batch or (2 if example_inputs[0].shape[0] == 1 else 1)
    fresh = tuple(torch.randn(other, *x.shape[1:], generator=gen, dtype=x.dtype) for x in example_inputs)
    err, scale = 0.0, 0.0
    with torch.no_grad(), gated.using("eval"):
        for whole in (example_inputs, fresh):
            step = batch or whole[0].shape[0]
            for i in range(0, whole[0].shape[0], step):
                inputs = tuple(x[i:i + step] for x in whole)
                expected = gated(*inputs)
                err = max(err, max_abs_diff(compact(*inputs), expected))
                scale = max(scale, float(expected.abs().max()))
    if err > PARITY_ATOL * max(1.0, scale):
        raise ParityError(f"materialize: the compact graph differs from the gated graph by {err:.2e} "
                          f"(allowed {PARITY_ATOL:.0e} x output scale {scale:.2f}); please report this model")
    return err


def _latency(dense: nn.Module, compact: nn.Module, example_inputs: tuple[torch.Tensor, ...],
             targets: tuple[str, ...], batch: int = 1, repeats: int = 10) -> dict[str, dict[str, float]]:
    """Median latency (ms) of dense and compact, measured interleaved, per target."""
    from vitgraph.targets import bench

    out = {}
    for target in targets:
        runners = {}
        for label, module in (("dense", dense), ("compressed", compact)):
            runners[label] = bench.runners(module, tuple(x[:1] for x in example_inputs), batch=batch,
                                           targets=(target,), name=f"{label}")[target]
        timings = bench.measure(runners, repeats=repeats, max_time=30.0)  # a 1024-px encoder: a few runs
        out[target] = {k: round(v.median_ms, 3) for k, v in timings.items()}
        out[target]["batch"] = batch
    return out
