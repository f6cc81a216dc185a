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

``fail-rate`` / ``fail-mode`` are a *testing aid*: a seeded share of clients fails on purpose
(raises, hangs, or returns NaN or huge tensors) so that the server's failure handling and
update validation can be exercised; they are 0 / off in real runs.
"""

from __future__ import annotations

from .. import offline

offline.apply()

import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from ..config import RunConfig  # noqa: E402
from ..training import local_train  # noqa: E402
from .runtime import Runtime, anchor_id, cached_runtime  # noqa: E402
from .state import decode, encode, from_record, to_record  # noqa: E402
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
    return Message(query_content(partition_id(context), context.state), reply_to=msg)


def query_content(pid: int, state: RecordDict) -> RecordDict:
    """The answer to the server's query: partition id and the anchor held in ``state``."""
    return RecordDict({"metrics": MetricRecord({"partition-id": pid}),
                       "config": ConfigRecord({"anchor-id": held_anchor(state)})})


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = train_content(msg.content, partition_id(context), context.state)
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


def train_content(content: RecordDict, pid: int, state: RecordDict) -> RecordDict:
    """Run one local round for client ``pid``; ``state`` is the node's persistent state."""
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
    runtime = cached_runtime(cfg)
    check_base(runtime, str(config.get("base-fingerprint", "")))
    if "anchor" in content:
        state[ANCHOR_KEY] = content["anchor"]
    _ensure_anchor(runtime, str(config.get("anchor-id", "")), state)
    runtime.method.configure_client(runtime, config)

    incoming = decode(from_record(content["arrays"]), cfg.transport_dtype)
    runtime.method.import_state(runtime.model, incoming)
    rows = runtime.client_rows(pid)
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
        )
    update = runtime.method.export_state(runtime.model)
    if fault and cfg.fail_mode in ("nan", "huge"):
        update = _corrupt(update, cfg.fail_mode)
    metrics = MetricRecord({
        # FedAvg's weight n_k: the client's examples (QA trains on more windows than examples)
        "num-examples": len(runtime.partition().clients[pid]),
        "train-rows": result.num_examples,
        "train-loss": result.loss,
        "train-steps": result.steps,
        "train-seconds": result.seconds,
        "partition-id": pid,
    })
    arrays = to_record(encode(update, cfg.transport_dtype))
    # Everything this handler did (model build on first use, decode, train, encode)
    metrics["handler-seconds"] = time.perf_counter() - started
    return RecordDict({"arrays": arrays, "metrics": metrics})


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
