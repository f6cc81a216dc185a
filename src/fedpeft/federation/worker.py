"""A warm training process beside a deployed SuperNode, and the thin ClientApp that uses it.

A Flower 1.42 SuperNode starts a fresh ``flwr-clientapp`` process for every message it
receives. With fedpeft's ClientApp that process imports torch and transformers, loads the
encoder and tokenises the client's data before it trains for one round: seconds for a tiny
model, a minute for a large one, every round. (``--isolation process`` only moves where that
process is launched; each message still gets a new one.)

So, optionally, each SuperNode machine runs one long-lived worker::

    python -m fedpeft.federation.worker --socket /srv/fedpeft/node0/worker.sock

and the SuperNode is told where it is with ``--node-config "partition-id=0 num-partitions=N
worker='/srv/fedpeft/node0/worker.sock'"``. ``client_app`` below is then a thin ClientApp
(it imports neither torch nor the model): it hands the message content and the node's state
to the worker over that Unix socket and returns the worker's reply. The worker keeps the
model and the tokenised data in memory across rounds (``runtime.cached_runtime``), exactly
as a simulation worker does. Without ``worker`` in the node config, ``client_app`` trains in
its own process (slow, but nothing else to run).

The socket is a file (no network port) in a folder only its owner can read; connections must
also prove they know the key in ``<socket>.key`` (``multiprocessing.connection``'s HMAC
handshake), since the worker unpickles what it receives.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

client_app = ClientApp()


def _key(socket_path: str) -> bytes:
    return Path(socket_path + ".key").read_bytes()


def call_worker(socket_path: str, request: tuple[Any, ...]) -> tuple[Any, ...]:
    """Send ``request`` to the worker at ``socket_path``; return its answer or raise its error."""
    from multiprocessing.connection import Client

    with Client(socket_path, family="AF_UNIX", authkey=_key(socket_path)) as conn:
        conn.send(request)
        status, *answer = conn.recv()
    if status == "error":
        raise RuntimeError(f"worker {socket_path}: {answer[0]}")
    return tuple(answer)


@client_app.query()
def whoami(msg: Message, context: Context) -> Message:
    return _handle("query", msg, context)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle("train", msg, context)


def _handle(kind: str, msg: Message, context: Context) -> Message:
    """Forward to the node's worker if it has one, else run fedpeft's ClientApp right here."""
    pid = int(context.node_config.get("partition-id", -1))
    socket_path = str(context.node_config.get("worker", "") or "")
    if pid < 0:
        raise RuntimeError("this SuperNode has no partition-id; start it with "
                           '--node-config "partition-id=<k> num-partitions=<n>"')
    if not socket_path:  # no warm worker: this process imports torch and builds the model
        from . import client_app as local

        return local.whoami(msg, context) if kind == "query" else local.train(msg, context)
    content, state = call_worker(socket_path, (kind, msg.content, pid, context.state))
    context.state = state  # e.g. the anchor the worker stored; the SuperNode keeps it
    return Message(content, reply_to=msg)


def serve(socket_path: str) -> None:
    """Answer query and train requests on ``socket_path`` one at a time until killed."""
    from multiprocessing.connection import Listener

    from .. import offline

    offline.apply()
    from .client_app import query_content, train_content  # torch, once for the lifetime

    path = Path(socket_path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    key_file = Path(socket_path + ".key")
    key_file.write_bytes(secrets.token_bytes(32))
    os.chmod(key_file, 0o600)
    path.unlink(missing_ok=True)
    with Listener(socket_path, family="AF_UNIX", authkey=key_file.read_bytes()) as listener:
        print(f"fedpeft worker: listening on {socket_path}", file=sys.stderr, flush=True)
        while True:
            try:
                conn = listener.accept()
            except Exception as err:  # a client without the key: refuse it, keep serving
                print(f"fedpeft worker: refused a connection: {err}", file=sys.stderr)
                continue
            with conn:
                try:
                    kind, content, pid, state = conn.recv()
                    if kind == "train":
                        reply = train_content(content, pid, state)
                    elif kind == "query":
                        reply = query_content(pid, state)
                    else:
                        raise ValueError(f"unknown request {kind!r}")
                    conn.send(("ok", reply, state))
                except Exception as err:  # the ClientApp turns it into an error reply
                    conn.send(("error", f"{type(err).__name__}: {err}"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    serve(parser.parse_args(argv).socket)


if __name__ == "__main__":
    main()
