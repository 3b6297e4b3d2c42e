"""oneDNN projections keep a bounded cache: a node that sees every row count does not grow its heap without end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from node.model.projection import ONEDNN_CACHE_ENTRIES

GROWTH = """
import psutil, torch
from node.model.projection import Projection
torch.set_num_threads(1)
projection = Projection(torch.randn(64, 64))
assert projection.kernel == "onednn", projection.kernel
with torch.inference_mode():
    projection(torch.randn(1, 64))
    before = psutil.Process().memory_info().rss
    for rows in range(2, 402):  # 400 row counts, as prefills, replays and batches bring them
        projection(torch.randn(rows, 64))
print(psutil.Process().memory_info().rss - before)
"""


def _rss_growth_mb(env: dict[str, str]) -> float:
    done = subprocess.run([sys.executable, "-c", GROWTH], env=env, capture_output=True, text=True, timeout=300,
                          check=True)
    return int(done.stdout.split()[-1]) / 2**20


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_onednn_caches_are_bounded_and_a_users_setting_wins():
    env = {k: v for k, v in os.environ.items() if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    bounded = _rss_growth_mb(env)
    unbounded = _rss_growth_mb({**env, "LRU_CACHE_CAPACITY": "1024", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})
    # ~0.4-0.7 MB an entry: 64 entries took 46 MB here, 400 (torch's defaults keep up to 1,024) 226 MB
    assert bounded < 80, f"{bounded:.0f} MB for {ONEDNN_CACHE_ENTRIES} entries"
    assert unbounded > 2 * bounded, f"{unbounded:.0f} MB unbounded against {bounded:.0f} MB bounded"
