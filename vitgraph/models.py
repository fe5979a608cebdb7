"""Resolve a MODEL reference: a timm name, ``file.py:function`` or ``module.path:function``.

Also: ``--model-kwargs`` parsing, checkpoint loading and the input size a model expects.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitgraph.errors import ModelNotFoundError, VitgraphError, first_line


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``"img_size=32,patch_size=4,img_size=(32, 32)"`` -> dict, values parsed as Python literals."""
    if not text:
        return {}
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out: dict[str, Any] = {}
    for item in filter(None, (i.strip() for i in items)):
        if "=" not in item:
            raise VitgraphError(f"--model-kwargs item {item!r} is not key=value (example: img_size=32,num_classes=10)")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def parse_size(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise VitgraphError(f"--input-size {text!r} is not C,H,W (example: 3,224,224)") from None
    if len(size) != 3 or min(size) < 1:
        raise VitgraphError(f"--input-size {text!r} must be three positive numbers C,H,W (example: 3,224,224)")
    return size


def _from_reference(ref: str, kwargs: dict[str, Any]) -> nn.Module:
    target, func = ref.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelNotFoundError(f"model file {target} does not exist (MODEL is file.py:function)")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: name it and its error, not our stack
            raise VitgraphError(f"importing the model file {target} failed: {first_line(exc)}. "
                                f"Fix {target} (run `python {target}` to see the full error).") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ModelNotFoundError(f"cannot import module {target!r} for MODEL {ref}: {exc}") from exc
    fn = getattr(module, func, None)
    if fn is None:
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(func, names, n=3)
        raise ModelNotFoundError(f"{target} has no function {func!r}" + (f"; did you mean {close}?" if close else ""))
    try:
        model = fn(**kwargs)
    except Exception as exc:  # the user's builder: name it and its error, not our stack
        raise VitgraphError(f"building the model with {ref} raised {first_line(exc)}. "
                            f"Fix {func} in {target}, or the --model-kwargs passed to it.") from exc
    if not isinstance(model, nn.Module):
        raise VitgraphError(f"{ref} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _from_timm(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close timm names: {', '.join(close)}." if close else " See timm.list_models('*vit*')."
        raise ModelNotFoundError(f"unknown model {name!r}: not a timm model name, file.py:function or "
                                 f"module.path:function.{hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise VitgraphError(f"timm could not build {name} with --model-kwargs {kwargs}: {exc}") from exc
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise VitgraphError(f"could not load pretrained weights for {name} ({first_line(exc)}). "
                                "Without network access, "
                                "pass the weights file with --checkpoint PATH instead.") from exc
        raise


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state dict (raw, or under 'model'/'state_dict'/'module') into ``model``, strictly."""
    file = Path(path)
    if not file.is_file():
        raise VitgraphError(f"checkpoint {path} does not exist")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, not a checkpoint, or pickled objects beyond plain tensors
        raise VitgraphError(f"checkpoint {path} could not be read ({first_line(exc)}). Pass a state dict "
                            "saved with torch.save(model.state_dict(), PATH) or a .safetensors file; a file cut "
                            "short by an interrupted download or copy needs fetching again.") from exc
    if not isinstance(state, dict):
        raise VitgraphError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict; save it with "
                            "torch.save(model.state_dict(), PATH)")
    for key in ("model", "state_dict", "model_ema", "module"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise VitgraphError(
            f"checkpoint {path} does not fit the model: missing {result.missing_keys[:5]}"
            f"{'...' if len(result.missing_keys) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
            f"{'...' if len(result.unexpected_keys) > 5 else ''}. Build the model with the same "
            "--model-kwargs as the checkpoint.")


def load_model(ref: str, *, pretrained: bool = False, checkpoint: str | None = None,
               model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build the model a CLI ``MODEL`` argument names (eval mode)."""
    kwargs = dict(model_kwargs or {})
    if ":" in ref and not Path(ref).exists():
        model = _from_reference(ref, kwargs)
    elif Path(ref).exists():
        model = load_compiled(ref)
    else:
        model = _from_timm(ref, pretrained, kwargs)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model.eval()


def load_compiled(ref: str) -> nn.Module:
    """The compact graph a ``vitgraph compile --out DIR`` wrote (DIR, or DIR/compact.pt)."""
    path = Path(ref)
    folder = path if path.is_dir() else path.parent
    if not (folder / "compact.pt").is_file():
        raise VitgraphError(f"{ref} is a path but not a folder written by `vitgraph compile` (no compact.pt in "
                            f"{folder}); for a .pt2 use torch.export.load(path).module()")
    model = torch.load(folder / "compact.pt", map_location="cpu", weights_only=False)
    report = folder / "report.json"
    if report.is_file():
        import json
        info = json.loads(report.read_text())
        model.vg_input_size = tuple(info.get("input_size") or ()) or None
        model.vg_name = f"{info.get('model', folder.name)} (compressed)"
    return model


def default_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) the model was built for, read from its patch embedding or config."""
    if getattr(model, "vg_input_size", None):
        return tuple(model.vg_input_size)
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    proj = getattr(pe, "proj", None)
    chans = getattr(proj, "in_channels", None) or getattr(model, "in_chans", None)
    if img is not None and chans:
        h, w = (img, img) if isinstance(img, int) else tuple(img)
        return (int(chans), int(h), int(w))
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        c, h, w = cfg["input_size"]
        return (int(getattr(model, "in_chans", c) or c), int(h), int(w))
    hf = getattr(model, "config", None)
    if hf is not None and hasattr(hf, "image_size"):
        s = hf.image_size if isinstance(hf.image_size, int) else hf.image_size[0]
        return (int(getattr(hf, "num_channels", 3)), int(s), int(s))
    return None
