"""The state a training run resumes from: the order of its batches and its checkpoints.

Batches are a seeded permutation per epoch, indexed by the step (each rank takes its slice), with a
per-sample seed for random augmentation; checkpoints hold every other piece of state (down to the loss
window not yet logged) and are written atomically. Together they make ``fit(..., resume=True)`` bit-for-bit
equal to an uninterrupted run, parameters and metrics.jsonl alike.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from vitgraph.errors import SpecError, VitgraphError, first_line
from vitgraph.spec import Train

FORMAT = 1


# -- processes ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _World:
    rank: int = 0
    size: int = 1
    distributed: bool = False

    @classmethod
    def current(cls) -> _World:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), True)
        return cls()

    @classmethod
    def setup(cls) -> _World:
        """Joins the process group torchrun describes (WORLD_SIZE > 1) unless one is already up."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
        return cls.current()




# -- data order --------------------------------------------------------------------------------------------

class _Batches:
    """Step -> this rank's sample indices: a seeded permutation per epoch, cut into global batches."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, world: _World) -> None:
        self.n, self.batch_size, self.seed, self.world = len(dataset), batch_size, seed, world
        self.steps_per_epoch = self.n // (batch_size * world.size)
        if self.steps_per_epoch == 0:
            raise SpecError(f"the training set has {self.n} images, fewer than one batch of {batch_size} x "
                            f"{world.size} process(es); lower train.batch_size or use more data")
        self._epoch: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def fingerprint(self) -> dict[str, int]:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed, "world_size": self.world.size}

    def indices(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            perm = torch.randperm(self.n, generator=g)
            self._epoch = (epoch, perm, torch.randint(0, 2**62, (self.n,), generator=g))  # per-sample aug seeds
        start = (pos * self.world.size + self.world.rank) * self.batch_size
        return self._epoch[1][start:start + self.batch_size], self._epoch[2][start:start + self.batch_size]


class _StepSampler:
    def __init__(self, batches: _Batches, start: int, end: int) -> None:
        self.batches, self.start, self.end = batches, start, end

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            index, seeds = self.batches.indices(step)
            yield list(zip(index.tolist(), seeds.tolist()))

    def __len__(self) -> int:
        return self.end - self.start


class _Seeded(Dataset):
    """Runs a sample's random augmentation from its own seed, so it does not depend on workers or resumes."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        py, npy = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _batches(dataset: Dataset, order: _Batches, start: int, end: int, num_workers: int,
             device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(dataset, TensorDataset):  # in memory: index the tensors, no per-sample Python
        x_all, y_all = dataset.tensors[0], dataset.tensors[1]
        for step in range(start, end):
            index, _ = order.indices(step)
            yield x_all[index].to(device, non_blocking=True), y_all[index].to(device, non_blocking=True)
        return
    # its own generator: creating the iterator must not draw from the global RNG (resumes would drift)
    loader = DataLoader(_Seeded(dataset), batch_sampler=_StepSampler(order, start, end), num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(order.seed))
    for x, y in loader:
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)


# -- checkpoints -------------------------------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _save(path: Path, state: dict[str, Any]) -> None:
    """Write-then-rename in the same folder: a crash leaves the previous checkpoint, never half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise VitgraphError(f"cannot resume: {path} does not exist; start without resume (drop --resume) or "
                            f"point out_dir at the folder of the run to continue")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise VitgraphError(f"cannot resume: {path} is not a readable vitgraph checkpoint ({first_line(e)}); it "
                            f"is truncated or damaged: delete it and start without resume") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise VitgraphError(f"cannot resume: {path} is not a vitgraph checkpoint of format {FORMAT}")
    return state


def _restore_model(model: nn.Module, saved: dict[str, torch.Tensor], frozen: bool, freeze: Any, path: Path) -> None:
    def check(own: dict[str, torch.Tensor], strict: bool) -> None:
        missing = [k for k in own if k not in saved]
        extra = [k for k in saved if k not in own] if strict else []
        shape = [k for k in own if k in saved and own[k].shape != saved[k].shape]
        if missing or extra or shape:
            what = (f"{len(missing)} missing (first {missing[0]!r})" if missing else
                    f"{len(extra)} unexpected (first {extra[0]!r})" if extra else
                    f"{shape[0]!r} is {tuple(saved[shape[0]].shape)} there, {tuple(own[shape[0]].shape)} here")
            raise VitgraphError(f"cannot resume: {path} was written for a different model: state entries {what}; "
                                f"resume with the model of that run, or start fresh in another out_dir")

    check(dict(model.named_parameters()), strict=False)
    if frozen:  # freeze() may compute decisions from the arch parameters, and may add buffers
        model.load_state_dict(saved, strict=False)
        freeze()
    check(model.state_dict(), strict=True)
    model.load_state_dict(saved)


def _changed_settings(saved: dict[str, Any] | None, cfg: Train) -> list[str]:
    """``train.KEY: saved there, cfg here`` for each setting that changes the steps already taken."""
    if not isinstance(saved, dict):
        return []
    ours = json.loads(json.dumps(dataclasses.asdict(cfg)))
    saved = json.loads(json.dumps(saved))
    free = ("steps", "checkpoint_every", "log_every")
    return [f"train.{k}: {saved.get(k)!r} there, {ours[k]!r} here" for k in ours if k not in free and
            saved.get(k) != ours[k]]


# -- logging -----------------------------------------------------------------------------------------------

class _Metrics:
    """metrics.jsonl on rank 0; a resumed run first drops lines past its checkpoint (they will be redone)."""

    def __init__(self, path: Path | None, start: int, resume: bool) -> None:
        self.path = path
        if path is None:
            return
        kept = []
        if resume and path.is_file():
            kept = [line for line in path.read_text().splitlines() if _step(line) <= start]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _step(line: str) -> float:
    """A metrics line's step; a line the kill cut short counts as past every checkpoint (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class _Window:
    """Loss terms and images since the last log line, averaged over steps (and ranks)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.images, self.t = 0, 0, time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], images: int) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.double()
        self.steps, self.images = self.steps + 1, self.images + images

    def state(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "steps": self.steps, "images": self.images}

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.steps, self.images = state["steps"], state["images"]

    def flush(self, world: _World) -> tuple[dict[str, float], float]:
        names = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in names]) / max(self.steps, 1)
        if world.distributed:
            torch.distributed.all_reduce(values)
            values /= world.size
        seconds = time.perf_counter() - self.t
        rate = self.images / seconds if seconds > 0 else 0.0
        self.__init__()
        return dict(zip(names, values.tolist())), rate
