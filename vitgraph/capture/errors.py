"""Export failures as vitgraph errors: the model's source line, the module running it, and the fix; torch's own
stderr dump of a failing export kept from the user."""
from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator

from torch import nn

from vitgraph.errors import TraceError, first_line, user_frame

__all__ = ["export_error", "quiet_torch"]


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """torch logs a failing export's graph and its guesses to stderr before raising; the error is raised again
    here naming the model's line and the fix, so the log is noise to a user."""
    import logging

    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("torch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # export prints the partial graph with print()
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_error(name: str, exc: BaseException, model: nn.Module) -> TraceError:
    text = str(exc)
    where = user_frame(exc) or _quoted_frame(text) or "<unknown>"
    holder = _holding_module(exc, model)
    if holder:
        where += f" inside module {holder}"
    data_dependent = any(k in text for k in ("data-dependent", "GuardOnDataDependent", "Could not guard on",
                                             "Could not extract specialized integer"))
    if data_dependent:
        fix = ("the model branches on a tensor's values (or on a size computed from them), which a graph cannot "
               "hold. Fix: make that line independent of the values (torch.where instead of `if`), state what is "
               "known with torch._check(...), pass a static shape with --input-size C,H,W, or keep the module whole "
               "as a leaf (vg.trace(model, x, leaf_modules=[TheModuleClass]))")
    elif "Constraints violated" in text or "batch" in text and "specializ" in text:
        fix = ("the model fixes the batch size (e.g. a reshape with a constant batch). Fix: take the batch from the "
               "input (x.shape[0]) at that line")
    else:
        fix = ("Fix: change that line so it runs on fake tensors (no .numpy(), .item() or Python-side tensor data), "
               "or pass the module that holds it as a leaf (vg.trace(model, x, leaf_modules=[TheModuleClass]))")
    return TraceError(f"torch.export could not capture {name}: {first_line(exc)} at {where}; {fix}.")


def _holding_module(exc: BaseException, model: nn.Module) -> str | None:
    """'path (module.Class)' of the innermost module of ``model`` whose forward was running when export failed."""
    paths = {id(m): p for p, m in model.named_modules()}
    tb, found = exc.__traceback__, None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in paths:
            found = owner
        tb = tb.tb_next
    if found is None:
        return None
    kind = type(found)
    return f"{paths[id(found)] or '<root>'} ({kind.__module__}.{kind.__qualname__})"


def _quoted_frame(text: str) -> str | None:
    """The last user-code location torch quotes in an export error's text."""
    found = [m for m in re.finditer(r'File "([^"]+)", line (\d+)', text)
             if "/torch/" not in m.group(1) and "/vitgraph/" not in m.group(1)]
    return f"{found[-1].group(1)}:{found[-1].group(2)}" if found else None
