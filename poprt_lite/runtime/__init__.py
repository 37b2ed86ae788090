"""Running compiled artifacts: a plain ModelRunner, and (with a PackRunnerConfig) online packing.

Mirrors PopRT's `poprt.runtime`: `Runner(path)` runs the artifact's fixed-shape model;
`Runner(path, PackRunnerConfig(...))` serves single unpadded requests by packing them online.
"""

from poprt_lite.runtime.config import PackRunnerConfig
from poprt_lite.runtime.model_runner import ModelRunner
from poprt_lite.runtime.pack_runner import PackFuture, PackRunner, PackRunnerStats
from poprt_lite.runtime.packing import PackAlgorithm

__all__ = [
    "ModelRunner",
    "PackAlgorithm",
    "PackFuture",
    "PackRunner",
    "PackRunnerConfig",
    "PackRunnerStats",
    "Runner",
]


def Runner(path, config=None, threads: int = 0):  # noqa: N802 - PopRT's spelling: runtime.Runner(popef_path, config)
    """PopRT's `runtime.Runner`: a ModelRunner, or a PackRunner when a PackRunnerConfig is given.

    `threads` is onnxruntime's intra-op thread count (0: every core).
    """
    if config is None:
        return ModelRunner(path, threads=threads)
    return PackRunner(path, config, threads=threads)
