"""``flower-supernode`` with shorter fixed waits: ``python -m fedpeft.federation.supernode ARGS``.

Takes exactly the arguments of Flower's ``flower-supernode`` and runs it, with two of Flower
1.42's constant waits shortened (``latency.py``): the 3 s sleep after a pull from the SuperLink
that found no message and the 0.5 s between checks for the ClientApp's reply are capped at
``FEDPEFT_SUPERNODE_POLL`` seconds (default 0.2; ``3`` gives Flower's own behaviour), and the
backoff of pulling a message's objects starts at ``FEDPEFT_PULL_BACKOFF`` (default 0.05 s)
instead of 1 s. A train message otherwise waits up to 3 s (the slowest of a round's nodes
decides) before its node even sees it. Each idle poll is one small request to the SuperLink's
Fleet API, so N idle nodes cost N / poll requests per second there: raise the poll for
deployments of many hundreds of nodes.

Nothing else changes: the same flags, TLS, node authentication, isolation modes and logs.
"""

from __future__ import annotations

from .. import offline

offline.apply()

import sys  # noqa: E402

from ..errors import FedpeftError  # noqa: E402
from .latency import shorten_pulls, shorten_supernode_poll  # noqa: E402


def main() -> None:
    try:
        shorten_supernode_poll()
        shorten_pulls()
    except FedpeftError as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
