"""Running compiled artifacts: a plain ModelRunner, and (with a PackRunnerConfig) online packing."""

from poprt_lite.runtime.model_runner import ModelRunner

__all__ = ["ModelRunner", "Runner"]


def Runner(path, config=None, threads: int = 0):  # noqa: N802 - PopRT's spelling: runtime.Runner(popef_path, config)
    """PopRT's `runtime.Runner`: a ModelRunner, or a PackRunner when a PackRunnerConfig is given."""
    if config is None:
        return ModelRunner(path, threads=threads)
    raise NotImplementedError("online packing (PackRunnerConfig) is not implemented yet")
