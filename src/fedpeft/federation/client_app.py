"""The Flower ClientApp: one client's local round (FedAvg's ClientUpdate).

A train message carries the global trainable state (``arrays``), the run configuration and
the round (``config``), and, the first time the server contacts this node, the method's anchor
(FeDeRA's A0/B0). The node keeps the anchor in its ``context.state`` so that whichever worker
process serves it later can rebuild the same frozen residual. The reply carries the updated
trainable state and ``num-examples`` (FedAvg's weight).

Which client a node is comes from ``node_config["partition-id"]``: set by the simulation, or
by ``--node-config "partition-id=3"`` on a deployed SuperNode.
"""

from __future__ import annotations

from .. import offline

offline.apply()

import torch  # noqa: E402
import numpy as np  # noqa: E402
from flwr.app import Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from ..config import RunConfig  # noqa: E402
from ..training import local_train  # noqa: E402
from .runtime import Runtime, anchor_id, cached_runtime  # noqa: E402
from .state import from_record, to_record  # noqa: E402

app = ClientApp()

ANCHOR_KEY = "fedpeft-anchor"


def partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise RuntimeError("this SuperNode has no partition-id; start it with "
                           '--node-config "partition-id=<k> num-partitions=<n>"') from None


@app.query()
def whoami(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    metrics = MetricRecord({"partition-id": partition_id(context)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = RunConfig.from_json(str(config["run-config"]))
    server_round = int(config["round"])
    pid = partition_id(context)
    runtime = cached_runtime(cfg)
    if "anchor" in msg.content:
        context.state[ANCHOR_KEY] = msg.content["anchor"]
    _ensure_anchor(runtime, str(config.get("anchor-id", "")), context)
    runtime.method.configure_client(runtime, config)

    runtime.method.import_state(runtime.model, from_record(msg.content["arrays"]))
    rows = runtime.client_rows(pid)
    # The local shuffle is a function of (seed, round, client): a round can be replayed.
    seed = np.random.SeedSequence([cfg.seed, server_round, pid]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(seed))
    result = local_train(
        runtime.model, rows, runtime.collate, lr=runtime.method.lr, epochs=cfg.local_epochs,
        batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, generator=generator, device=runtime.device,
        after_step=runtime.method.after_step(runtime.model),
    )
    arrays = to_record(runtime.method.export_state(runtime.model))
    metrics = MetricRecord({
        "num-examples": result.num_examples,
        "train-loss": result.loss,
        "train-steps": result.steps,
        "train-seconds": result.seconds,
        "partition-id": pid,
    })
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _ensure_anchor(runtime: Runtime, wanted: str, context: Context) -> None:
    """Apply the run's anchor to this worker's model once (rebuilding it if another was applied)."""
    if wanted == runtime.anchor_id:
        return
    record = context.state.get(ANCHOR_KEY)
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
