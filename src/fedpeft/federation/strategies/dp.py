"""Differential privacy: Flower's central-DP wrappers and client mods, and the privacy spent.

``dp=server-fixed|server-adaptive``: the server clips each client's update (w_k - w, over
every tensor that travels) to the clipping norm, averages them unweighted and adds Gaussian noise
of std ``noise-multiplier * norm / clients-per-round`` (Flower's
``DifferentialPrivacyServerSide*Clipping``). ``dp=client-fixed|client-adaptive``: each client
clips its own update before it leaves (Flower's ``fixedclipping_mod`` /
``adaptiveclipping_mod``), the server adds the noise (``...ClientSide*Clipping``), so the server
never sees an unclipped update. Adaptive modes move the norm toward the ``dp-target-quantile``
of the update norms (Andrew et al., 2021).

For the LoRA family the clipped vector is the whole update of a client: every A and B (and the
task head) concatenated, one L2 norm over all of them. A and B are not clipped separately; the
norm bounds what a client changes in the factors, not in the product s*B*A.

Privacy spent: for the fixed modes Flower's ``RdpAccountant`` (on Google's ``dp-accounting``)
composes one Gaussian release per aggregated round and the run logs epsilon at ``dp-delta``. It
counts each round as an unamplified release of the whole population (``no-amplification``:
sampling 10 of 100 clients is not credited), so the epsilon is an upper bound. It needs
equal client weights, which fedpeft gives under DP (every update weighs 1), and an aggregation
that is FedAvg's own (fedavg, fedprox); with another strategy, and for the adaptive modes
(whose clipping-norm updates spend privacy Flower's accountant does not track), no epsilon is
reported and the run log says why. The noise is drawn from numpy's global generator, not from
the run's seed (a noise that anyone who knows the seed can recompute protects nothing), so a DP
run is not bit-reproducible and a resumed one does not replay the same noise.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import strategy as flower
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from ...config import ConfigError, RunConfig

KEY_DP_MOD = "fedpeft-dp-mod"  # which client mod a train message asks for


def wrap_dp(cfg: RunConfig, strategy: flower.Strategy) -> flower.Strategy:
    """``strategy`` inside Flower's DP wrapper for ``cfg.dp``."""
    noise, sampled = float(cfg.dp_noise_multiplier or 0.0), cfg.clients_per_round
    try:
        if cfg.dp.endswith("fixed"):
            accountant, _ = make_accountant(cfg, strategy)
            cls = (flower.DifferentialPrivacyServerSideFixedClipping if cfg.dp == "server-fixed"
                   else flower.DifferentialPrivacyClientSideFixedClipping)
            return cls(strategy, noise_multiplier=noise, clipping_norm=cfg.dp_clipping_norm,
                       num_sampled_clients=sampled, accountant=accountant)
        adaptive: dict[str, Any] = {}
        if cfg.dp_clipping_norm is not None:
            adaptive["initial_clipping_norm"] = cfg.dp_clipping_norm
        if cfg.dp_target_quantile is not None:
            adaptive["target_clipped_quantile"] = cfg.dp_target_quantile
        if cfg.dp_clip_norm_lr is not None:
            adaptive["clip_norm_lr"] = cfg.dp_clip_norm_lr
        if cfg.dp_clipped_count_stddev is not None:
            adaptive["clipped_count_stddev"] = cfg.dp_clipped_count_stddev
        cls = (flower.DifferentialPrivacyServerSideAdaptiveClipping if cfg.dp == "server-adaptive"
               else flower.DifferentialPrivacyClientSideAdaptiveClipping)
        return cls(strategy, noise_multiplier=noise, num_sampled_clients=sampled, **adaptive)
    except ValueError as err:
        raise ConfigError(f"dp={cfg.dp}: {err}") from None


def accounting_note(cfg: RunConfig) -> str:
    """Why no epsilon is reported for ``cfg`` ("" when one is)."""
    if cfg.dp == "none":
        return ""
    if not cfg.dp.endswith("fixed"):
        return ("adaptive clipping: its clipping-norm updates spend privacy that Flower's "
                "accountant does not track, so no epsilon is reported")
    if cfg.strategy not in ("fedavg", "fedprox"):
        return (f"strategy={cfg.strategy} does not aggregate as FedAvg, which Flower's "
                "accountant requires, so no epsilon is reported")
    if not (cfg.dp_noise_multiplier or 0) > 0:
        return "dp-noise-multiplier=0 adds no noise: no privacy (epsilon is infinite)"
    return ""


def make_accountant(cfg: RunConfig, strategy: flower.Strategy) -> tuple[Any, str]:
    """Flower's RDP accountant for a fixed-clipping run, or None and the reason."""
    note = accounting_note(cfg)
    if note:
        return None, note
    from flwr.supercore.privacy_accounting import (
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    privacy = PrivacyConfig(target_delta=delta(cfg), population_size=cfg.num_clients,
                            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                            sampling_method=SamplingMethod.NO_AMPLIFICATION)
    return RdpAccountant(privacy), ""


def delta(cfg: RunConfig) -> float:
    """``dp-delta``, else 1 / N^1.1 (below 1/N, the usual choice for N clients)."""
    return cfg.dp_delta if cfg.dp_delta is not None else 1.0 / cfg.num_clients ** 1.1


def privacy_spent(strategy: flower.Strategy) -> dict[str, Any] | None:
    """``{"epsilon", "delta", "releases"}`` so far, if the strategy accounts privacy."""
    accountant = getattr(strategy, "accountant", None)
    if accountant is None or not accountant.num_releases:
        return None
    spent = accountant.get_privacy_spent()
    return {"epsilon": float(spent.epsilon), "delta": float(spent.delta),
            "releases": int(spent.num_releases)}


def forget_pending_release(strategy: flower.Strategy, server_round: int) -> None:
    """Flower's accounted wrappers refuse to configure a round twice; a retried attempt of a
    round (whose first attempt released nothing) configures it again."""
    pending = getattr(strategy, "_pending_events", None)
    if isinstance(pending, dict):
        pending.pop(server_round, None)


def client_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply Flower's client-side clipping mod to a train message that asks for it.

    Flower's mods expect one ArrayRecord per message; a first message of a FeDeRA client also
    carries the anchor, which the ClientApp keeps in the node's state anyway, so it is moved
    there before the mod runs. Other messages pass through untouched."""
    if msg.metadata.message_type != MessageType.TRAIN or "config" not in msg.content:
        return call_next(msg, context)
    config = msg.content["config"]
    if KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    from ..client_app import ANCHOR_KEY

    if "anchor" in msg.content:
        context.state[ANCHOR_KEY] = msg.content["anchor"]
        del msg.content["anchor"]
    mod = adaptiveclipping_mod if config.get(KEY_DP_MOD) == "adaptive" else fixedclipping_mod
    return mod(msg, context, call_next)


__all__ = ["accounting_note", "client_dp_mod", "delta", "forget_pending_release",
           "make_accountant", "privacy_spent", "wrap_dp"]
