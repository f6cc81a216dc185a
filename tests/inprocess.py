"""A Flower Grid that serves every node from this process: the real ServerApp round loop and the
real ClientApp handlers, without Ray or a SuperLink (seconds instead of a minute per test).

Node ``100 + k`` holds partition ``k``. ``silent`` nodes never answer a train message (a client
that hangs or vanished mid-round); ``gone`` nodes are no longer listed (a SuperNode that died);
``tamper`` rewrites a reply's content before the server sees it (a misbehaving client).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error

from fedpeft.config import RunConfig, load_config
from fedpeft.federation import client_app
from fedpeft.federation.server_app import open_run, run_server


class InProcessGrid:
    def __init__(self, num_nodes: int) -> None:
        self.contexts = {100 + k: Context(run_id=1, node_id=100 + k,
                                          node_config={"partition-id": k,
                                                       "num-partitions": num_nodes},
                                          state=RecordDict(), run_config={})
                         for k in range(num_nodes)}
        self.silent: set[int] = set()
        self.gone: set[int] = set()
        self.tamper: Callable[[int, RecordDict], RecordDict] | None = None
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return [n for n in self.contexts if n not in self.gone]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.gone or (node in self.silent and msg.metadata.message_type == "train"):
                continue
            try:
                reply = client_app.app(msg, self.contexts[node])
            except Exception as err:  # as Flower's runtime does: an error reply
                reply = Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if self.tamper is not None and not reply.has_error() and "arrays" in reply.content:
                pid = int(self.contexts[node].node_config["partition-id"])
                reply = Message(self.tamper(pid, reply.content), reply_to=msg)
            self._replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]


@pytest.fixture
def flower_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are stamped with the task that creates them; outside a Flower runtime, say who."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value, raising=False)


def tiny_config(model: str, out: str, *overrides: str) -> RunConfig:
    """A run of a tiny model on 4 clients, 2 per round, that takes seconds in-process."""
    return load_config(None, [
        f"model={model}", "method=federa", "lora-rank=4", "num-clients=4",
        "clients-per-round=2", "rounds=2", "max-train-samples=64", "max-test-samples=32",
        "batch-size=16", "lr=5e-3", "threads=1", f"out={out}", "progress=false", *overrides,
    ])


def run_inprocess(cfg: RunConfig, grid: InProcessGrid | None = None, resume: bool = False,
                  overwrite: bool = False) -> dict:
    """``fedpeft run`` with the in-process grid instead of Ray; returns the summary."""
    threads = torch.get_num_threads()  # the run sets its own; leave the session as it was
    try:
        log, runtime, finished = open_run(cfg, overwrite=overwrite, resume=resume)
        if finished is not None:
            return finished
        grid = grid or InProcessGrid(cfg.num_clients)
        return run_server(grid, cfg, log, runtime=runtime, resume=resume)
    finally:
        torch.set_num_threads(threads)


def run_stopped_and_resumed(model: str, root: Path, rounds: int, stop_after: int,
                            *overrides: str) -> tuple[RunConfig, RunConfig, dict, dict]:
    """The same tiny run twice: uninterrupted to ``rounds`` (``root/full``), and stopped after
    round ``stop_after`` then resumed to ``rounds`` (``root/part``). Returns both configs and
    both summaries: ``(full, part, full's summary, the resumed run's summary)``."""
    from fedpeft.federation.checkpoint import resume_config

    full = tiny_config(model, str(root / "full"), f"rounds={rounds}", *overrides)
    expected = run_inprocess(full)
    part = tiny_config(model, str(root / "part"), f"rounds={stop_after}", *overrides)
    run_inprocess(part)
    resumed = run_inprocess(resume_config(part.run_dir(), [f"rounds={rounds}"]), resume=True)
    return full, part, expected, resumed

