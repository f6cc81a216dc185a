"""The Flower ClientApp: one client's local round (FedAvg's ClientUpdate).

A train message carries the global trainable state (``arrays``), the run configuration and
the round (``config``), and, the first time the server contacts this node, the method's anchor
(FeDeRA's A0/B0). The node keeps the anchor in its ``context.state`` so that whichever worker
process serves it later can rebuild the same frozen residual. The reply carries the updated
trainable state and ``num-examples`` (FedAvg's weight).

Which client a node is comes from ``node_config["partition-id"]``: set by the simulation, or
by ``--node-config "partition-id=3 num-partitions=10"`` on a deployed SuperNode.

A round is a pure function of (global state, seed, round, client): the shuffle and torch's
global RNG (dropout) are seeded from ``SeedSequence([seed, round, partition_id])``, so a round
that is replayed after a crash, or retried, trains exactly as the first time.

A method whose clients keep tensors between rounds (fedsa-lora's B) loads them from the node's
``ClientStore`` after the global state, and saves them before replying (``client_store.py``:
version = round, so a replayed round starts from the same ones). With ``local-test-fraction``
the client trains without its local test split, and an evaluate message scores the global model
on that split (and the personalised one, global state + the client's own tensors).

``fail-rate`` / ``fail-mode`` are a *testing aid*: a seeded share of clients fails on purpose
(raises, hangs, or returns NaN or huge tensors) so that the server's failure handling and
update validation can be exercised; they are 0 / off in real runs.
"""

from __future__ import annotations

from .. import offline

offline.apply()

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from ..config import RunConfig  # noqa: E402
from ..training import local_train  # noqa: E402
from .client_store import open_store  # noqa: E402
from .nodedata import NodeSettings, check_labels, node_settings  # noqa: E402
from .runtime import Runtime, anchor_id, cached_runtime  # noqa: E402
from .state import decode, encode, from_record, is_packed, wire_record  # noqa: E402
from .strategies.dp import client_dp_mod  # noqa: E402

app = ClientApp(mods=[client_dp_mod])  # Flower's clipping mods, for dp=client-*

ANCHOR_KEY = "fedpeft-anchor"


def partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise RuntimeError("this SuperNode has no partition-id; start it with "
                           '--node-config "partition-id=<k> num-partitions=<n>"') from None


def held_anchor(state: RecordDict) -> str:
    """Content id of the anchor this node keeps in its state ("" if none)."""
    record = state.get(ANCHOR_KEY)
    return anchor_id(from_record(record)) if record is not None else ""


@app.query()
def whoami(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds, and which anchor it already has."""
    return Message(query_content(partition_id(context), context.state,
                                 node_settings(context.node_config)), reply_to=msg)


def query_content(pid: int, state: RecordDict, node: NodeSettings | None = None) -> RecordDict:
    """The answer to the server's query: partition id, the anchor held in ``state``, and
    whether the node trains on its own files (``nodedata.py``)."""
    own = int(node is not None and node.own_data)
    return RecordDict({"metrics": MetricRecord({"partition-id": pid, "own-data": own}),
                       "config": ConfigRecord({"anchor-id": held_anchor(state)})})


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = train_content(msg.content, partition_id(context), context.state,
                          node_settings(context.node_config))
    return Message(reply, reply_to=msg)


def round_seeds(seed: int, server_round: int, pid: int) -> tuple[int, int]:
    """(shuffle seed, dropout seed) of client ``pid`` in ``server_round``."""
    words = np.random.SeedSequence([seed, server_round, pid]).generate_state(2)
    return int(words[0]), int(words[1])


def injected_fault(seed: int, fail_rate: float, server_round: int, pid: int,
                   attempt: int) -> bool:
    """Testing aid: whether client ``pid`` fails on purpose in this round attempt (seeded)."""
    if fail_rate <= 0:
        return False
    rng = np.random.default_rng([seed, server_round, pid, attempt, 0xFA11])
    return bool(rng.random() < fail_rate)


def train_content(content: RecordDict, pid: int, state: RecordDict,
                  node: NodeSettings | None = None) -> RecordDict:
    """Run one local round for client ``pid``; ``state`` is the node's persistent state;
    ``node``: the SuperNode's own settings (threads, its own files; ``nodedata.py``)."""
    started = time.perf_counter()
    config = content["config"]
    cfg = RunConfig.from_json(str(config["run-config"]))
    server_round = int(config["round"])
    attempt = int(config.get("attempt", 0))
    fault = injected_fault(cfg.seed, cfg.fail_rate, server_round, pid, attempt)
    if fault and cfg.fail_mode == "raise":
        raise RuntimeError(f"injected failure (fail-rate={cfg.fail_rate}, round {server_round}, "
                           f"client {pid})")
    if fault and cfg.fail_mode == "hang":
        time.sleep(2 * cfg.round_timeout + 1)  # past the server's deadline; the reply is late
    node = node or NodeSettings()
    server_labels = config.get("label-names")  # sent by the server for nodes with own data
    labels = [str(x) for x in json.loads(str(server_labels))] \
        if node.own_data and server_labels else None
    runtime = cached_runtime(node.run_config(cfg), labels)
    node.apply_threads()
    if labels is not None:
        check_labels(runtime.task, labels, node.train_file or node.data_dir)
    check_base(runtime, str(config.get("base-fingerprint", "")))
    if "anchor" in content:
        state[ANCHOR_KEY] = content["anchor"]
    _ensure_anchor(runtime, str(config.get("anchor-id", "")), state)
    runtime.method.configure_client(runtime, config)

    incoming = decode(from_record(content["arrays"]), cfg.transport_dtype)
    runtime.method.receive(runtime, incoming, pid)  # import_state, or this client's share
    # tensors this client keeps between rounds (fedsa-lora's B), the newest before this round
    store = open_store(node.state_dir, config) if runtime.method.keeps_local_state else None
    started_from = runtime.method.load_local(runtime, store, pid, server_round) if store else None
    # a node with its own files trains on all of them; else on its partition of the shared data
    rows = runtime.features("train").rows if node.own_data else runtime.client_rows(pid)
    shuffle_seed, dropout_seed = round_seeds(cfg.seed, server_round, pid)
    with torch.random.fork_rng(devices=_cuda_devices(runtime)):
        torch.manual_seed(dropout_seed)  # dropout draws from the global RNG
        result = local_train(
            runtime.model, rows, runtime.collate, epochs=cfg.local_epochs,
            lr=float(config.get("lr", runtime.method.lr)),  # the server's (schedule.py)
            batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            generator=torch.Generator().manual_seed(shuffle_seed), device=runtime.device,
            after_step=runtime.method.after_step(runtime.model), precision=cfg.precision,
            proximal_mu=float(config.get("proximal-mu", 0.0)),  # sent by strategy=fedprox
            group_by_length=(runtime.task.group_by_length if cfg.group_by_length is None
                             else cfg.group_by_length),
        )
    if store is not None:  # saved before the reply, so the next round finds it
        runtime.method.save_local(runtime, store, pid, server_round, started_from)
    update = runtime.method.reply(runtime, pid)  # export_state, or this client's share
    if fault and cfg.fail_mode in ("nan", "huge"):
        update = _corrupt(update, cfg.fail_mode)
    metrics = MetricRecord({
        # FedAvg's weight n_k: the client's examples (QA trains on more windows than examples)
        "num-examples": len(runtime.task.examples("train")) if node.own_data
        else len(runtime.client_examples(pid)),  # without its local held-out splits
        "train-rows": result.num_examples,
        "train-loss": result.loss,
        "train-steps": result.steps,
        "train-seconds": result.seconds,
        "partition-id": pid,
    })
    # answered in the format it was sent (packed by a deployed server, state.py)
    arrays = wire_record(encode(update, cfg.transport_dtype), is_packed(content["arrays"]))
    # Everything this handler did (model build on first use, decode, train, encode)
    metrics["handler-seconds"] = time.perf_counter() - started
    return RecordDict({"arrays": arrays, "metrics": metrics})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    reply = evaluate_content(msg.content, partition_id(context), context.state,
                             node_settings(context.node_config))
    return Message(reply, reply_to=msg)


def evaluate_content(content: RecordDict, pid: int, state: RecordDict,
                     node: NodeSettings | None = None) -> RecordDict:
    """Score the global model on client ``pid``'s local test split (``local-test-fraction``):
    metrics ``global-<name>``; for a method whose clients keep their own tensors (fedsa-lora)
    also the client's personalised model (global state + its newest own tensors up to this
    round): ``personal-<name>``. With ``local-valid-fraction`` the same on the client's local
    validation split, as ``valid-global-<name>`` / ``valid-personal-<name>``.
    ``num-examples``: the size of the local test split."""
    config = content["config"]
    cfg = RunConfig.from_json(str(config["run-config"]))
    server_round = int(config["round"])
    node = node or NodeSettings()
    if node.own_data:
        raise RuntimeError("local-test-fraction: this node trains on its own files "
                           "(node-config train-file/data-dir), which have no local test split")
    runtime = cached_runtime(node.run_config(cfg))
    node.apply_threads()
    check_base(runtime, str(config.get("base-fingerprint", "")))
    if "anchor" in content:
        state[ANCHOR_KEY] = content["anchor"]
    _ensure_anchor(runtime, str(config.get("anchor-id", "")), state)
    runtime.method.configure_client(runtime, config)
    runtime.method.import_state(runtime.model,
                                decode(from_record(content["arrays"]), cfg.transport_dtype))
    parts = {"": "local-test", **({"valid-": "local-valid"} if cfg.local_valid_fraction else {})}

    def score(model: str) -> dict[str, float]:
        return {f"{prefix}{model}-{k}": float(v) for prefix, part in parts.items()
                for k, v in runtime.evaluate_local(pid, part).items()}

    metrics = score("global")
    if runtime.method.keeps_local_state:
        store = open_store(node.state_dir, config)
        runtime.method.load_local(runtime, store, pid, server_round + 1)  # up to this round
        metrics.update(score("personal"))
    return RecordDict({"metrics": MetricRecord({
        **metrics, "num-examples": len(runtime.client_examples(pid, "local-test")),
        "partition-id": pid})})


def check_base(runtime: Runtime, wanted: str) -> None:
    """Refuse to train on a pretrained model other than the server's (see
    ``runtime.weights_fingerprint``)."""
    if wanted and wanted != runtime.base_fingerprint:
        raise RuntimeError(
            f"this node's pretrained model differs from the server's: model="
            f"{runtime.cfg.model} loads here with weights fingerprint {runtime.base_fingerprint}, "
            f"the server's is {wanted}. Every node needs the same model files (same revision, "
            "same weights); this node refuses to train rather than send updates made on other "
            "weights")


def _corrupt(update: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """Testing aid: a NaN in the first tensor, or every tensor scaled by 1e6."""
    out = {k: v.copy() for k, v in update.items()}
    if mode == "nan":
        first = next(iter(out))
        out[first].reshape(-1)[0] = np.nan
    else:
        out = {k: v * np.asarray(1e6, dtype=v.dtype) for k, v in out.items()}
    return out


def _cuda_devices(runtime: Runtime) -> list[int]:
    device = runtime.device
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _ensure_anchor(runtime: Runtime, wanted: str, state: RecordDict) -> None:
    """Apply the run's anchor to this worker's model once (rebuilding it if another was applied)."""
    if wanted == runtime.anchor_id:
        return
    record = state.get(ANCHOR_KEY)
    if record is None:
        raise RuntimeError(f"anchor {wanted} is needed but this node never received it")
    arrays = from_record(record)
    if anchor_id(arrays) != wanted:
        raise RuntimeError(f"stored anchor does not match the server's anchor {wanted}")
    if runtime.anchor_id:
        runtime.model = runtime.build_model()
    anchor = {k: torch.from_numpy(v).to(runtime.device) for k, v in arrays.items()}
    runtime.method.apply_anchor(runtime.model, anchor)
    runtime.anchor_id = wanted
