"""Flower 1.42's fixed waits in a deployment, and the shorter ones fedpeft's processes use.

Measured on loopback (docs/deployment.md, BENCHMARKS.md section 7), a deployed round of a model
that trains in 0.3 s took 9-13 s, almost all of it in waits that are constants in Flower:

- the SuperNode loop sleeps 3 s after a pull from the SuperLink that found no message
  (``supernode/start_client_internal.py``): up to 3 s before a node sees its train message;
- the same loop waits 0.5 s between checks for the ClientApp's reply;
- pulling a message's objects that are not stored yet backs off 1, 2, 4 ... s (cap 10 s;
  ``supercore/inflatable/inflatable_utils.py``, ``PULL_INITIAL_BACKOFF``): 1-7 s when a
  ClientApp asks for its message before its node has it, or the ServerApp for a reply before
  all its objects arrived;
- the SuperExec looks for tasks every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` s (1 s; the one
  that is a setting): once per message without a worker;
- ``Grid.send_and_receive`` polls every 3 s: fedpeft does not use it (``exchange.py``, 0.05 s).

``shorten_pulls`` (the ServerApp, the worker, the SuperNode) starts the object-pull backoff at
``FEDPEFT_PULL_BACKOFF`` s (default 0.05) and caps it at 1 s, with ten times the tries, so a slow
object is waited for as long as before, but at most ``FEDPEFT_PULL_MAX_TIME`` s (default 300,
Flower's 7200) in all; ``shorten_supernode_poll`` (``python -m
fedpeft.federation.supernode``) caps the SuperNode's two idle sleeps at ``FEDPEFT_SUPERNODE_POLL``
s (default 0.2). Each applies to the process that calls it, only on flwr 1.42.0 (the release
whose constants these are); on another version it leaves Flower as it is and says so.
"""

from __future__ import annotations

import os
import sys
import time
from types import ModuleType

from ..errors import FedpeftError

FLOWER_VERSION = "1.42.0"
POLL_ENV, DEFAULT_POLL = "FEDPEFT_SUPERNODE_POLL", 0.2
BACKOFF_ENV, DEFAULT_BACKOFF = "FEDPEFT_PULL_BACKOFF", 0.05
FLOWER_IDLE_SLEEPS = (3, 0.5)  # the literal waits of flwr 1.42's SuperNode loop
BACKOFF_CAP = 1.0
# How long a pull waits for an object that is not there (Flower's PULL_MAX_TIME: 7200 s). A
# message of a run that has ended (its ServerApp killed just after sending it) can never be
# pulled: the worker, which runs one task at a time, would wait that long and starve the next
# run. 300 s still covers a node fetching ~900 MB at 25 Mbit/s before its ClientApp may read it.
MAX_TIME_ENV, DEFAULT_MAX_TIME = "FEDPEFT_PULL_MAX_TIME", 300.0


def seconds_setting(name: str, default: float, low: float, high: float,
                    environ: dict[str, str] | None = None) -> float:
    """Environment variable ``name`` in seconds within [low, high], or a one-line error."""
    raw = (environ if environ is not None else os.environ).get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not low <= value <= high:
        raise FedpeftError(f"{name}={raw!r}: expected seconds between {low:g} and {high:g}")
    return value


def _flower_matches(what: str) -> bool:
    import flwr

    if flwr.__version__ == FLOWER_VERSION:
        return True
    print(f"fedpeft: flwr {flwr.__version__} is not {FLOWER_VERSION}; {what} keeps Flower's own "
          "waits", file=sys.stderr)
    return False


class PollClock(ModuleType):
    """The ``time`` module as the SuperNode's loop sees it, with its idle sleeps capped."""

    def __init__(self, poll: float) -> None:
        super().__init__("time")
        self.poll = poll

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.poll) if seconds in FLOWER_IDLE_SLEEPS else seconds)


def shorten_supernode_poll(poll: float | None = None) -> float | None:
    """Cap the SuperNode loop's idle sleeps (this process); returns the poll applied."""
    poll = seconds_setting(POLL_ENV, DEFAULT_POLL, 0.01, 3) if poll is None else poll
    if not _flower_matches(POLL_ENV):
        return None
    from flwr.supernode import start_client_internal as loop

    loop.time = PollClock(poll)  # type: ignore[assignment]
    return poll


def shorten_pulls(backoff: float | None = None, max_time: float | None = None
                  ) -> float | None:
    """Start the object-pull backoff of this process at ``backoff`` s (cap 1 s), and wait at
    most ``max_time`` s for an object that is not there."""
    backoff = seconds_setting(BACKOFF_ENV, DEFAULT_BACKOFF, 0.001, 1.0) \
        if backoff is None else backoff
    max_time = seconds_setting(MAX_TIME_ENV, DEFAULT_MAX_TIME, 1.0, 7200.0) \
        if max_time is None else max_time
    if not _flower_matches(BACKOFF_ENV):
        return None
    from flwr.supercore.inflatable import inflatable_utils as objects

    for function in (objects.pull_objects, objects.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__
        defaults["initial_backoff"] = backoff
        defaults["backoff_cap"] = 10.0 if backoff >= 1 else BACKOFF_CAP  # 1: Flower's own
        defaults["max_tries_per_object"] = 5000  # ten times Flower's 500
        defaults["max_time"] = max_time
    return backoff
