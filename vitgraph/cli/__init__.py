"""The commands: ``vitgraph compile | inspect | export | bench | profile | sweep | demo`` (``commands`` parses and
dispatches: ``main``; ``common`` holds what every command shares: the model arguments, loading and tracing a model, the
``--targets`` list; ``sweep`` and ``demo`` are the two longer jobs). The top floor: it may import every room
below it and the public facade ``vitgraph``; nothing in the package imports it (``python -m vitgraph`` and the
``vitgraph`` script enter here)."""
from vitgraph.cli.commands import build_parser, main

__all__ = ["main", "build_parser"]
