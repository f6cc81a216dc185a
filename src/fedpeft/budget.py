"""Each method's trainable budget and payload for a model and task (the paper's
"#Trainable Parameters" column, plus what travels per client per round)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .config import LORA_FAMILY, RunConfig


def variant_label(cfg: RunConfig) -> str:
    """``cfg.method`` with its LoRA variants, e.g. ``federa+dora+rslora``."""
    flags = [name for name, on in (("dora", cfg.lora_dora), ("rslora", cfg.lora_rslora)) if on]
    return "+".join([cfg.method, *flags]) if cfg.method in LORA_FAMILY else cfg.method


def method_budget(cfg: RunConfig) -> list[dict[str, Any]]:
    """Build ``cfg.method`` on ``cfg.model`` and count what trains and what travels.

    One row per stage: a multi-stage method (SLoRA) changes what travels between rounds through
    ``client_config``, so the rounds are grouped by the config their clients receive.
    """
    from .federation.runtime import Runtime
    from .federation.state import num_parameters, to_record, trainable_state

    runtime = Runtime(cfg)
    own = runtime.method.budget_rows(runtime)  # one row per client rank (federated-LoRA family)
    if own is not None:
        return own
    anchor = runtime.method.make_anchor(runtime.model)
    anchor_bytes = to_record({k: v.cpu().numpy() for k, v in anchor.items()}).count_bytes() \
        if anchor else 0
    stages: dict[str, list[int]] = {}
    for server_round in range(1, cfg.rounds + 1):
        key = json.dumps(runtime.method.client_config(server_round), sort_keys=True)
        stages.setdefault(key, []).append(server_round)
    rows = []
    server_keys = list(runtime.method.export_state(runtime.model))  # the global state's tensors
    for key, rounds in stages.items():
        runtime.method.configure_client(runtime, json.loads(key))
        state = trainable_state(runtime.model)  # what trains on a client
        # up: what a client uploads; down: what the server sends it (the method's payload of the
        # global state: RoLoRA sends both factors and receives one, FedSA-LoRA keeps B at home)
        up = runtime.method.export_state(runtime.model)
        params = dict(runtime.model.named_parameters())
        held = {k: params[k].detach().cpu().numpy() for k in server_keys if k in params}
        down = runtime.method.client_payload({**held, **up}, 0, rounds[0])
        total = sum(p.numel() for p in runtime.model.parameters())
        name = variant_label(cfg)  # DoRA's magnitudes are trainable, so they count here
        label = name if len(stages) == 1 else f"{name} ({rounds_label(rounds)})"
        rows.append({
            "method": label,
            "trainable-params": num_parameters(state),
            "trainable-percent": 100.0 * num_parameters(state) / total,
            "bytes-up": to_record(up).count_bytes(),
            "bytes-down": to_record(down).count_bytes(),
            "anchor-bytes": anchor_bytes,
        })
    return rows


def rounds_label(rounds: list[int]) -> str:
    """``rounds 1-5``, or ``odd rounds`` / ``even rounds`` (RoLoRA), else the list."""
    if rounds == list(range(rounds[0], rounds[-1] + 1)):
        return f"rounds {rounds[0]}-{rounds[-1]}" if len(rounds) > 1 else f"round {rounds[0]}"
    if rounds == list(range(rounds[0], rounds[-1] + 1, 2)):
        return f"{'odd' if rounds[0] % 2 else 'even'} rounds"
    return "rounds " + ", ".join(map(str, rounds))


def for_method(cfg: RunConfig, method: str) -> RunConfig:
    """``cfg`` for ``method``; the LoRA variants are kept for the LoRA family only (SLoRA keeps
    rsLoRA: DoRA is refused with it, see config.py), so that ``fedpeft methods lora-dora=true``
    lists every method, the LoRA family with DoRA."""
    from .methods.lora_family import HETEROGENEOUS

    family = method in LORA_FAMILY
    return dataclasses.replace(cfg, method=method,
                               lora_dora=cfg.lora_dora and family and method != "slora",
                               lora_rslora=cfg.lora_rslora and family,
                               # client-ranks: one row per rank for flora/flexlora/hetlora
                               client_ranks=cfg.client_ranks if method in HETEROGENEOUS
                               else None)


def unavailable_budget(cfg: RunConfig) -> list[dict[str, Any]]:
    """``method_budget``, or one row saying why the method cannot be built on this model (FedBF
    on a decoder without biases), so that the table lists every other method."""
    from .errors import FedpeftError

    try:
        return method_budget(cfg)
    except FedpeftError:
        raise
    except ValueError as err:
        return [{"method": variant_label(cfg), "unavailable": str(err).split("; choose")[0]}]


def budget_table(cfg: RunConfig, methods: list[str]) -> str:
    rows = [row for m in methods for row in unavailable_budget(for_method(cfg, m))]
    lines = [f"model={cfg.model} task={cfg.task}",
             "| method | trainable params | % of model | MB up per round | MB down per round "
             "| one-off MB (anchor) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"| {r['method']} | n/a: {r['unavailable']} | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['trainable-params']:,} | {r['trainable-percent']:.2f} "
                     f"| {r['bytes-up'] / 1e6:.3f} | {r['bytes-down'] / 1e6:.3f} "
                     f"| {r['anchor-bytes'] / 1e6:.3f} |")
    return "\n".join(lines)
