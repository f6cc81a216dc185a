"""The one source of truth for a run's settings.

A run is described by one flat dataclass, ``RunConfig``: its own fields are what every run has;
the settings of the method families and of the federation's strategies are their own config
dataclasses (``fedpeft.configs``: ``LoraConfig``, ``SLoRAConfig``, ...) that ``RunConfig`` is
composed of, so every setting is still one kebab-case key. Every field has a default that
follows the FeDeRA paper's protocol (arXiv 2404.18848, Sec. 5.1) where the paper gives one, and
every field can be set from a TOML file or from ``key=value`` overrides on the command line,
where keys are written in kebab case (``num-clients=100``; ``fedpeft.configs.keys`` reads them).
The config is validated once, here, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configs import (AdapterConfig, ConfigError, LoraConfig, RankedLoraConfig, SLoRAConfig,
                      StrategyConfig, TaskConfig, setting)
from .configs import keys
from .configs.base import check_finite
from .configs.base import kebab as _kebab
from .configs.lora import LORA_FAMILY, QUANTIZABLE  # noqa: F401 (their old home)


LR_SCHEDULES = ("constant", "cosine", "step")  # see schedule.py


# The settings groups a run is made of, in the order `--help-config` and config.toml list them:
# RunConfig's own (what every run has), then those each method family and the federation own.
GROUPS: tuple[type, ...] = (TaskConfig, LoraConfig, RankedLoraConfig, AdapterConfig,
                            SLoRAConfig, StrategyConfig)


@dataclass
class RunConfig(StrategyConfig, SLoRAConfig, AdapterConfig, RankedLoraConfig, LoraConfig,
                TaskConfig):
    """Everything a federated fine-tuning run needs. Keys on the CLI are kebab case.

    Its own fields are what every run has; the method families' and the federation's settings
    come from their config dataclasses (``fedpeft.configs``), so a run stays one flat set of keys.
    """

    # --- what to fine-tune -------------------------------------------------------------------
    task: str = setting(
        "semeval", "semeval | 20news | csv/jsonl/conll/squad-json (see `fedpeft tasks`)")
    method: str = setting("federa", "fedft | fedlr | federa | ... (see `fedpeft methods`)")
    model: str = setting("all-MiniLM-L6-v2", "the bundled encoder, a local path or a hub id")
    data_dir: str | None = setting(None, "else $FEDPEFT_DATA, else shared/data beside the repo")
    # --- federation (paper: 100 clients, 10 per round, Dirichlet alpha=1) -------------------
    rounds: int = setting(20, "federated rounds", resumable=True, structural=False)
    num_clients: int = setting(100, "clients the training data is split over")
    clients_per_round: int = setting(10, "clients sampled per round", structural=False)
    client_sampling: str = setting(
        "uniform", "uniform | size: a client's chance to be sampled proportional to its shard",
        structural=False)
    partition: str = setting(
        "balanced-dirichlet", "balanced-dirichlet | dirichlet | iid | shards | quantity (README)")
    alpha: float = setting(1.0, "Dirichlet concentration; smaller = more heterogeneous")
    classes_per_client: int | None = setting(None, "partition=shards: classes k of each client")
    quantity_alpha: float | None = setting(
        None, "partition=quantity: client sizes ~ Dirichlet(this) * n")
    quantity_exponent: float | None = setting(
        None, "partition=quantity: client j's size ~ (j+1)^this (power law)")
    min_size: int = setting(2, "every client gets at least this many training examples")
    seed: int = setting(0, "one seed for the partition, client sampling, init and local shuffles")
    eval_every: int = setting(
        1,
        "evaluate the global model on the test split every k rounds (and last)",
        structural=False)
    # --- local training (paper: 1 local epoch, batch 16, AdamW) -----------------------------
    local_epochs: int = setting(1, "local epochs per round", structural=False)
    batch_size: int = setting(16, "local batch size", structural=False)
    group_by_length: bool | None = setting(
        None, "local batches of rows of similar length (transformers' group_by_length): fewer "
        "pad tokens, same rows each epoch; None = the task's default (on for decoders' prompts)",
        structural=False)
    lr: float | None = setting(None, "None = the method's default learning rate", structural=False)
    lr_schedule: str = setting(
        "constant", "constant | cosine | step: the rate across rounds (schedule.py)",
        structural=False)
    lr_min: float = setting(0.0, "lr-schedule=cosine: the floor it decays to", structural=False)
    lr_schedule_rounds: int | None = setting(
        None, "cosine: rounds the decay spans; None = rounds at the start (kept on resume)",
        structural=False)
    lr_step_rounds: int = setting(
        10, "lr-schedule=step: multiply the rate by lr-step-gamma every k rounds", structural=False)
    lr_step_gamma: float = setting(0.1, "lr-schedule=step: the factor, in (0, 1]",
                                   structural=False)
    warmup_rounds: int = setting(
        0, "linear warm-up of the rate over the first k rounds (before the schedule)",
        structural=False)
    weight_decay: float = setting(0.0, "AdamW weight decay (>= 0)", structural=False)
    max_grad_norm: float = setting(1.0, "0 disables clipping", structural=False)
    max_length: int | None = setting(
        None, "None = the task's default (paper: SemEval 64, 20News 256)")
    eval_batch_size: int = setting(64, "batch size of evaluation", resumable=True, structural=False)
    # --- data size limits (for quick runs and tests) -----------------------------------------
    max_train_samples: int | None = setting(None, "a seeded random subset of n training examples")
    max_test_samples: int | None = setting(None, "a seeded random subset of n test examples")
    valid_fraction: float = setting(
        0.0, "hold out this share of train as a validation split (lr choice)")
    local_test_fraction: float = setting(
        0.0, "hold out this seeded share of every client's shard as its local test split "
        "(personalised evaluation; it does not train); docs/reports.md")
    local_valid_fraction: float = setting(
        0.0, "also hold out this seeded share of what every client trains on as its local "
        "validation split: a personalised method's learning rate is chosen on it")
    local_eval_clients: int = setting(
        0, "local-test-fraction: clients that score the model on their local split at each "
        "evaluation round; 0 = all, k = a seeded sample of k", structural=False)
    # --- transport --------------------------------------------------------------------------
    transport_dtype: str = setting(
        "fp32", "fp32 | fp16 | bf16: precision of the tensors on the wire")
    # --- failing clients and bad updates (see docs/deployment.md) ----------------------------
    round_timeout: float = setting(
        3600.0, "seconds a round waits for replies (later ones count as failed); 0 = for ever",
        resumable=True)
    min_train_clients: int = setting(
        1, "valid updates a round needs, else on-round-failure applies", resumable=True)
    on_round_failure: str = setting(
        "retry", "retry (new sample, up to round-retries, then skip) | skip", resumable=True)
    round_retries: int = setting(
        2, "extra attempts of a round that got too few valid updates", resumable=True)
    max_failed_rounds: int = setting(
        3, "stop the run (non-zero exit) after this many rounds in a row without a valid "
        "update; 0 = never", resumable=True, structural=False)
    max_update_norm: float = setting(
        100.0, "reject ||w_k - w|| > this * max(1, ||w||); 0 = no bound")
    fail_rate: float = setting(
        0.0, "TESTING AID: share of sampled clients that fail on purpose (seeded)")
    fail_mode: str = setting("raise", "TESTING AID: raise | hang (past round-timeout) | nan | huge")
    # --- runtime -----------------------------------------------------------------------------
    device: str = setting("cpu", "cpu | cuda | auto", resumable=True)
    # bf16 autocast is ~2x faster on CPUs with AVX512-BF16/AMX (BENCHMARKS.md); weights stay fp32
    precision: str = setting(
        "auto", "auto (bf16 autocast where the GPU or CPU has native bf16: AVX512-BF16/AMX; "
        "else fp32) | fp32 | bf16")
    threads: int = setting(
        0,
        "torch threads per simulated worker; 0 = all cores / workers",
        resumable=True, structural=False)
    sim_workers: str = setting(
        "auto",
        "Ray actors in the simulation, each holding one frozen base model: a number, or auto "
        "(CPU: one single-threaded worker per core, up to clients-per-round and what the memory "
        "holds; CUDA: one per GPU)",
        resumable=True, structural=False)
    sim_gpus_per_worker: float | None = setting(
        None, "CUDA simulation: GPU share of a worker (e.g. 0.5 = two per GPU); None = 1",
        resumable=True, structural=False)
    out: str = setting(
        "runs/{task}-{method}-a{alpha}-s{seed}",
        "run folder; {field} is filled in",
        resumable=True, structural=False)
    progress: bool = setting(True, "show a progress bar", resumable=True, structural=False)
    # --- experiment tracking (docs/reports.md); logging only, so a resume may change it --------
    track: str = setting(
        "none", "none | tensorboard | mlflow | tensorboard,mlflow: also log there",
        resumable=True, structural=False)
    track_uri: str | None = setting(
        None, "MLflow tracking URI; None = sqlite:///<run>/mlflow.db (no server)",
        resumable=True, structural=False)
    track_experiment: str | None = setting(
        None, "MLflow experiment name; None = the task", resumable=True, structural=False)

    # ------------------------------------------------------------------------------------------
    def validate(self) -> RunConfig:
        """Check cross-field consistency; raise ``ConfigError`` naming the offending key."""
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        positive = ["rounds", "num_clients", "clients_per_round", "local_epochs", "batch_size",
                    "eval_every", "eval_batch_size"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_kebab(name)} must be > 0, got {getattr(self, name)}")
        if self.sim_workers != "auto" and not (self.sim_workers.isdigit()
                                               and int(self.sim_workers) > 0):
            raise ConfigError(f"sim-workers must be auto or a number > 0, got "
                              f"{self.sim_workers!r}")
        if self.sim_gpus_per_worker is not None and not 0 < self.sim_gpus_per_worker <= 1:
            raise ConfigError(f"sim-gpus-per-worker must be in (0, 1], got "
                              f"{self.sim_gpus_per_worker}")
        nonnegative = ["weight_decay", "max_grad_norm", "threads", "max_failed_rounds"]
        for name in nonnegative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{_kebab(name)} must be >= 0, got {getattr(self, name)}")
        check_finite(self, "alpha", "weight_decay", "max_grad_norm", "round_timeout",
                     "max_update_norm", "valid_fraction")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if self.device in ("cuda",) or self.device.startswith("cuda:"):
            _check_cuda(self.device)
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients-per-round={self.clients_per_round} exceeds num-clients={self.num_clients}"
            )
        if not self.alpha > 0:
            raise ConfigError(f"alpha (Dirichlet concentration) must be > 0, got {self.alpha}")
        from .partition import check_partition_settings

        check_partition_settings(self)
        if self.min_size < 1:
            raise ConfigError(f"min-size must be >= 1, got {self.min_size}")
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError(f"max-length must be >= 8 tokens, got {self.max_length}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"valid-fraction must be in [0, 1), got {self.valid_fraction}")
        from .tracking import check_track

        check_track(self)
        self._validate_local_eval()
        self._validate_schedule()
        # the settings groups' own checks (fedpeft.configs), after the run-wide ones they use
        self.check_lora()
        self.check_ranked_lora()
        self.check_adapter()
        self.check_slora()
        self.check_strategy()
        from .methods import check_method_settings

        check_method_settings(self)  # a method's own combinations (fedsa-lora, rolora)
        self.check_task_settings()
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.transport_dtype not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"transport-dtype must be fp32, fp16 or bf16, got "
                              f"{self.transport_dtype!r}")
        for name in ("max_train_samples", "max_test_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{_kebab(name)} must be > 0, got {value}")
        if not 1 <= self.min_train_clients <= self.clients_per_round:
            raise ConfigError(f"min-train-clients must be in [1, clients-per-round="
                              f"{self.clients_per_round}], got {self.min_train_clients}")
        if self.on_round_failure not in ("retry", "skip"):
            raise ConfigError(f"on-round-failure must be retry or skip, got "
                              f"{self.on_round_failure!r}")
        if self.round_retries < 0 or self.round_timeout < 0 or self.max_update_norm < 0:
            raise ConfigError("round-retries, round-timeout and max-update-norm must be >= 0, "
                              f"got {self.round_retries}, {self.round_timeout}, "
                              f"{self.max_update_norm}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ConfigError(f"fail-rate must be in [0, 1], got {self.fail_rate}")
        if self.fail_mode not in ("raise", "hang", "nan", "huge"):
            raise ConfigError(f"fail-mode must be raise, hang, nan or huge, got {self.fail_mode!r}")
        if self.fail_mode == "hang" and self.fail_rate > 0 and not self.round_timeout > 0:
            raise ConfigError("fail-mode=hang needs round-timeout > 0 (else the round never ends)")
        from .methods import METHODS
        from .tasks import TASKS

        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is unknown; choose from {', '.join(TASKS)}")
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is unknown; choose from "
                              f"{', '.join(METHODS)}")
        self.run_dir()  # a bad out= placeholder fails here, wherever a config is loaded
        return self

    def _validate_local_eval(self) -> None:
        if not (math.isfinite(self.local_test_fraction) and 0.0 <= self.local_test_fraction < 1.0):
            raise ConfigError(f"local-test-fraction must be in [0, 1), got "
                              f"{self.local_test_fraction}")
        if not 0 <= self.local_eval_clients <= self.num_clients:
            raise ConfigError(f"local-eval-clients must be in [0 (all), num-clients="
                              f"{self.num_clients}], got {self.local_eval_clients}")
        if not (math.isfinite(self.local_valid_fraction)
                and 0.0 <= self.local_valid_fraction < 1.0):
            raise ConfigError(f"local-valid-fraction must be in [0, 1), got "
                              f"{self.local_valid_fraction}")
        if self.local_valid_fraction and not self.local_test_fraction:
            raise ConfigError("local-valid-fraction needs local-test-fraction > 0 (the clients "
                              "score their local splits at the rounds that evaluate them)")
        if self.local_eval_clients and not self.local_test_fraction:
            raise ConfigError("local-eval-clients needs local-test-fraction > 0 (the clients' "
                              "local test splits it scores on)")

    def _validate_schedule(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr-schedule must be {', '.join(LR_SCHEDULES)}, got "
                              f"{self.lr_schedule!r}")
        if self.client_sampling not in ("uniform", "size"):
            raise ConfigError(f"client-sampling must be uniform or size, got "
                              f"{self.client_sampling!r}")
        if not (math.isfinite(self.lr_min) and self.lr_min >= 0):
            raise ConfigError(f"lr-min must be a finite number >= 0, got {self.lr_min}")
        if self.lr is not None and self.lr_min > self.lr:
            raise ConfigError(f"lr-min={self.lr_min} exceeds lr={self.lr}")
        if self.lr_step_rounds <= 0:
            raise ConfigError(f"lr-step-rounds must be > 0, got {self.lr_step_rounds}")
        if not 0.0 < self.lr_step_gamma <= 1.0:
            raise ConfigError(f"lr-step-gamma must be in (0, 1], got {self.lr_step_gamma}")
        if self.warmup_rounds < 0:
            raise ConfigError(f"warmup-rounds must be >= 0, got {self.warmup_rounds}")
        if self.lr_schedule_rounds is not None and self.lr_schedule_rounds <= 0:
            raise ConfigError(f"lr-schedule-rounds must be > 0, got {self.lr_schedule_rounds}")
        horizon = self.lr_schedule_rounds or self.rounds
        if self.lr_schedule == "cosine" and self.warmup_rounds >= horizon:
            raise ConfigError(f"warmup-rounds={self.warmup_rounds} leaves no round of the cosine "
                              f"decay (lr-schedule-rounds or rounds = {horizon})")

    def resolved(self, saved: Mapping[str, Any] | None = None) -> RunConfig:
        """This config with the defaults that depend on other settings fixed, once, at the start
        of a run, so that they cannot move when ``rounds`` changes on a resume or an extension.

        ``saved``: the resolved config of the run being continued (``to_dict()`` form); its
        values win. A run saved before a default was resolved falls back to the method state
        it logged (``slora-stage1-rounds`` from the checkpoint)."""
        cfg = dataclasses.replace(self)
        cfg.resolve_slora(saved)
        if cfg.lr_schedule == "cosine" and cfg.lr_schedule_rounds is None:
            earlier = (saved or {}).get("lr-schedule-rounds")
            cfg.lr_schedule_rounds = int(earlier) if earlier else cfg.rounds
        return cfg

    def run_dir(self) -> Path:
        """The run folder: ``out`` with its ``{setting}`` placeholders (``{alpha}``,
        ``{num-clients}``) filled in; ``ConfigError`` for an unknown or malformed one."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Path(keys.fill_placeholders("out", self.out, values))

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping of every field (None values included), in ``ordered_fields``'
        order."""
        return {_kebab(f.name): getattr(self, f.name) for f in ordered_fields()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_mapping(json.loads(text))

    @classmethod
    def from_mapping(cls, values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Build a config from already-typed values (TOML, JSON), checking every key."""
        cfg = dataclasses.replace(base) if base is not None else cls()
        for key, value in values.items():
            name = keys.field_name(cls, key)
            setattr(cfg, name, keys.coerce(cls, name, value))
        return cfg


def to_toml(cfg: RunConfig) -> str:
    """Write the resolved config as TOML (None values are left out, as TOML has no null)."""
    lines = []
    for key, value in cfg.to_dict().items():
        if value is None:
            lines.append(f"# {key} = (unset)")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: RunConfig | None = None) -> RunConfig:
    """Read an optional TOML file, then apply ``key=value`` overrides, then validate."""
    cfg = dataclasses.replace(base) if base is not None else RunConfig()
    if path is not None:
        data = keys.read_toml(path)
        cfg = RunConfig.from_mapping(data, base=cfg)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        name = keys.field_name(RunConfig, key.strip())
        setattr(cfg, name, keys.parse(RunConfig, name, raw.strip()))
    return cfg.validate()


# --- helpers ------------------------------------------------------------------------------------

def own_fields(cls: type) -> list[dataclasses.Field]:
    """The fields ``cls`` declares itself (not those it inherits)."""
    own = cls.__dict__.get("__annotations__", {})
    return [f for f in dataclasses.fields(cls) if f.name in own]


def ordered_fields() -> list[dataclasses.Field]:
    """Every setting: RunConfig's own (what every run has), then each group of ``GROUPS``."""
    return [f for cls in (RunConfig, *GROUPS) for f in own_fields(cls)]


def describe_fields() -> str:
    """One line per setting with its default and help text, for ``--help-config``: RunConfig's
    own, then each settings group under its dataclass's name and summary (its docstring)."""
    lines = []
    for cls in (RunConfig, *GROUPS):
        if cls is not RunConfig:
            lines.append(f"{cls.__name__} ({cls.__module__}): {(cls.__doc__ or '').strip()}")
        for f in own_fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            lines.append(f"  {_kebab(f.name):<22} {default!r:<40} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def resumable_settings() -> frozenset[str]:
    """Kebab-case names of the settings a continued run may change (see ``setting``)."""
    return frozenset(_kebab(f.name) for f in dataclasses.fields(RunConfig)
                     if f.metadata.get("resumable"))


def non_structural_settings() -> frozenset[str]:
    """Kebab-case names of the settings a cached runtime survives a change of."""
    return frozenset(_kebab(f.name) for f in dataclasses.fields(RunConfig)
                     if not f.metadata.get("structural", True))


def differing_settings(saved: Mapping[str, Any], cfg: RunConfig) -> list[str]:
    """Kebab-case settings, other than the resumable ones, whose value in ``saved`` (a
    ``to_dict()`` of the run being continued or reused) differs from ``cfg``'s. A setting that
    ``saved`` lacks (a run made by an older fedpeft) counts as its default then."""
    current, defaults = cfg.to_dict(), RunConfig().to_dict()
    skip = resumable_settings()
    return sorted(key for key in current if key not in skip
                  and _same_value(saved.get(key, defaults[key])) != _same_value(current[key]))


def _same_value(value: Any) -> Any:
    """Values as TOML/JSON round trips leave them (ints and floats compare equal)."""
    if isinstance(value, list):
        return tuple(value)
    return value


def _check_cuda(device: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"device={device}: CUDA is not available on this machine (torch "
                          f"{torch.__version__}); use device=cpu or device=auto")
    index = device.partition(":")[2]
    if index and not (index.isdigit() and int(index) < torch.cuda.device_count()):
        raise ConfigError(f"device={device}: this machine has {torch.cuda.device_count()} CUDA "
                          "device(s)")


__all__ = ["GROUPS", "ConfigError", "RunConfig", "describe_fields", "differing_settings",
           "field", "load_config", "non_structural_settings", "ordered_fields",
           "resumable_settings", "setting", "to_toml"]
