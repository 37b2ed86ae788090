"""PopRT 1.5's flags that poprt-lite does not implement, declared on a command (compat/poprt_options.py
has the table). `poprt_only` adds them hidden from the command's help (the README's table lists
them): refused ones stop the command with their reason, ignored ones print a notice, before it
runs, so PopRT's command lines run unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

from poprt_lite.cli import options
from poprt_lite.compat.poprt_options import (  # noqa: F401  (the table, for the CLI's users)
    BY_NAME, FLAGS, FP8, IMPLEMENTED, MULTI_VALUE, NOT_IMPLEMENTED, NOTICE, REFUSED, SWITCH, VALUE, VALUES, PoprtFlag, apply, message,
)


def _parameter(flag: PoprtFlag) -> inspect.Parameter:
    option = typer.Option(flag.flag, hidden=True, help=message(flag))
    annotation = {SWITCH: bool, VALUE: Optional[str], VALUES: Optional[list[str]]}[flag.takes]
    default = False if flag.takes == SWITCH else None
    return inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option])


def poprt_only(command: Callable[..., Any]) -> Callable[..., Any]:
    """Declare PopRT's flags that poprt-lite does not implement on `command`: refused ones stop it
    with their reason, ignored ones print a notice, before it runs."""

    def around(values: dict[str, Any], call: Callable[[], Any]) -> Any:
        apply(values)
        return call()

    return options.with_options(command, [_parameter(flag) for flag in NOT_IMPLEMENTED], around)
