"""``python -m vitgraph`` runs the command line."""
import sys

from vitgraph.cli.main import main

sys.exit(main())
