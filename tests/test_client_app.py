"""The ClientApp's train handler, called in-process (no Ray): what it trains and returns."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedpeft.config import load_config
from fedpeft.federation import client_app
from fedpeft.federation.runtime import Runtime, anchor_id, cached_runtime
from fedpeft.federation.state import from_record, frozen_digest, to_record


def make_message(cfg, state, anchor=None, server_round=1):
    config = {"run-config": cfg.to_json(), "round": server_round,
              "anchor-id": anchor_id(anchor)}
    content = RecordDict({"arrays": to_record(state), "config": ConfigRecord(config)})
    if anchor is not None:
        content["anchor"] = to_record(anchor)
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


@pytest.fixture
def setup(tiny_models, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    # Messages are stamped with the task that creates them; outside a Flower runtime, say who.
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value, raising=False)
    cfg = load_config(None, [f"model={tiny_models('bert')}", "method=federa", "lora-rank=4",
                             "num-clients=3", "clients-per-round=1", "max-train-samples=48",
                             "batch-size=8", "lr=1e-2"])
    server = Runtime(cfg)
    anchor = {k: v.numpy() for k, v in server.method.make_anchor(server.model).items()}
    state = server.method.export_state(server.model)
    return cfg, server, anchor, state


def test_client_trains_its_shard_and_returns_only_trainable_tensors(setup):
    cfg, server, anchor, state = setup
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1},
                      state=RecordDict(), run_config={})
    reply = client_app.train(make_message(cfg, state, anchor), context)
    assert not reply.has_error()
    returned = from_record(reply.content["arrays"])
    assert returned.keys() == state.keys()
    assert all(not np.allclose(returned[k], state[k]) for k in state)  # every tensor trained
    runtime = cached_runtime(cfg)
    shard = runtime.partition().clients[1]
    assert reply.content["metrics"]["num-examples"] == len(shard) == 16
    # The worker's frozen base is the server's residual, untouched by training.
    assert frozen_digest(runtime.model) == frozen_digest(server.model)
    assert "fedpeft-anchor" in context.state  # kept for the node's later rounds


def test_a_node_without_the_anchor_fails_clearly(setup):
    cfg, _, anchor, state = setup
    from fedpeft.federation import runtime as runtime_module

    runtime_module._CACHE.clear()  # a fresh worker process that never saw the anchor
    context = Context(run_id=1, node_id=8, node_config={"partition-id": 0},
                      state=RecordDict(), run_config={})
    msg = make_message(cfg, state, anchor=None)
    msg.content["config"]["anchor-id"] = anchor_id(anchor)
    with pytest.raises(RuntimeError, match="never received it"):
        client_app.train(msg, context)


@pytest.mark.parametrize("value, grouped", [(None, False), (True, True), (False, False)])
def test_group_by_length_reaches_local_training(setup, monkeypatch, value, grouped):
    """group-by-length=true/false overrides the task's default (off for an encoder's
    classification, where None leaves it)."""
    import dataclasses

    cfg, _, anchor, state = setup
    cfg = dataclasses.replace(cfg, group_by_length=value)
    seen, real = {}, client_app.local_train

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(client_app, "local_train", spy)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0},
                      state=RecordDict(), run_config={})
    assert not client_app.train(make_message(cfg, state, anchor), context).has_error()
    assert seen["group_by_length"] is grouped
