"""PackRunnerConfig: how a PackRunner batches requests, in PopRT's spelling.

```python
config = runtime.PackRunnerConfig(timeout_microseconds=15000, max_valid_num=40,
                                  dynamic_input_name="input_ids")
config.algorithm = runtime.PackAlgorithm.next_fit
config.enable_input_single_row_mode("attention_mask")  # AttentionMask-mode artifacts
runner = runtime.Runner("executable.popef", config)
```

Every field may be left unset (`None`): the PackRunner then takes it from the artifact's manifest.
A field that is set must agree with the manifest; a contradiction is an error when the runner is
created, never a silently different batching.
"""

from __future__ import annotations

from dataclasses import dataclass

from poprt_lite.errors import PoprtError, option
from poprt_lite.runtime.interface import PackedInterface
from poprt_lite.runtime.packing import PackAlgorithm

DEFAULT_TIMEOUT_MICROSECONDS = 10_000
DEFAULT_LOOKAHEAD = 8


class PackRunnerConfig:
    """Settings of a PackRunner.

    - `timeout_microseconds`: the longest a request waits for its batch to fill up before the batch
      is launched anyway (measured from the oldest request's arrival); 0 launches at once.
    - `max_valid_num`: the most requests one batch holds (the artifact's `--pack_args max_valid_num`).
      In AttentionMask mode a lower value caps the batches below the artifact's (PopRT sets it here).
    - `dynamic_input_name`: the input whose length is the request's length (`input_ids`).
    - `lookahead`: while the previous batch runs, how many requests that do not fit the open batch
      may be overtaken by later ones that do (default 8; 0 keeps strict arrival order). Closing a
      batch at the first request that does not fit leaves room that a shorter request just behind
      it would fill. An overtaken request heads the next batch; the model never waits for a fuller
      batch (once it is free, a batch with a refused request is launched) and the timeout still
      bounds every wait.
    - `max_pending`: the most requests waiting for a batch at once (default: no limit); beyond it
      `execute_async` raises `QueueFullError` at once instead of letting latency grow without bound.
    - `algorithm`: `PackAlgorithm.first_fit` (a request goes to the first row with room) or
      `PackAlgorithm.next_fit` (only the current row, then the next); matters in AttentionMask mode.
    - `enable_input_single_row_mode(name)`: requests never cross a row (AttentionMask mode; `name` is
      the model's attention-mask input). Without it the mode is the artifact's.
    """

    def __init__(
        self,
        timeout_microseconds: int | None = None,
        max_valid_num: int | None = None,
        dynamic_input_name: str | None = None,
        algorithm: PackAlgorithm | str = PackAlgorithm.first_fit,
        lookahead: int = DEFAULT_LOOKAHEAD,
        max_pending: int | None = None,
    ) -> None:
        self.timeout_microseconds = timeout_microseconds
        self.max_valid_num = max_valid_num
        self.dynamic_input_name = dynamic_input_name
        self.algorithm = algorithm
        self.lookahead = lookahead
        self.max_pending = max_pending
        self.single_row_inputs: list[str] = []

    def enable_input_single_row_mode(self, input_name: str) -> None:
        """Keep every request within one row (AttentionMask mode); `input_name` is the mask input."""
        if not isinstance(input_name, str) or not input_name:
            raise PoprtError(f"enable_input_single_row_mode takes an input name, got {input_name!r}")
        if input_name not in self.single_row_inputs:
            self.single_row_inputs.append(input_name)

    @property
    def single_row_mode(self) -> bool:
        return bool(self.single_row_inputs)

    def validate(self) -> None:
        """Check the field types and ranges (not the agreement with an artifact)."""
        timeout = self.timeout_microseconds
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < float("inf")
        ):
            raise PoprtError(f"timeout_microseconds must be a non-negative number, got {timeout!r}")
        valid = self.max_valid_num
        if valid is not None and (isinstance(valid, bool) or not isinstance(valid, int) or valid < 1):
            raise PoprtError(f"max_valid_num must be a positive integer, got {valid!r}")
        lookahead = self.lookahead
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise PoprtError(f"lookahead must be a non-negative integer, got {lookahead!r}")
        pending = self.max_pending
        if pending is not None and (isinstance(pending, bool) or not isinstance(pending, int) or pending < 1):
            raise PoprtError(f"max_pending must be a positive integer or None, got {pending!r}")
        name = self.dynamic_input_name
        if name is not None and (not isinstance(name, str) or not name):
            raise PoprtError(f"dynamic_input_name must be an input name, got {name!r}")
        algorithm = PackAlgorithm.parse(self.algorithm)
        if algorithm not in (PackAlgorithm.first_fit, PackAlgorithm.next_fit):
            raise PoprtError(
                f"{algorithm.value} packs a whole dataset at once; a PackRunner packs online with "
                "first_fit or next_fit"
            )

    def __repr__(self) -> str:
        algorithm = getattr(self.algorithm, "value", self.algorithm)
        return (
            f"PackRunnerConfig(timeout_microseconds={self.timeout_microseconds!r}, "
            f"max_valid_num={self.max_valid_num!r}, dynamic_input_name={self.dynamic_input_name!r}, "
            f"algorithm={algorithm!r}, lookahead={self.lookahead!r}, max_pending={self.max_pending!r}, "
            f"single_row_inputs={self.single_row_inputs!r})"
        )


@dataclass(frozen=True)
class Batching:
    """How a PackRunner forms batches: the config's fields, settled against the artifact."""

    algorithm: PackAlgorithm
    lookahead: int
    max_pending: int | None
    timeout_microseconds: float
    max_valid_num: int  # the most requests per batch: the artifact's, or lower in AttentionMask mode


def resolve_batching(config: PackRunnerConfig, interface: PackedInterface) -> Batching:
    """Check the config against the artifact (a set field must agree with it) and settle defaults."""
    path, inputs = interface.path, interface.input_roles
    name = config.dynamic_input_name
    if name is not None and name != interface.dynamic_input:
        if name not in inputs:
            raise PoprtError(
                f"dynamic_input_name '{name}' is not an input of the model; its inputs are: {', '.join(inputs)}"
            )
        raise PoprtError(
            f"dynamic_input_name '{name}' contradicts the artifact, whose "
            f"dynamic input is '{interface.dynamic_input}'; leave it unset"
        )
    mask_name = interface.mask[0] if interface.mask else None
    for name in config.single_row_inputs:
        if not interface.descriptor.one_row:
            raise PoprtError(
                f"enable_input_single_row_mode('{name}') asks for AttentionMask mode, but artifact "
                f"'{path}' was compiled for {interface.mode} mode; drop that call or compile with "
                f"{option('pack_args')} mode=attention_mask"
            )
        if name != mask_name:
            raise PoprtError(
                f"enable_input_single_row_mode('{name}'): the model's attention-mask input is '{mask_name}'"
            )
    # An AttentionMask model does not depend on max_valid_num (PopRT's takes it from the config
    # alone): there a config may lower the cap. Elsewhere it is a dimension of the model.
    lowers_cap = interface.descriptor.config_lowers_max_valid_num and (config.max_valid_num or 0) <= interface.max_valid_num
    if config.max_valid_num is not None and config.max_valid_num != interface.max_valid_num and not lowers_cap:
        raise PoprtError(
            f"max_valid_num={config.max_valid_num} contradicts the artifact, compiled with "
            f"max_valid_num={interface.max_valid_num}; leave it unset or recompile"
        )
    timeout = config.timeout_microseconds
    return Batching(
        algorithm=PackAlgorithm.parse(config.algorithm),
        lookahead=config.lookahead,
        max_pending=config.max_pending,
        timeout_microseconds=DEFAULT_TIMEOUT_MICROSECONDS if timeout is None else timeout,
        max_valid_num=config.max_valid_num or interface.max_valid_num,
    )
