from __future__ import annotations

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=UserWarning)
# the pass manager's debug checks (cost model == FlopCounterMode after every pass) run in every test
os.environ.setdefault("VITGRAPH_DEBUG", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one torch thread each
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
