"""The server's checkpoint: everything needed to continue a run after the last finished round.

One file, ``<run>/checkpoint.safetensors``, rewritten after every round: the global trainable
state as tensors, and in the file's metadata (JSON) the round, the client sampler's RNG state,
the clients that already hold the method's anchor, the method's ``state_dict()`` (SLoRA's stage),
the per-round history the summary is built from, and the run configuration. It is written to a
temporary file, flushed to disk and renamed over the old one, so a crash at any instant leaves
either the previous checkpoint or the new one, never half of one.

A run resumed from it (``fedpeft run --resume RUN_DIR``) replays nothing and skips nothing: with
local training seeded per (seed, round, client) it ends with the same global state and metrics
as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, RunConfig, differing_settings, resumable_settings

FILE = "checkpoint.safetensors"
STRATEGY_PREFIX = "@strategy/"  # tensors of the strategy's state, beside the global state
_META_KEY = "fedpeft-checkpoint"
VERSION = 1
# the precision a run computes in ("bf16" or "fp32", what ``precision=auto`` meant on the
# server's device), kept beside the settings of its checkpoint; a finished run's summary.json
# has it as "precision"
PRECISION_RAN = "precision-ran"

@dataclass
class Checkpoint:
    """The server's state after round ``round`` (0 = before the first round)."""

    round: int
    global_state: dict[str, np.ndarray]
    sampler: dict[str, Any]  # numpy ``bit_generator.state`` of the client sampler
    anchored: list[int] = field(default_factory=list)  # partitions that received the anchor
    method_state: dict[str, Any] = field(default_factory=dict)  # ``Method.state_dict()``
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per round
    anchor_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # ``RunConfig.to_dict()``
    seconds: float = 0.0  # wall time spent by the sessions that produced this checkpoint
    strategy_state: dict[str, Any] = field(default_factory=dict)  # ``strategies/state.py``
    strategy_tensors: dict[str, np.ndarray] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {"version": VERSION, "round": self.round, "sampler": self.sampler,
                "anchored": sorted(self.anchored), "method-state": self.method_state,
                "history": self.history, "anchor-id": self.anchor_id, "config": self.config,
                "seconds": self.seconds, "strategy-state": self.strategy_state,
                # safetensors lists tensors sorted by name; the state's own order is the model's
                # (strategies such as FedAvgM pair tensors by position)
                "state-keys": list(self.global_state)}


def save_checkpoint(run_dir: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` into ``run_dir`` atomically (temporary file, fsync, rename)."""
    from safetensors.numpy import save_file

    target = Path(run_dir) / FILE
    tmp = target.with_name(target.name + ".tmp")
    tensors = {k: np.ascontiguousarray(v) for k, v in checkpoint.global_state.items()}
    tensors.update({STRATEGY_PREFIX + k: np.ascontiguousarray(v)
                    for k, v in checkpoint.strategy_tensors.items()})
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(checkpoint.metadata())})
    _fsync(tmp)
    os.replace(tmp, target)
    _fsync(target.parent)  # the rename itself must reach the disk
    return target


def load_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The checkpoint in ``run_dir``, or None if the run never finished a round."""
    from safetensors import safe_open

    path = Path(run_dir) / FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = json.loads((fh.metadata() or {}).get(_META_KEY, "null"))
            state = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own SafetensorError for a damaged file
        raise ConfigError(f"{path} is damaged or not a safetensors file ({err}); move it away "
                          "to start the run again, or restore it") from None
    if not isinstance(meta, dict) or meta.get("version") != VERSION:
        raise ConfigError(f"{path} is not a fedpeft checkpoint (version {VERSION})")
    strategy = {k[len(STRATEGY_PREFIX):]: state.pop(k) for k in list(state)
                if k.startswith(STRATEGY_PREFIX)}
    order = meta.get("state-keys") or list(state)
    state = {k: state[k] for k in order}
    return Checkpoint(round=int(meta["round"]), global_state=state, sampler=meta["sampler"],
                      anchored=[int(p) for p in meta["anchored"]],
                      method_state=meta["method-state"], history=meta["history"],
                      anchor_id=meta["anchor-id"], config=meta["config"],
                      seconds=float(meta["seconds"]),
                      strategy_state=meta.get("strategy-state", {}), strategy_tensors=strategy)


def check_resumable(saved: dict[str, Any], cfg: RunConfig, done: int) -> None:
    """Raise ``ConfigError`` unless ``cfg`` continues the run whose resolved config is ``saved``
    and which has finished ``done`` rounds: every setting that can change a result must be
    equal (``config.differing_settings``), and ``rounds`` may only grow.

    ``precision`` is compared by what it computes (``PRECISION_RAN``, where the run recorded
    it): ``precision=auto`` that ran in fp32 on a CPU without native bf16 continues as
    ``precision=fp32``; continuing it as ``auto`` where that means bf16 is refused, since it
    would splice fp32 and bf16 rounds into one run. A finished run asked for with ``auto`` is
    reused as it ran (nothing left to train), one asked for with fp32 or bf16 only if it ran so.
    """
    changed = differing_settings(saved, cfg)
    ran = saved.get(PRECISION_RAN)
    if ran:
        from ..training import resolve_device, resolve_precision

        if cfg.precision != "auto":
            here = cfg.precision
        elif cfg.rounds > done:
            here = resolve_precision(resolve_device(cfg.device), cfg.precision)
        else:
            here = ran
        changed = [key for key in changed if key != "precision"]
        if here != ran and changed:
            changed = sorted([*changed, "precision"])
        elif here != ran:
            raise ConfigError(
                f"{cfg.run_dir()} trained its {done} rounds in {ran} (precision="
                f"{saved.get('precision')}), and precision={cfg.precision} computes in {here} "
                f"here; continuing would splice {ran} and {here} rounds into one run. Pass "
                f"precision={ran} to continue it as it ran, or use another out=/--root")
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {cfg.to_dict().get(k)!r}"
                          for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ConfigError(f"{cfg.run_dir()} holds a run made with other settings ({shown}{more}); "
                          f"continuing it would splice two different runs together. Only "
                          f"{', '.join(sorted(resumable_settings()))} may change: use another "
                          "out=/--root, or --overwrite to discard that run")
    if cfg.rounds < done:
        raise ConfigError(f"rounds={cfg.rounds} but {cfg.run_dir()} has already finished round "
                          f"{done}; ask for rounds>={done} or use another out=/--root")


def saved_config(run_dir: str | Path) -> tuple[dict[str, Any] | None, int]:
    """The resolved config of the run in ``run_dir`` and the rounds it finished: from its
    checkpoint if it has one, else from its ``config.toml`` and ``summary.json`` (a finished
    run whose checkpoint was not kept, 0 rounds without one); ``(None, 0)`` if the folder holds
    no run."""
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is not None:
        return checkpoint_config(checkpoint, run_dir), checkpoint.round
    if (run_dir / "config.toml").exists():
        import tomllib

        try:
            data = tomllib.loads((run_dir / "config.toml").read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{run_dir / 'config.toml'} is not a readable run config: {err}"
                              ) from None
        defaults = RunConfig().to_dict()
        summary = _summary(run_dir)
        try:
            done = int(summary.get("rounds", 0))
        except (ValueError, TypeError):
            raise ConfigError(f"{run_dir / 'summary.json'} is not a readable run summary"
                              ) from None
        ran = {PRECISION_RAN: summary["precision"]} if summary.get("precision") else {}
        return {**{k: None for k, v in defaults.items() if v is None}, **data, **ran}, done
    return None, 0


def checkpoint_config(checkpoint: Checkpoint, run_dir: str | Path) -> dict[str, Any]:
    """The resolved config of ``checkpoint``'s run, with what older checkpoints lacked: SLoRA's
    switch round from the method state, and the precision it ran in from the summary of a run
    that finished at the checkpoint's round."""
    config = dict(checkpoint.config)
    stage1 = checkpoint.method_state.get("stage1-rounds")
    if config.get("slora-stage1-rounds") is None and stage1:  # saved before it was resolved
        config["slora-stage1-rounds"] = int(stage1)
    if PRECISION_RAN not in config:
        summary = _summary(Path(run_dir))
        if summary.get("precision") and summary.get("rounds") == checkpoint.round:
            config[PRECISION_RAN] = summary["precision"]
    return config


def keep_precision_record(run_dir: str | Path, saved: dict[str, Any]) -> None:
    """Write ``saved``'s ``PRECISION_RAN`` into the checkpoint of ``run_dir`` where it lacks
    one (written before the record; ``saved_config`` took it from the summary, which a resumed
    run removes)."""
    checkpoint = load_checkpoint(run_dir)
    if (checkpoint is not None and PRECISION_RAN not in checkpoint.config
            and saved.get(PRECISION_RAN)):
        checkpoint.config = {**checkpoint.config, PRECISION_RAN: saved[PRECISION_RAN]}
        save_checkpoint(run_dir, checkpoint)


def _summary(run_dir: Path) -> dict[str, Any]:
    """``run_dir``'s summary.json ({} if it has none); ``ConfigError`` if it cannot be read."""
    path = run_dir / "summary.json"
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        summary = None
    if not isinstance(summary, dict):
        raise ConfigError(f"{path} is not a readable run summary")
    return summary


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The configuration of the run in ``run_dir`` (its ``config.toml``), with ``overrides``.

    ``out`` is set to ``run_dir`` itself, so a moved run folder resumes where it now is.
    """
    from ..config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise ConfigError(f"{run_dir} is not a run folder (no config.toml); nothing to resume")
    escaped = str(run_dir).replace("{", "{{").replace("}", "}}")
    return load_config(run_dir / "config.toml", [*(overrides or []), f"out={escaped}"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
