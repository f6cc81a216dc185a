"""The apps for a real Flower deployment (a SuperLink and one SuperNode per client).

``deploy/pyproject.toml`` names ``server_app`` (here) and ``worker.client_app``; ``flwr run
deploy <superlink>`` ships that folder (a FAB of a few kB: fedpeft itself is installed on every
machine), the SuperLink starts ``server_app`` for the run, and every SuperNode answers with the
ClientApp — the same round loop and the same local training as in the simulation
(``server_app.py``, ``client_app.py``), optionally in a warm worker process (``worker.py``).

The run is configured through Flower's run config (``[tool.flwr.app.config]`` of the app, or
``flwr run ... --run-config "settings='rounds=20 num-clients=2' out='/abs/run'"``):

| key | meaning |
|---|---|
| ``config`` | a fedpeft TOML file on the SuperLink's machine ("" = defaults) |
| ``settings`` | fedpeft ``key=value`` overrides, space separated, as on ``fedpeft run`` |
| ``resume`` | continue the run folder from its checkpoint (``fedpeft run --resume``) |
| ``overwrite`` | replace an existing run folder |
| ``join-timeout`` | seconds to wait for every partition's node before round 1 (default 60) |

After ``join-timeout`` the run starts with the nodes present (at least ``min-train-clients``);
the others join when they connect.

Paths are read on the SuperLink's machine by the ServerApp process, whose working directory is
not the user's: give ``out`` (and ``config``) as absolute paths. Each SuperNode is started with
``--node-config "partition-id=K num-partitions=N"`` and computes its shard itself (the
partition is a pure function of the data, N, alpha and the seed), so no data moves; or it names
its own files (``train-file=``, ``data-dir=``; ``nodedata.py``). The ServerApp shortens Flower's
object-pull backoff and sends each state as one packed array (``latency.py``, ``state.py``).
See docs/deployment.md and scripts/deploy_local.sh.
"""

from __future__ import annotations

from .. import offline

offline.apply()

import os  # noqa: E402
import shlex  # noqa: E402
from logging import INFO, WARNING  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from flwr.app import Context  # noqa: E402
from flwr.common.logger import log  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from ..config import ConfigError, RunConfig, load_config  # noqa: E402
from .exchange import DISCOVERY  # noqa: E402
from .latency import shorten_pulls  # noqa: E402
from .rounds import error_summary  # noqa: E402
from .server_app import open_run, run_server  # noqa: E402
from .state import pack_on_wire  # noqa: E402
from .worker import client_app  # noqa: E402

server_app = ServerApp()

__all__ = ["client_app", "read_run_config", "server_app"]


def read_run_config(run_config: dict[str, Any]) -> tuple[RunConfig, bool, bool]:
    """``(cfg, resume, overwrite)`` from Flower's run config (keys in the module docstring)."""
    unknown = sorted(set(run_config) - {"config", "settings", "resume", "overwrite",
                                        "join-timeout"})
    if unknown:
        raise ConfigError(f"unknown run-config keys {unknown}; fedpeft settings go in "
                          "settings='key=value ...'")
    path = str(run_config.get("config", "") or "")
    if path and not Path(path).is_absolute():
        raise ConfigError(f"config={path!r} must be an absolute path on the SuperLink's machine")
    overrides = shlex.split(str(run_config.get("settings", "") or ""))
    cfg = load_config(path or None, overrides)
    if not Path(cfg.out).is_absolute():
        raise ConfigError(f"out={cfg.out!r} must be an absolute path on the SuperLink's machine "
                          "(the ServerApp does not run in your working directory)")
    return cfg, _flag(run_config.get("resume", False)), _flag(run_config.get("overwrite", False))


def join_timeout(run_config: dict[str, Any]) -> float:
    """``join-timeout``: seconds to wait for every partition's node before round 1 (then the
    run starts with those present, at least ``min-train-clients``; the others may join later)."""
    raw = run_config.get("join-timeout", 60)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"join-timeout={raw!r}: expected seconds >= 0")
    return value


def _flag(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes")


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    shorten_pulls()  # replies are read as soon as their objects arrive (latency.py)
    # one array per message instead of one object per tensor (state.py); FEDPEFT_PACK=0: off
    pack_on_wire(os.environ.get("FEDPEFT_PACK", "1") != "0")
    cfg, resume, overwrite = read_run_config(dict(context.run_config))
    DISCOVERY.update(timeout=join_timeout(dict(context.run_config)), partial=True)
    run_dir = cfg.run_dir()
    log(INFO, "fedpeft: %s %s on %s, %d clients, %d rounds -> %s", cfg.method, cfg.task,
        cfg.model, cfg.num_clients, cfg.rounds, run_dir)
    run_log, runtime, finished = open_run(cfg, overwrite=overwrite, resume=resume)
    if finished is not None:
        log(INFO, "fedpeft: %s has already finished", run_dir)
        return

    def progress(record: dict[str, Any]) -> None:
        shown = " ".join(f"{k}={v:.4f}" for k, v in record["metrics"].items())
        log(INFO, "fedpeft: round %d/%d loss=%.4f %s (%.1f s)", record["round"], cfg.rounds,
            record["train-loss"], shown, record["seconds"])
        for change in record.get("nodes", []):
            log(WARNING, "fedpeft: round %d: %s", record["round"], change)
        for failure in record["failures"]:
            log(WARNING, "fedpeft: round %d: client %s failed (%s): %s", record["round"],
                failure["client"], failure["kind"], error_summary(str(failure["reason"])))
        if record["failures"] or record["rejected"]:
            log(WARNING, "fedpeft: round %d: %d client failure(s), %d update(s) rejected%s",
                record["round"], len(record["failures"]), len(record["rejected"]),
                " -> round skipped" if record["skipped"] else "")

    summary = run_server(grid, cfg, run_log, on_round=progress, runtime=runtime, resume=resume)
    log(INFO, "fedpeft: done, final %s, summary in %s/summary.json", summary["final"], run_dir)
