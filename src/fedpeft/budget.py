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
    anchor = runtime.method.make_anchor(runtime.model)
    anchor_bytes = to_record({k: v.cpu().numpy() for k, v in anchor.items()}).count_bytes() \
        if anchor else 0
    stages: dict[str, list[int]] = {}
    for server_round in range(1, cfg.rounds + 1):
        key = json.dumps(runtime.method.client_config(server_round), sort_keys=True)
        stages.setdefault(key, []).append(server_round)
    rows = []
    for key, rounds in stages.items():
        runtime.method.configure_client(runtime, json.loads(key))
        state = trainable_state(runtime.model)
        payload = to_record(state).count_bytes()
        total = sum(p.numel() for p in runtime.model.parameters())
        name = variant_label(cfg)  # DoRA's magnitudes are trainable, so they count here
        label = name if len(stages) == 1 else f"{name} (rounds {rounds[0]}-{rounds[-1]})"
        rows.append({
            "method": label,
            "trainable-params": num_parameters(state),
            "trainable-percent": 100.0 * num_parameters(state) / total,
            "bytes-up": payload,
            "bytes-down": payload,
            "anchor-bytes": anchor_bytes,
        })
    return rows


def for_method(cfg: RunConfig, method: str) -> RunConfig:
    """``cfg`` for ``method``; the LoRA variants are kept for the LoRA family only (SLoRA keeps
    rsLoRA: DoRA is refused with it, see config.py), so that ``fedpeft methods lora-dora=true``
    lists every method, the LoRA family with DoRA."""
    family = method in LORA_FAMILY
    return dataclasses.replace(cfg, method=method,
                               lora_dora=cfg.lora_dora and family and method != "slora",
                               lora_rslora=cfg.lora_rslora and family)


def budget_table(cfg: RunConfig, methods: list[str]) -> str:
    rows = [row for m in methods for row in method_budget(for_method(cfg, m))]
    lines = [f"model={cfg.model} task={cfg.task}",
             "| method | trainable params | % of model | MB up per round | MB down per round "
             "| one-off MB (anchor) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable-params']:,} | {r['trainable-percent']:.2f} "
                     f"| {r['bytes-up'] / 1e6:.3f} | {r['bytes-down'] / 1e6:.3f} "
                     f"| {r['anchor-bytes'] / 1e6:.3f} |")
    return "\n".join(lines)
