"""Local training and batched inference, shared by every task and method.

A client's round is ``local_train``: E epochs of AdamW over its shard, batches padded to their
own longest row (dynamic padding), shuffled by an explicit ``torch.Generator`` so that a round is
reproducible from (seed, round, client). Inference sorts rows by length so that each batch pads
as little as possible, and returns the outputs in the original order.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Collate = Callable[[Sequence[dict[str, list[int]]]], dict[str, torch.Tensor]]


@dataclass
class TrainResult:
    num_examples: int
    steps: int
    loss: float  # mean training loss over the steps
    seconds: float


def batches(rows: Sequence[dict[str, list[int]]], batch_size: int, collate: Collate,
            order: Sequence[int] | np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(order), batch_size):
        yield collate([rows[i] for i in order[start : start + batch_size]])


def local_train(model: torch.nn.Module, rows: Sequence[dict[str, list[int]]], collate: Collate, *,
                lr: float, epochs: int, batch_size: int, weight_decay: float, max_grad_norm: float,
                generator: torch.Generator, device: torch.device,
                after_step: Callable[[], None] | None = None,
                precision: str = "auto", proximal_mu: float = 0.0,
                group_by_length: bool = False) -> TrainResult:
    """Train the parameters that require grad on ``rows`` and return what happened.

    ``after_step`` runs after every optimizer step (SLoRA's sparse mask re-applies itself there).
    A fresh AdamW is made for every call: optimiser state does not survive a round, as in FedAvg.
    ``proximal_mu`` > 0 adds FedProx's (mu/2)||w - w_global||^2 over the trainable tensors, w_global
    being their values when the round starts (Li et al., 2020). ``group_by_length`` batches rows
    of similar length (``length_grouped``) so that padding does not dominate (decoders' prompts
    vary from tens to hundreds of tokens).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    autocast = _autocast(device, precision)
    model.train()
    start, losses, steps = time.perf_counter(), [], 0
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=generator).tolist()
        if group_by_length:
            order = length_grouped(order, [len(r["input_ids"]) for r in rows], batch_size,
                                   generator)
        for batch in batches(rows, batch_size, collate, order):
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in batch.items()}  # (a generative batch's logits_to_keep: int)
            with autocast:
                loss = model(**batch).loss
            if anchors is not None:  # in fp32, outside autocast
                loss = loss + proximal_term(params, anchors, proximal_mu)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {steps}; "
                                         "lower lr")
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            losses.append(loss.detach())
            steps += 1
    model.eval()
    mean_loss = torch.stack(losses).float().mean().item() if losses else math.nan
    return TrainResult(len(rows), steps, mean_loss, time.perf_counter() - start)


def length_grouped(order: Sequence[int], lengths: Sequence[int], batch_size: int,
                   generator: torch.Generator, megabatch: int = 50) -> list[int]:
    """``order`` (a random permutation) regrouped so that each batch holds rows of similar
    length, still random: it is cut into mega-batches of ``megabatch`` batches, each sorted by
    length (longest first), cut into batches, and the batches are shuffled (the idea of
    transformers' ``LengthGroupedSampler``). The same rows, each once."""
    size = max(1, megabatch * batch_size)
    grouped = []
    for start in range(0, len(order), size):
        chunk = list(order[start : start + size])
        grouped.extend(sorted(chunk, key=lambda i: -lengths[i]))
    cut = [grouped[i : i + batch_size] for i in range(0, len(grouped), batch_size)]
    shuffle = torch.randperm(len(cut), generator=generator).tolist()
    return [i for b in shuffle for i in cut[b]]


def proximal_term(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor],
                  mu: float) -> torch.Tensor:
    """FedProx's (mu/2) * sum ||w - w_global||^2 over ``params``; its gradient is
    mu * (w - w_global)."""
    total = sum(((p - a).float().square().sum() for p, a in zip(params, anchors, strict=True)),
                torch.zeros((), device=params[0].device))
    return 0.5 * mu * total


@torch.no_grad()
def predict(model: torch.nn.Module, rows: Sequence[dict[str, list[int]]], collate: Collate, *,
            batch_size: int, device: torch.device,
            outputs: Callable[[object, dict[str, torch.Tensor]], list],
            precision: str = "auto") -> list:
    """Run the model over ``rows`` (length-sorted batches) and return ``outputs(out, batch)``'s
    per-row items in the original row order. Label keys are not given to the model."""
    model.eval()
    lengths = np.fromiter((len(r["input_ids"]) for r in rows), dtype=np.int64, count=len(rows))
    order = np.argsort(-lengths, kind="stable")
    results: list = [None] * len(rows)
    autocast = _autocast(device, precision)
    position = 0
    for batch in batches(rows, batch_size, collate, order):
        inputs = {k: v.to(device) for k, v in batch.items()
                  if k not in ("labels", "start_positions", "end_positions")}
        with autocast:
            out = model(**inputs)
        for item in outputs(out, batch):
            results[order[position]] = item
            position += 1
    return results


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX (asked of torch, which picks its kernels by the same flags). Elsewhere
    bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = torch.cpu
        return any(bool(getattr(cpu, probe, lambda: False)())
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """The compute precision ``precision`` means on ``device``: "bf16" or "fp32". ``auto`` is bf16
    autocast where the device has native bf16 (about 2x faster on such a CPU at equal accuracy,
    BENCHMARKS.md), fp32 elsewhere."""
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("precision=bf16 was asked for but this GPU has no bf16 support; "
                               "use precision=fp32 or auto")
        return "bf16"
    if precision == "auto" and native_bf16(device):
        return "bf16"
    return "fp32"


def warn_emulated_bf16(device: torch.device, precision: str) -> None:
    """Warn when ``precision=bf16`` is forced on a CPU that only emulates bf16: there it trains
    an order of magnitude slower than fp32 (13.3 vs 0.97 samples/s for FedLR on an AVX2-only
    EPYC core, BENCHMARKS.md section 3b); ``auto`` would have picked fp32."""
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device):
        warnings.warn("precision=bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): "
                      "bf16 is emulated here and trains about 14x slower than fp32; "
                      "precision=auto picks fp32 on this CPU", stacklevel=2)


def _autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """bf16 autocast where ``resolve_precision`` says bf16; a no-op context otherwise (fp32).
    Parameters, gradients and optimizer state stay fp32."""
    enabled = resolve_precision(device, precision) == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from .config import ConfigError

        raise ConfigError(f"device={name} was asked for but CUDA is not available here")
    return device
