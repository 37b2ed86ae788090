"""User-facing errors.

Every problem a user can cause (bad model, bad option, bad request, bad artifact) is raised as a
`PoprtError` whose message is one line naming the problem and the fix. The CLI prints it without a
traceback and exits with code 2.
"""


class PoprtError(Exception):
    """A problem with the user's input, reported as one line."""


class PassError(PoprtError):
    """A pass failed or left an invalid graph; the message names the pass."""


class ArtifactError(PoprtError):
    """A compiled artifact is corrupt, tampered with, or of an unknown format."""


class RequestError(PoprtError):
    """A runtime request (feeds or outputs) does not match the model."""


class QueueFullError(PoprtError):
    """A PackRunner already holds `max_pending` requests; the caller should retry later."""
