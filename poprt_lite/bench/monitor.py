"""Timing helpers: a session proxy that records every model run, and a CPU-contention monitor.

The benchmark shares its machine with whatever else runs there; `CpuMonitor` reports, per measured
mode, how much CPU time other processes took (from `/proc/stat` minus this process's own usage)
and the hypervisor's steal time, so a number measured on a busy machine is flagged, not trusted.
"""

from __future__ import annotations

import os
import threading
import time

try:
    import resource
except ImportError:  # pragma: no cover - not Unix
    resource = None


class TimedSession:
    """Wraps an onnxruntime session; `spans` holds (start, end) of every `run`, in call order."""

    def __init__(self, session) -> None:
        self._session = session
        self.spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    @classmethod
    def install(cls, owner) -> TimedSession:
        """Time every later run of `owner.session` (a ModelRunner's or a PackRunner's): the proxy
        replaces the attribute, so the runner's own calls go through it."""
        timed = cls(owner.session)
        owner.session = timed
        return timed

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        out = self._session.run(*args, **kwargs)
        end = time.perf_counter()
        with self._lock:
            self.spans.append((start, end))
        return out

    def __getattr__(self, name):
        return getattr(self._session, name)


def _proc_stat() -> list[int] | None:
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def own_cpu() -> float:
    if resource is None:
        return time.process_time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMonitor:
    """`stop()` -> shares of the machine's CPU capacity since construction: own, other, steal."""

    def __init__(self) -> None:
        self._start = (time.perf_counter(), _proc_stat(), own_cpu())

    def stop(self) -> dict[str, float | None]:
        wall1, stat1, own1 = time.perf_counter(), _proc_stat(), own_cpu()
        wall0, stat0, own0 = self._start
        capacity = max(wall1 - wall0, 1e-9) * (os.cpu_count() or 1)
        result: dict[str, float | None] = {
            "own": (own1 - own0) / capacity, "own_seconds": own1 - own0, "other": None, "steal": None
        }
        # /proc/stat counts in clock ticks (10 ms): shorter intervals say nothing
        if stat0 is not None and stat1 is not None and len(stat0) >= 8 and wall1 - wall0 >= 1.0:
            hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
            delta = [b - a for a, b in zip(stat0, stat1)]
            user, nice, system, _idle, _iowait, irq, softirq, steal = delta[:8]
            busy = (user + nice + system + irq + softirq) / hz
            result["other"] = min(1.0, max(0.0, busy - (own1 - own0)) / capacity)
            result["steal"] = steal / hz / capacity
        return result
