"""A real Ray cluster on this machine for the Ray tests: two nodes of one CPU each (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import logging
import os
import socket

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
    # A free dashboard port (the state API the tests read lives there): Ray's default 8265 may be
    # held by another Ray on the machine, and the head would then start without it.
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_port": _free_port()})
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
