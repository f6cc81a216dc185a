"""Run a federation on this machine with Flower's simulation runtime (Ray actors as clients).

``simulate(cfg)`` is what ``fedpeft run`` calls: it makes the run folder, binds a ServerApp to
the config, and starts ``cfg.num_clients`` virtual SuperNodes served by ``sim-workers`` Ray
actors (each actor holds one frozen base model and serves many clients in turn).
"""

from __future__ import annotations

from .. import offline

offline.apply()

import logging  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from ..config import RunConfig  # noqa: E402
from ..errors import RunFailedError  # noqa: E402
from .client_app import app as client_app  # noqa: E402
from .resources import plan_resources  # noqa: E402
from .server_app import make_server_app, open_run  # noqa: E402


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray settings: loopback only, no dashboard, the workers of ``plan_resources``."""
    plan = plan_resources(cfg)
    return {
        "client_resources": {"num_cpus": plan.cpus, "num_gpus": plan.gpus},
        "init_args": {"num_cpus": plan.cpus * plan.workers, "include_dashboard": False,
                      "logging_level": logging.ERROR, "log_to_driver": True,
                      "_node_ip_address": "127.0.0.1",
                      **({"num_gpus": _gpus_needed(plan)} if plan.gpus else {})},
    }


def _gpus_needed(plan) -> int:  # noqa: ANN001
    import math

    return math.ceil(plan.gpus * plan.workers - 1e-9)


def simulate(cfg: RunConfig, overwrite: bool = False,
             on_round: Callable[[dict[str, Any]], None] | None = None,
             resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` in simulation and return its summary (also in ``<run>/summary.json``).

    ``resume``: continue the run in ``cfg.run_dir()`` from its checkpoint (see ``checkpoint.py``).
    The server's model and data are built before Ray starts, so bad settings fail fast.
    """
    import ray
    from flwr.simulation import run_simulation

    log, runtime, finished = open_run(cfg, overwrite=overwrite, resume=resume)
    if finished is not None:
        return finished
    failure: list[BaseException] = []
    server_app = make_server_app(cfg, log, on_round=_progress(cfg, on_round), runtime=runtime,
                                 resume=resume, failure=failure)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    try:
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=cfg.num_clients, backend_config=backend_config(cfg))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if failure:  # the server stopped the run (e.g. every client failed): say why
        raise failure[0]
    summary_file = log.path / "summary.json"
    if not summary_file.exists():
        raise RunFailedError(f"the simulation ended without a summary (Flower's log above says "
                             f"why); finished rounds are in {log.path}/rounds.jsonl")
    import json

    return json.loads(summary_file.read_text())


def _progress(cfg: RunConfig, on_round: Callable[[dict[str, Any]], None] | None
              ) -> Callable[[dict[str, Any]], None]:
    """A per-round progress bar on stderr (tqdm), chained with ``on_round``."""
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.rounds, desc=f"{cfg.method} {cfg.task}", unit="round",
                   file=sys.stderr, dynamic_ncols=True)

    def update(record: dict[str, Any]) -> None:
        if bar is not None:
            shown = {k: f"{v:.4f}" for k, v in record["metrics"].items()}
            bar.set_postfix(loss=f"{record['train-loss']:.3f}", **shown)
            bar.update(1)
            if record["round"] == cfg.rounds:
                bar.close()
        if on_round is not None:
            on_round(record)

    return update
