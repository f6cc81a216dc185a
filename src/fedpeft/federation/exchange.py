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
    # partition ids whose node trains on its own files (nodedata.py) -> its num-examples once
    # its first valid update told it (0 until then); the server never sees those files
    own_data: dict[int, int] = field(default_factory=dict)
    # partitions whose node failed its last message (timed out, error, unavailable): a new node
    # claiming one replaces it (a SuperNode restarted after a crash gets a new node id while the
    # old one may count as connected until its heartbeats expire)
    failed: set[int] = field(default_factory=set)
    retired: set[int] = field(default_factory=set)  # replaced node ids: not asked again
    notes: list[str] = field(default_factory=list)  # for the next round's log line

    def node(self, partition_id: int) -> int | None:
        return self.by_partition.get(partition_id)

    def expected_size(self, partition_id: int, shard_size: int) -> int | None:
        """The ``num-examples`` a node's update must report: its shard's size, or for a node
        with its own data the size of its first valid update (None: not known yet)."""
        if partition_id in self.own_data:
            return self.own_data[partition_id] or None
        return shard_size

    def learn(self, partition_id: int, own_data: bool) -> None:
        if own_data:
            self.own_data.setdefault(partition_id, 0)
        else:
            self.own_data.pop(partition_id, None)


class Unanswered(list):
    """Indices of messages without a reply; ``unsent``: those the SuperLink did not even accept
    (its destination node has left)."""

    unsent: set[int]


def exchange(grid: Grid, messages: Sequence[Message], timeout: float | None,
             poll: float = 0.05) -> tuple[dict[int, Message], Unanswered]:
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
    unanswered = Unanswered(i for i in range(len(messages)) if i not in replies)
    unanswered.unsent = set(range(len(messages))) - set(index_of.values())
    return replies, unanswered


def query_partitions(grid: Grid, node_ids: Iterable[int], timeout: float | None
                     ) -> tuple[dict[int, tuple[int, str, bool]], list[str]]:
    """Ask nodes for their partition id, anchor and whether they bring their own data:
    ``({node: (pid, anchor, own_data)}, [problems])``."""
    node_ids = list(node_ids)
    messages = [Message(RecordDict({"config": ConfigRecord({"op": "partition-id"})}),
                        dst_node_id=node, message_type=MessageType.QUERY) for node in node_ids]
    replies, unanswered = exchange(grid, messages, timeout)
    found: dict[int, tuple[int, str, bool]] = {}
    problems = [f"node {node_ids[i]} did not answer" for i in unanswered]
    for i, reply in replies.items():
        if reply.has_error():
            problems.append(f"node {node_ids[i]}: {reply.error.reason}")
            continue
        metrics = reply.content["metrics"]
        pid = int(metrics["partition-id"])
        config = reply.content.config_records.get("config")
        anchor = str(config["anchor-id"]) if config is not None and "anchor-id" in config else ""
        found[node_ids[i]] = (pid, anchor, bool(metrics.get("own-data", 0)))
    return found, problems


# How long the server waits for every partition's node before round 1, and whether it may then
# start with fewer (a deployment sets both: ``deploy.py``'s ``join-timeout``; a simulation's
# nodes are all there at once, so it keeps the strict default).
DISCOVERY = {"timeout": 600.0, "partial": False}


def discover_nodes(grid: Grid, num_clients: int, timeout: float | None = None,
                   poll: float = 0.5, min_nodes: int = 1, query_timeout: float = 60.0) -> Nodes:
    """Wait for ``num_clients`` nodes and learn which partition each holds.

    Strict (a simulation): every partition must have its node within ``timeout``. Partial
    (``DISCOVERY["partial"]``, a deployment): after ``timeout`` the run starts with the nodes
    present if they hold at least ``min_nodes`` partitions; the missing ones and nodes that did
    not answer are noted in ``nodes.notes`` (round 1's log line) and may join later."""
    timeout = DISCOVERY["timeout"] if timeout is None else timeout
    partial = bool(DISCOVERY["partial"])
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < num_clients and time.monotonic() < deadline:
        time.sleep(poll)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < (min_nodes if partial else num_clients):
        raise FederationError(f"only {len(node_ids)} of num-clients={num_clients} nodes "
                              f"connected within {timeout:.0f} s"
                              + (f" (at least min-train-clients={min_nodes} needed to start)"
                                 if partial else ""))
    found, problems = query_partitions(grid, node_ids, query_timeout if partial else timeout)
    if problems and not partial:
        raise FederationError("nodes failed to report their partition: " + "; ".join(problems[:3]))
    nodes = Nodes()
    nodes.notes += problems
    for node, (pid, anchor, own) in found.items():
        if pid in nodes.by_partition:
            raise FederationError(f"two nodes claim partition-id={pid}")
        if not 0 <= pid < num_clients:
            raise FederationError(f"node {node} holds partition-id={pid}, outside "
                                  f"[0, num-clients={num_clients})")
        nodes.by_partition[pid] = node
        nodes.anchors[pid] = anchor
        nodes.learn(pid, own)
        if own:
            nodes.notes.append(f"partition {pid}: node {node} trains on its own data")
    missing = sorted(set(range(num_clients)) - nodes.by_partition.keys())
    if missing and (not partial or len(nodes.by_partition) < min_nodes):
        raise FederationError(f"no node holds partition ids {missing[:10]} "
                              f"(num-clients={num_clients}"
                              + (f"; {len(nodes.by_partition)} present, min-train-clients="
                                 f"{min_nodes} needed to start)" if partial else ")"))
    if missing:
        nodes.notes.append(f"no node holds partitions {missing[:10]} after {timeout:.0f} s; "
                           f"the run goes on with the {len(nodes.by_partition)} present, the "
                           "others are used once their nodes join")
    return nodes


def refresh_nodes(grid: Grid, nodes: Nodes, timeout: float | None) -> list[str]:
    """Forget nodes that left, learn nodes that joined; return what changed (for the log)."""
    live = set(grid.get_node_ids())
    changes, nodes.notes = nodes.notes, []
    for pid, node in list(nodes.by_partition.items()):
        if node not in live:
            del nodes.by_partition[pid]
            nodes.anchors.pop(pid, None)
            changes.append(f"partition {pid}: node {node} left")
    new = live - set(nodes.by_partition.values()) - nodes.retired
    if new:
        found, problems = query_partitions(grid, sorted(new), timeout)
        changes += problems
        for node, (pid, anchor, own) in found.items():
            if pid in nodes.by_partition and pid in nodes.failed:  # e.g. a restarted node
                changes.append(f"partition {pid}: node {node} replaces node "
                               f"{nodes.by_partition[pid]}, which failed its last message")
                nodes.retired.add(nodes.by_partition[pid])
                nodes.failed.discard(pid)
            elif pid in nodes.by_partition:  # two live nodes for one partition: keep the first
                changes.append(f"node {node} also claims partition {pid}; ignored")
                continue
            else:
                changes.append(f"partition {pid}: node {node} joined"
                               + (" (its own data)" if own else ""))
            nodes.by_partition[pid] = node
            nodes.anchors[pid] = anchor
            nodes.learn(pid, own)
    return changes
