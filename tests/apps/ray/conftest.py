"""A real Ray cluster on this machine for the Ray tests: two nodes of one CPU each (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import logging
import os

import pytest

from conftest import ROOT


@pytest.fixture(scope="session")
def cluster():
    """Two nodes of 1 CPU, this process connected as the driver; started once for the session."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # The nodes' workers import the poprt_lite under test (a checkout's), not another installed copy.
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), previous) if p)
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        nodes.add_node(num_cpus=1)
        ray.init(address=nodes.address, logging_level=logging.WARNING, log_to_driver=False)
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous
