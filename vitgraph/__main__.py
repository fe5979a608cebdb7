"""``python -m vitgraph`` runs the command line."""
import sys

from vitgraph.cli.commands import main

sys.exit(main())
