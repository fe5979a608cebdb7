"""``python -m vitgraph`` runs the command line."""
import sys

from vitgraph.cli import main

sys.exit(main())
