"""The output folder of ``vitgraph compile``: built beside itself, renamed into place when complete.

    DIR.partial/train/      checkpoint.pt, metrics.jsonl, run.json (which model and spec the run is for)
    DIR.partial/...         then model.pt2, model.int8.onnx (--quantize int8), compact.pt, spec.yaml,
                            report.json, report.md, kept.png
    DIR/                    appears, or replaces an earlier DIR, only by the final rename

Invariant: a ``DIR/report.json`` belongs to a finished run. A killed run leaves ``DIR.partial`` (and any
earlier ``DIR`` untouched); ``--resume`` continues from ``DIR.partial/train/checkpoint.pt``, or from the
``DIR/train`` of a finished run, copied into ``DIR.partial`` first so that ``DIR`` stays whole until the new
one is. An earlier ``DIR`` holding only compile's artifacts is replaced whole; one with other files (or
the working folder) keeps them, and the artifacts move in with report.json last. Path problems are found by
:meth:`Output.check` before any tracing or training.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitgraph.errors import VitgraphError

PARTIAL = ".partial"
CHECKPOINT = "checkpoint.pt"   # as vitgraph.train.loop writes it
RUN = "run.json"
# what compile writes: a DIR holding nothing else is replaced whole; any other DIR gets the artifacts moved in
ARTIFACTS = frozenset({"model.pt2", "model.int8.onnx", "compact.pt", "spec.yaml", "report.json", "report.md",
                       "train"})
# settings a resumed run may change: they do not alter the trajectory of the steps already taken
FREE_TRAIN_KEYS = ("steps", "checkpoint_every", "log_every")


class OutputError(VitgraphError):
    """An ``--out`` folder that cannot be written, or a run there that cannot be resumed."""


@dataclass(frozen=True)
class Output:
    """``final`` is the absolute ``--out``; ``work`` the ``DIR.partial`` beside it; ``train`` the checkpoints."""

    final: Path

    @classmethod
    def at(cls, path: str | Path) -> Output:
        return cls(Path(os.path.abspath(path)))  # "." has a name and a parent to build beside

    @property
    def work(self) -> Path:
        return self.final.with_name(self.final.name + PARTIAL)

    @property
    def train(self) -> Path:
        return self.work / "train"

    def check(self, *, resume: bool, spec: Any = None) -> None:
        """Raises :class:`OutputError` for ``--out`` naming a file, a folder that cannot be written, and with
        ``resume``: no checkpoint, a damaged one, or one whose run compressed with another ``spec``."""
        final = self.final
        if final == final.parent:
            raise OutputError(f"--out {final} is the root folder, which compile cannot build beside and rename; "
                              f"name a folder for the artifacts.")
        if final.exists() and not final.is_dir():
            raise OutputError(f"--out {final} is a file; compile writes a folder of artifacts there. Name a new "
                              f"or existing folder instead.")
        parent = next(p for p in final.parents if p.exists())
        if not parent.is_dir():
            raise OutputError(f"--out {final}: {parent} is a file, so no folder can be made below it; name an "
                              f"--out in a folder.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"--out {final}: cannot write in {parent} (compile builds {self.work.name} there "
                              f"and renames it to {final.name} when complete); make {parent} writable or name "
                              f"an --out in a folder you can write.")
        if not resume:
            return
        if spec is not None and spec.train.steps == 0:
            raise OutputError("--resume continues a training run, and this spec trains no steps (train.steps: "
                              "0); drop --resume, or set train.steps to the run's total.")
        ckpt = self.checkpoint()
        if not zipfile.is_zipfile(ckpt):  # the end of the file is the zip directory: truncation loses it
            raise OutputError(f"cannot resume: {ckpt} is truncated or damaged (checkpoints are written whole, "
                              f"so it was cut or changed afterwards); delete {ckpt.parent} and drop --resume to "
                              f"start over.")
        if spec is not None:
            _compare(ckpt.parent, {"spec": resumable(spec)})

    def checkpoint(self) -> Path:
        """The checkpoint ``--resume`` continues from: an interrupted run's, else a finished run's."""
        for folder in (self.train, self.final / "train"):
            if (folder / CHECKPOINT).is_file():
                return folder / CHECKPOINT
        raise OutputError(f"cannot resume: there is no checkpoint at {self.train / CHECKPOINT} (an interrupted "
                          f"run) nor at {self.final / 'train' / CHECKPOINT} (a finished one); drop --resume to "
                          f"start a new run, or name the --out of the run to continue.")

    def begin(self, *, resume: bool, identity: dict[str, Any] | None) -> Path | None:
        """Prepare ``DIR.partial`` (rank 0 only); returns the checkpoint to resume from, None for a fresh run.

        ``identity`` (see :func:`identity`; None when nothing trains) must match the resumed run's."""
        source = None
        if resume:
            source = self.checkpoint()
            if identity is not None:
                _compare(source.parent, identity)
        if _rank() != 0:
            return source
        if source is None:
            shutil.rmtree(self.work, ignore_errors=True)  # a stale interrupted run: this one starts over
            self.work.mkdir(parents=True)
            if identity is not None:
                self.train.mkdir()
                _write_json(self.train / RUN, identity)
            return source
        self.work.mkdir(parents=True, exist_ok=True)
        if source.parent != self.train:  # a finished run's: copied whole, then renamed, so DIR stays intact
            copy = self.work / ".train-copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(source.parent, copy)
            os.replace(copy, self.train)
        for stale in self.train.glob(".*.tmp"):  # a checkpoint write the kill interrupted
            stale.unlink()
        return source

    def commit(self, folder: Path | None = None) -> None:
        """``folder`` (default ``DIR.partial``) becomes ``DIR``; an earlier ``DIR`` is set aside, then deleted.
        A ``DIR`` holding files compile did not write keeps them: the artifacts move in, report.json last."""
        folder, final = folder or self.work, self.final
        if not final.exists():
            os.rename(folder, final)
        elif self._replaceable():
            aside = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, aside)
            os.rename(folder, final)
            for old in final.parent.glob(f".{final.name}.old-*"):  # this one, and any a kill left between renames
                shutil.rmtree(old, ignore_errors=True)
        else:
            (final / "report.json").unlink(missing_ok=True)  # until the last move, no report.json claims DIR
            for entry in sorted(folder.iterdir(), key=lambda p: p.name == "report.json"):
                target = final / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                shutil.move(str(entry), str(target))
            folder.rmdir()

    def _replaceable(self) -> bool:
        """``DIR`` holds only what compile writes, and is no link and not the working folder (or above it)."""
        final = self.final
        try:
            here = Path.cwd()
        except OSError:
            here = None
        if final.is_symlink() or (here is not None and (here == final or final in here.parents)):
            return False
        return all(p.name in ARTIFACTS or p.suffix == ".png" for p in final.iterdir())

    def stage(self) -> Path:
        """A fresh private folder beside ``DIR`` for :meth:`commit` (``Result.save`` outside ``compress``)."""
        folder = self.final.with_name(f".{self.final.name}.saving-{os.getpid()}")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder


def identity(model_name: str, gm: torch.nn.Module, input_size: Any, spec: Any) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the dense model (name, size, a digest of its
    weights, which are the teacher) and the spec, less the settings a resume may change."""
    digest = hashlib.blake2b(digest_size=8)
    state = gm.state_dict()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    params = sum(p.numel() for p in gm.parameters())
    return {"model": {"name": model_name, "input_size": list(input_size), "params": params,
                      "weights": digest.hexdigest()},
            "spec": resumable(spec)}


def resumable(spec: Any) -> dict[str, Any]:
    d = json.loads(json.dumps(spec.to_dict()))  # as run.json reads back: lists, string keys
    d["train"] = {k: v for k, v in d["train"].items() if k not in FREE_TRAIN_KEYS}
    return d


def _compare(folder: Path, ours: dict[str, Any]) -> None:
    """Raises when ``folder``'s run.json names another model or spec than ``ours`` (no run.json: nothing to
    compare, the checkpoint's own checks still apply)."""
    path = folder / RUN
    if not path.is_file():
        return
    try:
        theirs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot resume: {path} is damaged ({exc}); delete {folder} and drop --resume to "
                          f"start over.") from None
    if "model" in ours and theirs.get("model") != ours["model"]:
        raise OutputError(f"cannot resume: {folder} holds a run of {_model(theirs.get('model'))}, and this run "
                          f"compresses {_model(ours['model'])}; resume with the model and weights of that run "
                          f"(a model built without --checkpoint or --pretrained gets new random weights each "
                          f"time), or drop --resume to start over.")
    differ = _differences(theirs.get("spec") or {}, ours["spec"])
    if differ:
        raise OutputError(f"cannot resume: {folder} holds a run of another spec ({'; '.join(differ[:4])}); "
                          f"resume with that run's spec (only train.steps, checkpoint_every and log_every may "
                          f"change), or drop --resume to start over.")


def _model(m: Any) -> str:
    if not isinstance(m, dict):
        return "an unknown model"
    size = "x".join(str(s) for s in m.get("input_size", []))
    return f"{m.get('name')} ({m.get('params'):,} params, input {size}, weights {m.get('weights')})"


def _differences(theirs: dict[str, Any], ours: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(theirs) | set(ours), key=str):
        a, b = theirs.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} here")
    return out


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _rank() -> int:
    rank = os.environ.get("RANK")  # torchrun's, before the process group is up
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(rank) if rank is not None else 0
