import os

import pytest
import torch


# One torch thread: on a 2-core machine, two threads plus any other load slow torch down 10-30x.
torch.set_num_threads(1)
# Tests never reach the Hub: anything that tries fails at once instead of retrying a dead endpoint.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
