"""What every command shares: the model arguments, building and tracing the model they name, and the
``--targets`` list."""
from __future__ import annotations

import argparse
from typing import Any

from vitgraph.errors import InputSizeError, VitgraphError


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-size", help="C,H,W of the input (default: what the model was built for)")
    p.add_argument("--model-kwargs", help="k=v,... passed to timm.create_model or your function")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs network)")
    p.add_argument("--checkpoint", help="load weights from this state-dict file")
    p.add_argument("--batch", type=int, default=2, help="example batch size used for analysis (default 2)")


def load_graph(args: argparse.Namespace, ref: str) -> Any:
    """Build the model and trace it: returns a VitGraph."""
    import torch

    from vitgraph.analysis.graph import trace
    from vitgraph.capture.models import default_input_size, load_model, parse_kwargs, parse_size

    model = load_model(ref, pretrained=args.pretrained, checkpoint=args.checkpoint,
                       model_kwargs=parse_kwargs(args.model_kwargs))
    size = parse_size(args.input_size) or default_input_size(model)
    if size is None:
        raise InputSizeError(f"cannot tell which input size {ref} expects (it has no timm patch_embed.img_size, "
                             "pretrained_cfg or Hugging Face config to read it from); pass --input-size C,H,W, "
                             "e.g. --input-size 3,224,224")
    torch.manual_seed(0)
    fixed = getattr(model, "serving_batch", None)  # a compact graph that serves one batch size only
    x = torch.randn(fixed if isinstance(fixed, int) else max(1, args.batch), *size)
    return trace(model, x, name=getattr(model, "vg_name", None) or ref)


def parse_targets(text: str) -> tuple[str, ...]:
    """``--targets eager,onnx`` checked against the targets vitgraph can time."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    from vitgraph.targets.bench import TARGETS

    unknown = set(names) - set(TARGETS)
    if unknown:
        raise VitgraphError(f"--targets: unknown {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    return names
