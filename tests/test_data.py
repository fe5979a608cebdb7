"""Data sources: digits (bundled), imagefolder (timm's reader and transforms), none, and the errors."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from vitgraph.train.data import Data, ToChannels, load_data, stratified_split
from vitgraph.errors import DataError, VitgraphError


def test_digits_shapes_and_split() -> None:
    data = load_data("digits", (1, 16, 16), batch_size=32)
    assert data.num_classes == 10 and data.source == "digits"
    x, y = data.train.tensors
    xv, yv = data.val.tensors
    assert x.shape[1:] == (1, 16, 16) and xv.shape[1:] == (1, 16, 16)
    assert len(x) + len(xv) == 1797 and abs(len(xv) - 0.2 * 1797) < 10
    assert x.dtype == torch.float32 and y.dtype == torch.long
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9  # normalised, not blank
    # stratified: every class holds about a fifth of its images in val
    counts, val_counts = Counter((y.tolist() + yv.tolist())), Counter(yv.tolist())
    assert all(abs(val_counts[c] - 0.2 * counts[c]) <= 1 for c in range(10))


def test_digits_split_is_deterministic_and_seeded() -> None:
    a = load_data("digits", (1, 8, 8), batch_size=8)
    b = load_data("digits", (1, 8, 8), batch_size=8)
    c = load_data("digits", (1, 8, 8), batch_size=8, seed=1)
    assert all(torch.equal(s, t) for s, t in zip(a.train.tensors + a.val.tensors, b.train.tensors + b.val.tensors))
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])


def test_digits_channels_replicated() -> None:
    data = load_data("digits", (3, 12, 10), batch_size=8)
    x = data.train.tensors[0]
    assert x.shape[1:] == (3, 12, 10)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def test_loader_helper() -> None:
    data = load_data("digits", (1, 16, 16), batch_size=50)
    xb, yb = next(iter(data.loader("train")))
    assert xb.shape == (50, 1, 16, 16) and yb.shape == (50,)
    assert len(data.loader("train")) == len(data.train) // 50  # drop_last for training
    assert len(data.loader("val")) == -(-len(data.val) // 50)


def test_none_and_unknown_sources() -> None:
    none = load_data("none", (3, 32, 32), batch_size=4)
    assert none == Data(None, None, None, "none", 4, 0)
    with pytest.raises(DataError, match="no train split"):
        none.loader("train")
    with pytest.raises(DataError, match="digits.*imagefolder:PATH.*none"):
        load_data("cifar10", (3, 32, 32), batch_size=4)
    assert issubclass(DataError, VitgraphError)


def _write_images(root: Path, classes: dict[str, int], size: int = 20) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for name, n in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            img = Image.fromarray(pixels)
            (img.convert("L") if i % 3 == 0 else img).save(root / name / f"{i}.png")  # grey files too


def test_imagefolder_split_and_channels(tmp_path: Path) -> None:
    _write_images(tmp_path, {"cat": 10, "dog": 10})
    data = load_data(f"imagefolder:{tmp_path}", (1, 16, 16), batch_size=4)
    assert data.num_classes == 2
    assert len(data.train) == 18 and len(data.val) == 2
    x, y = data.val[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and y in (0, 1)
    assert sorted(data.val[i][1] for i in range(2)) == [0, 1]  # one per class: stratified
    x3, _ = load_data(f"imagefolder:{tmp_path}", (3, 16, 16), batch_size=4).train[0]
    assert x3.shape == (3, 16, 16)
    again = load_data(f"imagefolder:{tmp_path}", (1, 16, 16), batch_size=4)
    assert torch.equal(data.val[0][0], again.val[0][0])  # deterministic split, deterministic val transform
    xb, yb = next(iter(data.loader("train")))
    assert xb.shape == (4, 1, 16, 16) and yb.shape == (4,)


def test_imagefolder_train_val_folders(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 4, "b": 5})
    _write_images(tmp_path / "validation", {"a": 2, "b": 1})
    data = load_data(f"imagefolder:{tmp_path}", (3, 16, 16), batch_size=2)
    assert len(data.train) == 9 and len(data.val) == 3 and data.num_classes == 2
    assert sorted(data.val[i][1] for i in range(3)) == [0, 0, 1]
    _write_images(tmp_path / "only" / "train", {"a": 10, "b": 10})  # train/ alone: split 90/10
    only = load_data(f"imagefolder:{tmp_path / 'only'}", (3, 16, 16), batch_size=2)
    assert len(only.train) == 18 and len(only.val) == 2


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no such directory.*<class>/<image>"):
        load_data(f"imagefolder:{tmp_path / 'missing'}", (3, 16, 16), batch_size=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images.*<class>/<image>"):
        load_data(f"imagefolder:{tmp_path / 'empty'}", (3, 16, 16), batch_size=2)
    flat = tmp_path / "flat"
    _write_images(flat, {"": 2})
    with pytest.raises(DataError, match="its own folder"):
        load_data(f"imagefolder:{flat}", (3, 16, 16), batch_size=2)


def test_to_channels() -> None:
    rgb = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 0.0), torch.full((2, 2), 0.0)])
    grey = ToChannels(1)(rgb)
    assert grey.shape == (1, 2, 2) and torch.allclose(grey, torch.full((1, 2, 2), 0.299))
    assert ToChannels(3)(rgb) is rgb


def test_stratified_split_covers_everything_once() -> None:
    labels = [0] * 7 + [1] * 13 + [2] * 1
    train, val = stratified_split(labels, 0.3, seed=4)
    assert sorted(train + val) == list(range(len(labels)))
    assert Counter(labels[i] for i in val) == Counter({0: 2, 1: 4})
