"""The errors a user can act on.

Every failure that comes from what the user asked for (a setting, a file, a model, a run folder,
a federation whose clients all fail) is a ``FedpeftError``: the CLI prints its message as one
line, ``fedpeft: error: ...``, and exits non-zero; ``--debug`` shows the traceback as well.
Anything else that escapes is a bug in fedpeft and is reported as one.
"""

from __future__ import annotations


class FedpeftError(Exception):
    """A failure caused by the user's input or environment, with a message that says what to do."""


class RunFailedError(FedpeftError, RuntimeError):
    """A run that cannot learn anything: every sampled client failed, or too many rounds did."""
