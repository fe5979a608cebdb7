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

from vitgraph.errors import CheckpointError, ModelError, ModelNotFoundError, VitgraphError, first_line


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
            raise ModelError(f"importing the model file {target} failed: {first_line(exc)}. "
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
        raise ModelError(f"building the model with {ref} raised {first_line(exc)}. "
                            f"Fix {func} in {target}, or the --model-kwargs passed to it.") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{ref} returned {type(model).__name__}, not a torch.nn.Module; make {func} in {target} "
                         "return the model (an nn.Module instance), e.g. `return MyViT(**kwargs)`")
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
        raise ModelError(f"timm could not build {name} with --model-kwargs {kwargs}: {first_line(exc)}; "
                         "drop or rename that keyword (see the model's constructor in timm)") from exc
    except (OSError, RuntimeError, ValueError, AssertionError) as exc:
        if pretrained:
            raise ModelError(f"could not load pretrained weights for {name} ({first_line(exc)}). "
                             "Without network access, "
                             "pass the weights file with --checkpoint PATH instead.") from exc
        if not kwargs:
            raise
        # timm checks its arguments with asserts and ValueErrors (e.g. embed_dim divisible by num_heads)
        raise ModelError(f"timm could not build {name} with --model-kwargs {kwargs}: {first_line(exc)}; "
                         "change those --model-kwargs") from exc


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state dict (raw, or under 'model'/'state_dict'/'module') into ``model``, strictly."""
    state = _read_state(path)
    for key in ("model", "state_dict", "model_ema", "module"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. Build the model with the same "
            "--model-kwargs as the checkpoint.")
    shapes = [f"{k} {tuple(v.shape)} (the model's: {tuple(own[k].shape)})" for k, v in state.items()
              if not isinstance(v, torch.Tensor) or v.shape != own[k].shape]
    if shapes:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: {len(shapes)} tensors differ in shape, e.g. "
            f"{'; '.join(shapes[:3])}. Build the model with the --model-kwargs the checkpoint was trained with "
            "(embed_dim, depth, num_heads, img_size, num_classes, ...).")
    model.load_state_dict(state, strict=True)


def _read_state(path: str) -> dict[str, Any]:
    """The dict a checkpoint file holds; CheckpointError naming the file when it is not one."""
    file = Path(path)
    if file.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass the weights file in it (a .pth, .pt, .bin or "
                              ".safetensors state dict)")
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path passed to --checkpoint")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, not a checkpoint, or pickled objects beyond plain tensors
        raise CheckpointError(f"checkpoint {path} could not be read ({first_line(exc)}). Pass a state dict "
                              "saved with torch.save(model.state_dict(), PATH) or a .safetensors file; a file cut "
                              "short by an interrupted download or copy needs fetching again.") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict; save it with "
                              "torch.save(model.state_dict(), PATH)")
    return state


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
        raise ModelNotFoundError(f"{ref} is a path but not a folder written by `vitgraph compile` (no compact.pt "
                                 f"in {folder}); for a .pt2 use torch.export.load(path).module()")
    try:
        model = torch.load(folder / "compact.pt", map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or corrupt: unpickling raises whatever the bytes lead it to
        raise CheckpointError(f"{folder / 'compact.pt'} could not be read ({first_line(exc)}); it is not a whole "
                              f"`vitgraph compile` output: run the compile again into {folder}") from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{folder / 'compact.pt'} holds a {type(model).__name__}, not a compiled model; "
                              f"run `vitgraph compile` again into {folder}")
    report = folder / "report.json"
    if report.is_file():
        import json
        try:
            info = json.loads(report.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{report} is not JSON ({first_line(exc)}); it is not a whole `vitgraph "
                                  f"compile` output: run the compile again into {folder}, or delete {report} and "
                                  "pass --input-size C,H,W") from exc
        info = info if isinstance(info, dict) else {}
        size = info.get("input_size")
        model.vg_input_size = tuple(size) if isinstance(size, list) and size else None
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
