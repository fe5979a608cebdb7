"""Reports: what a run writes for people to read, and the folder it writes into.

``kept`` reads what a compile kept from ``report.json`` (per block, any version of the file); ``views``
renders ``report.md``; ``plot`` draws ``kept.png``; ``outdir`` is the output folder (written as
``DIR.partial`` and renamed when complete, checkpoints to resume from). Reads reports and graphs; may import
the analysis and the ground floor, never the pipeline or the commands.
"""
from vitgraph.report.kept import KeptBlock, embed_kept, kept_blocks, report_axes
from vitgraph.report.outdir import Output, identity
from vitgraph.report.views import write_markdown

__all__ = ["write_markdown", "kept_blocks", "embed_kept", "report_axes", "KeptBlock", "Output", "identity"]
