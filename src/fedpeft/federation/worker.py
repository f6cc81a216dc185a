"""A warm ClientApp executor beside a deployed SuperNode (Flower's ``--isolation process``).

A Flower 1.42 SuperNode runs every message in a fresh ``flwr-clientapp`` process, launched by a
SuperExec that polls the SuperNode's Runtime API for tasks. With fedpeft's ClientApp that
process starts Python and Flower (~1.7 s here), imports torch and transformers, loads the
encoder and tokenises the client's data before it trains for one round: every round.

With ``--isolation process`` the SuperNode launches nothing and waits for an executor of the
user's choosing to take its tasks from the Runtime API. This module is that executor, one
long-lived process per SuperNode::

    flower-supernode --isolation process --port 9094 ...        # the SuperNode
    python -m fedpeft.federation.worker --runtime-api 127.0.0.1:9094

It asks the Runtime API for a ClientApp task every ``--poll`` seconds and runs it *in this
process*, with the same steps as Flower's ``flwr-clientapp`` (pull the message, context, run and
FAB; call the FAB's ClientApp; push the reply and the context; heartbeats meanwhile), so the
model and the tokenised data stay in memory across rounds (``runtime.cached_runtime``), exactly
as in a simulation worker. Flower's messages, node state, error replies and logs are unchanged;
only the per-message process is gone. Without a worker (``--isolation subprocess``, Flower's
default) the same ClientApp runs in Flower's per-message process: slower, nothing extra to run.

The worker survives a restart of its SuperNode (it keeps polling the same address) and can be
restarted itself at any time: a task it had taken is failed by the SuperNode and the server
logs that client's failure for the round.
"""

from __future__ import annotations

from .. import offline

offline.apply()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from ..errors import FedpeftError  # noqa: E402
from .client_app import app as client_app  # noqa: E402  (the FAB's ClientApp, see deploy/)
from .latency import shorten_pulls  # noqa: E402

__all__ = ["Executor", "client_app", "main"]


class Executor:
    """Takes the ClientApp tasks of one SuperNode from its Runtime API and runs them here."""

    def __init__(self, runtime_api: str, root_certificates: str | None = None,
                 poll: float = 0.05) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        self.runtime_api = runtime_api
        self.insecure = root_certificates is None
        self.certificates = Path(root_certificates).read_bytes() if root_certificates else None
        self.poll = poll
        self._apps: dict[str, Any] = {}  # FAB hash -> its loaded ClientApp
        self.client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api, insecure=self.insecure,
            root_certificates=self.certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())

    def serve(self) -> None:
        """Poll for tasks and run them one at a time, until killed."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        backoff = shorten_pulls()  # the message may reach this node after its task
        print(f"fedpeft worker: taking ClientApp tasks from {self.runtime_api} "
              f"(poll {self.poll:g} s, object-pull backoff {backoff or 'Flower'} s)",
              file=sys.stderr, flush=True)
        unreachable = False
        while True:
            try:
                res = self.client.AcquireTask(AcquireTaskRequest(
                    supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
            except Exception as err:  # the SuperNode is down or restarting: keep trying
                if not unreachable:
                    print(f"fedpeft worker: SuperNode Runtime API {self.runtime_api} not "
                          f"reachable ({type(err).__name__}); retrying", file=sys.stderr,
                          flush=True)
                unreachable = True
                time.sleep(1.0)
                continue
            if unreachable:
                print(f"fedpeft worker: connected to {self.runtime_api}", file=sys.stderr,
                      flush=True)
                unreachable = False
            if res.HasField("task") and res.token:
                self.run_task(res.token)
            else:
                time.sleep(self.poll)

    def run_task(self, token: str) -> None:
        """One task, the steps of Flower's ``flwr-clientapp`` process (``run_clientapp``)."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )

        retry = make_simple_http_retry_invoker()
        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api, insecure=self.insecure,
            root_certificates=self.certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=retry)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        t0 = t1 = t2 = time.perf_counter()
        try:
            message, context, run, fab = pull_task_input(client)
            t1 = time.perf_counter()
            print(f"fedpeft worker: {message.metadata.message_type} message (round "
                  f"{message.metadata.group_id or '-'}) received, running the ClientApp",
                  file=sys.stderr, flush=True)
            app = self._app(run, fab)
            reply = app(message=message, context=context)
            t2 = time.perf_counter()
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # an error reply, as Flower's own process sends
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            print(f"fedpeft worker: ClientApp raised {reason}", file=sys.stderr, flush=True)
            details = reason
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                                reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:
                print(f"fedpeft worker: failed to push the reply: {ex}", file=sys.stderr,
                      flush=True)
            retry.max_tries = 1
            push_task_output(client=client, context=context, sub_status=status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            kind = message.metadata.message_type if message is not None else "?"
            print(f"fedpeft worker: {kind} message {status}: pulled {t1 - t0:.2f} s, ClientApp "
                  f"{t2 - t1:.2f} s, reply pushed {time.perf_counter() - t2:.2f} s",
                  file=sys.stderr, flush=True)

    def _app(self, run: Any, fab: Any) -> Any:
        """The FAB's ClientApp, installed and loaded once per FAB (Flower's own loader)."""
        if fab.hash_str not in self._apps:
            from flwr.cli.install import install_from_fab
            from flwr.clientapp.utils import get_load_client_app_fn

            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self._apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return self._apps[fab.hash_str]

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fedpeft.federation.worker",
        description="fedpeft's warm ClientApp executor for a SuperNode started with "
                    "--isolation process")
    parser.add_argument("--runtime-api", required=True, metavar="HOST:PORT",
                        help="the SuperNode's Runtime API (its --host:--port)")
    parser.add_argument("--root-certificates", default=None, metavar="CA.crt",
                        help="CA of the Runtime API's certificate, when the SuperNode serves "
                             "it over TLS (--ssl-certfile); default: plain HTTP (loopback)")
    parser.add_argument("--poll", type=float, default=0.05,
                        help="seconds between polls of the Runtime API when idle (default 0.05)")
    args = parser.parse_args(argv)
    if not 0.001 <= args.poll <= 60:
        parser.error(f"--poll {args.poll}: expected seconds between 0.001 and 60")
    if ":" not in args.runtime_api:
        parser.error(f"--runtime-api {args.runtime_api!r}: expected HOST:PORT")
    if args.root_certificates and not os.path.isfile(args.root_certificates):
        parser.error(f"--root-certificates {args.root_certificates}: no such file")
    try:
        Executor(args.runtime_api, args.root_certificates, args.poll).serve()
    except FedpeftError as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()

