"""Talking to the nodes: who holds which partition, and one round trip of messages.

``Grid.send_and_receive`` sleeps 3 s between polls on a deployed SuperLink and has no notion of
a reply that never comes. ``exchange`` pushes the messages, polls every ``poll`` seconds, and
returns after ``timeout`` with the replies it has and the messages nobody answered, so a client
that hangs or disappears costs one round timeout, not the run.

Nodes are addressed by *partition id* (the client's data shard), never by the node id the
deployment hands out: ``discover_nodes`` asks every node once, ``refresh_nodes`` forgets nodes
that left and asks nodes that joined (a SuperNode restarted after a crash gets a new node id).
Each node also reports which FeDeRA-style anchor it already holds, so a resumed server re-sends
the anchor exactly to the nodes that lost it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..errors import FedpeftError


class FederationError(FedpeftError, RuntimeError):
    """The federation cannot start: too few nodes, or nodes that disagree about partitions."""


@dataclass
class Nodes:
    """Which node holds which partition, and which partitions hold the run's anchor."""

    by_partition: dict[int, int] = field(default_factory=dict)  # partition id -> node id
    anchors: dict[int, str] = field(default_factory=dict)  # partition id -> anchor id it holds

    def node(self, partition_id: int) -> int | None:
        return self.by_partition.get(partition_id)


def exchange(grid: Grid, messages: Sequence[Message], timeout: float | None,
             poll: float = 0.2) -> tuple[dict[int, Message], list[int]]:
    """Send ``messages``; return ``({index: reply}, [indices never answered or not sent])``.

    ``timeout`` None or <= 0 waits for every reply. Replies are matched to messages by id.
    """
    index_of: dict[str, int] = {}
    pushed = set(grid.push_messages(list(messages)))
    for i, msg in enumerate(messages):
        if msg.metadata.message_id and msg.metadata.message_id in pushed:
            index_of[msg.metadata.message_id] = i
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout if timeout and timeout > 0 else None
    waiting = set(index_of)
    while waiting:
        for reply in grid.pull_messages(waiting):
            origin = reply.metadata.reply_to_message_id
            if origin in waiting:
                waiting.discard(origin)
                replies[index_of[origin]] = reply
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll)
    unanswered = [i for i in range(len(messages)) if i not in replies]
    return replies, unanswered


def query_partitions(grid: Grid, node_ids: Iterable[int], timeout: float | None
                     ) -> tuple[dict[int, tuple[int, str]], list[str]]:
    """Ask nodes for their partition id and anchor: ``({node: (pid, anchor)}, [problems])``."""
    node_ids = list(node_ids)
    messages = [Message(RecordDict({"config": ConfigRecord({"op": "partition-id"})}),
                        dst_node_id=node, message_type=MessageType.QUERY) for node in node_ids]
    replies, unanswered = exchange(grid, messages, timeout)
    found: dict[int, tuple[int, str]] = {}
    problems = [f"node {node_ids[i]} did not answer" for i in unanswered]
    for i, reply in replies.items():
        if reply.has_error():
            problems.append(f"node {node_ids[i]}: {reply.error.reason}")
            continue
        pid = int(reply.content["metrics"]["partition-id"])
        config = reply.content.config_records.get("config")
        anchor = str(config["anchor-id"]) if config is not None and "anchor-id" in config else ""
        found[node_ids[i]] = (pid, anchor)
    return found, problems


def discover_nodes(grid: Grid, num_clients: int, timeout: float = 600.0,
                   poll: float = 0.5) -> Nodes:
    """Wait for ``num_clients`` nodes and learn which partition each holds."""
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < num_clients and time.monotonic() < deadline:
        time.sleep(poll)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < num_clients:
        raise FederationError(f"only {len(node_ids)} of num-clients={num_clients} nodes "
                              f"connected within {timeout:.0f} s")
    found, problems = query_partitions(grid, node_ids, timeout)
    if problems:
        raise FederationError("nodes failed to report their partition: " + "; ".join(problems[:3]))
    nodes = Nodes()
    for node, (pid, anchor) in found.items():
        if pid in nodes.by_partition:
            raise FederationError(f"two nodes claim partition-id={pid}")
        if not 0 <= pid < num_clients:
            raise FederationError(f"node {node} holds partition-id={pid}, outside "
                                  f"[0, num-clients={num_clients})")
        nodes.by_partition[pid] = node
        nodes.anchors[pid] = anchor
    missing = sorted(set(range(num_clients)) - nodes.by_partition.keys())
    if missing:
        raise FederationError(f"no node holds partition ids {missing[:10]} "
                              f"(num-clients={num_clients})")
    return nodes


def refresh_nodes(grid: Grid, nodes: Nodes, timeout: float | None) -> list[str]:
    """Forget nodes that left, learn nodes that joined; return what changed (for the log)."""
    live = set(grid.get_node_ids())
    changes = []
    for pid, node in list(nodes.by_partition.items()):
        if node not in live:
            del nodes.by_partition[pid]
            nodes.anchors.pop(pid, None)
            changes.append(f"partition {pid}: node {node} left")
    new = live - set(nodes.by_partition.values())
    if new:
        found, problems = query_partitions(grid, sorted(new), timeout)
        changes += problems
        for node, (pid, anchor) in found.items():
            if pid in nodes.by_partition:  # two live nodes for one partition: keep the first
                changes.append(f"node {node} also claims partition {pid}; ignored")
                continue
            nodes.by_partition[pid] = node
            nodes.anchors[pid] = anchor
            changes.append(f"partition {pid}: node {node} joined")
    return changes
