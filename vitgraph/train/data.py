"""Training and validation data by name: ``digits``, ``imagefolder:PATH`` or ``none``.

Invariant: the same source, input size and seed give the same split and the same samples on every
run — the train/val split is a seeded stratified permutation fixed at load time, and every sample
comes out with the model's ``C x H x W`` (grey and RGB are converted to the model's channels)::

    data = load_data("digits", (1, 16, 16), batch_size=64)
    data.train[0][0].shape        # torch.Size([1, 16, 16])
    loader = data.loader("val")   # a plain DataLoader, for code that wants one
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from vitgraph.errors import DataError, first_line

SOURCES = ("digits", "imagefolder:PATH", "none")
_LAYOUT = "PATH/<class>/<image> (or PATH/train/<class>/<image> with PATH/val/<class>/<image>)"
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights: RGB -> grey


@dataclass(frozen=True)
class Data:
    """Datasets of ``(image, label)`` pairs; ``None`` where a source has no such split."""

    train: Dataset | None
    val: Dataset | None
    num_classes: int | None
    source: str
    batch_size: int = 64
    num_workers: int = 0

    def loader(self, split: str = "train", *, shuffle: bool | None = None, seed: int = 0) -> DataLoader:
        """A DataLoader over ``split`` ("train" shuffles with ``seed`` and drops the last partial batch)."""
        if split not in ("train", "val"):
            raise DataError(f"Data.loader: split must be 'train' or 'val', got {split!r}")
        dataset = self.train if split == "train" else self.val
        if dataset is None:
            raise DataError(f"data source {self.source!r} has no {split} split; "
                            f"use --data digits or --data imagefolder:PATH")
        train = split == "train"
        return make_loader(dataset, self.batch_size, shuffle=train if shuffle is None else shuffle, seed=seed,
                           num_workers=self.num_workers, drop_last=train)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader whose shuffling is seeded (the same order on every run)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0)


def load_data(source: str, input_size: tuple[int, int, int], batch_size: int, *, seed: int = 0,
              num_workers: int = 0) -> Data:
    """Resolve a ``--data`` source into train/val datasets shaped for a model taking ``input_size``."""
    if len(input_size) != 3 or min(input_size) < 1:
        raise DataError(f"input_size must be (C, H, W) with positive entries, got {input_size}")
    if batch_size < 1 or num_workers < 0:
        raise DataError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    c, h, w = (int(v) for v in input_size)
    if source == "none":
        return Data(None, None, None, "none", batch_size, num_workers)
    if source == "digits":
        train, val = _digits((c, h, w), seed)
        return Data(train, val, 10, source, batch_size, num_workers)
    check_source(source)
    train, val, classes = _imagefolder(source.split(":", 1)[1], (c, h, w), seed)
    return Data(train, val, classes, source, batch_size, num_workers)


def check_source(source: str) -> None:
    """DataError unless ``source`` names a data source that exists; cheap, so callers check before the work."""
    if source in ("none", "digits"):
        return
    if source.startswith("imagefolder:") and source != "imagefolder:":
        root = Path(source.split(":", 1)[1]).expanduser()
        if not root.is_dir():
            raise DataError(f"{source}: no such directory {root}; expected images laid out as {_LAYOUT}")
        return
    raise DataError(f"unknown data source {source!r}; accepted: {', '.join(SOURCES)} "
                    f"(imagefolder expects {_LAYOUT})")


def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a train/val split that keeps each class's share; the same for the same labels and seed."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    generator = torch.Generator().manual_seed(seed)
    train: list[int] = []
    val: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        order = torch.randperm(len(members), generator=generator).tolist()
        n_val = round(len(members) * val_fraction)
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    return sorted(train), sorted(val)


# -- digits -----------------------------------------------------------------------------------------------

def _digits(size: tuple[int, int, int], seed: int) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), as tensors of the model's size."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("--data digits needs scikit-learn: pip install 'vitgraph[data]' "
                        "(or use --data imagefolder:PATH)") from None
    c, h, w = size
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    labels = torch.tensor(digits.target, dtype=torch.long)
    images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    images = ((images - 0.5) / 0.5).expand(-1, c, -1, -1).contiguous()
    train, val = stratified_split(labels.tolist(), 0.2, seed)
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


# -- image folders (timm's reader and transforms) ---------------------------------------------------------

class ToChannels:
    """Turns timm's 3-channel image tensors into the model's channel count (picklable for workers)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.channels:
            return x
        if self.channels == 1 and x.shape[0] == 3:
            return (x * torch.tensor(_LUMA, dtype=x.dtype).view(3, 1, 1)).sum(0, keepdim=True)
        return x.mean(0, keepdim=True).expand(self.channels, -1, -1).contiguous()


def _imagefolder(path: str, size: tuple[int, int, int], seed: int) -> tuple[Dataset, Dataset | None, int]:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder:{path}: no such directory; expected images laid out as {_LAYOUT}")
    train_root, val_root = root, None
    if (root / "train").is_dir():
        train_root = root / "train"
        val_root = next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)
    train_tf, val_tf = _transforms(size)
    train_set = _folder(train_root, train_tf, None, path)
    class_to_idx = train_set.reader.class_to_idx
    if val_root is not None:
        extra = sorted(d.name for d in val_root.iterdir() if d.is_dir() and d.name not in class_to_idx)
        if extra:  # timm would drop their images silently, and an all-unknown val split reads as "no images"
            raise DataError(f"imagefolder:{path}: {val_root} has classes the training folder lacks: "
                            f"{', '.join(extra[:5])}{'...' if len(extra) > 5 else ''}; add their training images "
                            f"under {train_root}/<class>/ or remove them from {val_root.name}/")
        return train_set, _folder(val_root, val_tf, class_to_idx, path), len(class_to_idx)
    labels = [target for _, target in train_set.reader.samples]
    train_idx, val_idx = stratified_split(labels, 0.1, seed)
    val_set = _folder(train_root, val_tf, class_to_idx, path)
    val = Subset(val_set, val_idx) if val_idx else None
    return Subset(train_set, train_idx), val, len(class_to_idx)


def _transforms(size: tuple[int, int, int]) -> tuple[object, object]:
    from timm.data import create_transform
    from torchvision import transforms

    c, h, w = size
    adapt = ToChannels(c)
    train = create_transform((3, h, w), is_training=True)
    val = create_transform((3, h, w), is_training=False)
    return transforms.Compose([train, adapt]), transforms.Compose([val, adapt])


class ImageFiles(Dataset):
    """The images a timm folder reader found, decoded as RGB and transformed. A file that cannot be decoded is a
    DataError naming it: timm's own dataset would log it and hand the next image in its place."""

    def __init__(self, reader: object, transform: object, source: str) -> None:
        self.reader = reader
        self.transform = transform
        self.source = source

    def __len__(self) -> int:
        return len(self.reader.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        file, target = self.reader.samples[index]
        return self.transform(read_image(file, self.source)), int(target)


def read_image(file: str | Path, source: str = "imagefolder") -> object:
    """``file`` decoded as an RGB PIL image; DataError naming the file when it is not a readable image."""
    from PIL import Image

    try:
        with Image.open(file) as image:
            return image.convert("RGB")  # decodes the pixels, so a truncated file fails here, not later
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{source}: cannot read the image {file} ({first_line(e)}); remove or replace that file "
                        "(it is truncated, corrupt or not an image)") from None


def _folder(root: Path, transform: object, class_to_idx: dict[str, int] | None, path: str) -> Dataset:
    from timm.data import create_dataset

    try:
        dataset = create_dataset("", root=str(root), split="train", search_split=False, class_map=class_to_idx,
                                 is_training=class_to_idx is None)
    except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
        raise DataError(f"imagefolder:{path}: no images under {root} ({e}); expected {_LAYOUT}") from None
    if "" in dataset.reader.class_to_idx:
        raise DataError(f"imagefolder:{path}: images lie directly in {root}; put each class in its own folder: "
                        f"{_LAYOUT}")
    if not dataset.reader.samples:
        raise DataError(f"imagefolder:{path}: no images under {root}; expected {_LAYOUT}")
    read_image(dataset.reader.samples[0][0], f"imagefolder:{path}")  # fail now on a folder of non-images
    return ImageFiles(dataset.reader, transform, f"imagefolder:{path}")
