"""User-facing errors.

Every problem a user can cause (bad model, bad option, bad request, bad artifact) is raised as a
`PoprtError` whose message is one line naming the problem and the fix. The CLI prints it without a
traceback and exits with code 2.

A message names an option through `option(name)`: by its Python name (`input_shape`, as
`CompileOptions`, `compile`, `PackRunnerConfig` ... take it) for a library user, and as the CLI's
flag (`--input_shape`) while the CLI runs, which sets the spelling with `spell_options`. Log lines
name options the same way.
"""

import contextlib
import contextvars
import numbers
from collections.abc import Callable, Iterator

_SPELLING: contextvars.ContextVar[Callable[[str], str]] = contextvars.ContextVar("poprt_lite_option_spelling", default=str)


def option(name: str) -> str:
    """The option `name` as messages spell it here: `name` itself, or what `spell_options` set
    (the CLI: its flag)."""
    return _SPELLING.get()(name)


@contextlib.contextmanager
def spell_options(spelling: Callable[[str], str]) -> Iterator[None]:
    """Inside, messages and log lines spell each option as `spelling(name)` (the CLI: `--name`)."""
    token = _SPELLING.set(spelling)
    try:
        yield
    finally:
        _SPELLING.reset(token)


class PoprtError(Exception):
    """A problem with the user's input, reported as one line."""


def whole_number(value: object, minimum: int, what: str, meaning: str = "") -> int:
    """`value` if it is a whole number >= `minimum` (not a bool: `True` is no count), else a
    PoprtError saying so; `what` names it (`option("threads")`), `meaning` explains a special
    value, e.g. ' (0: one per core)'."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise PoprtError(f"{what} must be a whole number >= {minimum}{meaning}, got {value!r}")
    return int(value)


class PassError(PoprtError):
    """A pass failed or left an invalid graph; the message names the pass."""


class ArtifactError(PoprtError):
    """A compiled artifact is corrupt, tampered with, or of an unknown format."""


class RequestError(PoprtError):
    """A runtime request (feeds or outputs) does not match the model."""


class QueueFullError(PoprtError):
    """A PackRunner already holds `max_pending` requests; the caller should retry later."""


def one_line(exc: BaseException | None, *, with_type: bool = True) -> str:
    """An exception as one line for a user-facing message: its type (unless `with_type` is False)
    and the first line of its text; a SyntaxError names its file and line."""
    if isinstance(exc, SyntaxError):
        from pathlib import Path

        return f"SyntaxError: {exc.msg} ({Path(exc.filename or '?').name}, line {exc.lineno})"
    lines = str(exc).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else ""
    if not with_type:
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
