"""Which Ray cluster a job runs on: `connected("local" | "auto" | ADDRESS)`.

`local` starts a Ray instance on this machine for the job (and stops it after); `auto` joins the
cluster this machine already belongs to (`ray start --head` or `ray start --address ...` ran here);
any other value is the address of a cluster's head, `HOST:PORT` (what `ray start --head` prints) or
`ray://HOST:PORT` (Ray Client). An address that does not answer within `CONNECT_TIMEOUT_S` is refused
at once (`ray.init` itself keeps retrying for minutes).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator

from poprt_lite.errors import PoprtError, option

LOCAL, AUTO = "local", "auto"
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the extra's other half: pyarrow, Ray Data)
    except ImportError as exc:
        raise PoprtError(f"running on Ray needs the ray extra ({exc.name} is missing): pip install 'poprt-lite[ray]'") from None
    return ray


@contextlib.contextmanager
def connected(address: str, *, verbose: bool = False) -> Iterator[None]:
    """Run the block connected to the Ray cluster at `address` (see the module docstring). A process
    connected already (its own `ray.init`) keeps its connection, for `auto`, `local` or its address."""
    ray = import_ray()
    if address not in (LOCAL, AUTO):
        check_reachable(address)
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address not in (LOCAL, AUTO, current):
            raise PoprtError(f"this process is connected to the Ray cluster at '{current}' already, not '{address}'")
        yield
        return
    level = logging.INFO if verbose else logging.WARNING
    try:
        ray.init(address=address, logging_level=level, log_to_driver=verbose, include_dashboard=False if address == LOCAL else None)
    except ConnectionError as exc:  # `auto` with no cluster on this machine
        raise PoprtError(
            f"no Ray cluster to join on this machine ({exc}); start its head here (`ray start`) "
            f"or pass {option('ray_address')} local"
        ) from None
    logging.getLogger("ray.data").setLevel(level)
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str) -> None:
    """Refuse `address` unless it is HOST:PORT or ray://HOST:PORT and something listens there."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise PoprtError(
            f"'{address}' is not a Ray address; pass {option('ray_address')} auto, local, HOST:PORT of the "
            "cluster's head or ray://HOST:PORT"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise PoprtError(
            f"cannot reach the Ray cluster at '{address}' ({reason}); check the head's address "
            f"(`ray start` prints it on the head) or pass {option('ray_address')} local"
        ) from None
