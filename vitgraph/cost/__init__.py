"""What a decision costs, behind one object the gated model is handed.

``budget`` holds the FLOPs pricer (every node's FLOPs times the factors the axes' decisions set; exact against
the compact graph under hard decisions), ``Cost`` (the prices a gated model asks for: FLOPs, and the budget's
units) and ``Budget`` (the Lagrangian term a learned method trains against); ``latency`` the latency table (the
same factors, priced by a fit to measurements); ``profile`` measures that table (``vitgraph profile``) and
checks a compiled model against a measured latency, building its models with a function it is handed
(``vitgraph.gated.builder``). May import capture, targets (to time), analysis, axes and the ground floor;
never the gated model, training, reports or commands.
"""
from vitgraph.cost.budget import Budget, Cost, Pricer
from vitgraph.cost.latency import LatencyTable

__all__ = ["Cost", "Pricer", "Budget", "LatencyTable"]
