"""The one source of truth for a run's settings.

A run is described by a single flat dataclass, ``RunConfig``. Every field has a default that
follows the FeDeRA paper's protocol (arXiv 2404.18848, Sec. 5.1) where the paper gives one, and
every field can be set from a TOML file or from ``key=value`` overrides on the command line,
where keys are written in kebab case (``num-clients=100``). The config is validated once, here,
before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FedpeftError


class ConfigError(FedpeftError, ValueError):
    """A setting is unknown, malformed or inconsistent with another one."""


@dataclass
class RunConfig:
    """Everything a federated fine-tuning run needs. Keys on the CLI are kebab case."""

    # --- what to fine-tune -------------------------------------------------------------------
    task: str = "semeval"  # semeval | 20news | csv/jsonl/conll/squad-json (see `fedpeft tasks`)
    method: str = "federa"  # fedft | fedlr | federa | ... (see `fedpeft methods`)
    model: str = "all-MiniLM-L6-v2"  # the bundled encoder, a local path or a hub id
    data_dir: str | None = None  # else $FEDPEFT_DATA, else shared/data beside the repo
    # --- federation (paper: 100 clients, 10 per round, Dirichlet alpha=1) -------------------
    rounds: int = 20
    num_clients: int = 100
    clients_per_round: int = 10
    alpha: float = 1.0  # Dirichlet concentration; smaller = more heterogeneous
    min_size: int = 2  # every client gets at least this many training examples
    seed: int = 0  # one seed for the partition, client sampling, init and local shuffles
    eval_every: int = 1  # evaluate the global model on the test split every k rounds (and last)
    # --- local training (paper: 1 local epoch, batch 16, AdamW) -----------------------------
    local_epochs: int = 1
    batch_size: int = 16
    lr: float | None = None  # None = the method's default learning rate
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_length: int | None = None  # None = the task's default (paper: SemEval 64, 20News 256)
    eval_batch_size: int = 64
    # --- LoRA family (paper: r=32, alpha=32 on query and value) ------------------------------
    lora_rank: int = 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None  # None = query/value of the architecture
    # --- FedAP adapters and SLoRA's sparse first stage (see docs/methods.md) -----------------
    adapter_reduction: int = 16  # FedAP bottleneck width = hidden size / this (FedPETuning: 16)
    adapter_modules: list[str] | None = None  # FedAP sites under each layer; None = attn/FFN outs
    slora_stage1_rounds: int | None = None  # SLoRA sparse rounds, then LoRA; None = rounds//4 (>=1)
    slora_density: float = 0.01  # SLoRA stage 1: share of each target matrix that trains (~1%)
    slora_stage1_lr: float | None = None  # None = SLoRA's stage-1 default (lr applies to stage 2)
    # --- data size limits (for quick runs and tests) -----------------------------------------
    max_train_samples: int | None = None  # a seeded random subset of n training examples
    max_test_samples: int | None = None  # a seeded random subset of n test examples
    valid_fraction: float = 0.0  # hold out this share of train as a validation split (lr choice)
    # --- bring-your-own data -----------------------------------------------------------------
    train_file: str | None = None
    test_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    token_column: int = 0  # conll-files: 0-based column of the token
    tag_column: int = -1  # conll-files: 0-based column of the BIO tag (-1 = last)
    skip_invalid: bool = False  # conll-files/squad-files: skip bad sentences/questions (counted)
    ner_max_classes: int = 16  # NER partition classes: 15 commonest entity sets + "other"; 0=all
    doc_stride: int = 128  # QA: tokens shared by consecutive sliding windows (paper L=384)
    max_answer_length: int = 30  # QA: longest predicted answer span, in tokens
    n_best: int = 20  # QA: start and end candidates per window considered in post-processing
    # --- aggregation and transport (beyond the papers) ----------------------------------------
    aggregation: str = "fedavg"  # fedavg | exact-lora (mean of s*B*A refactored by SVD)
    transport_dtype: str = "fp32"  # fp32 | fp16 | bf16: precision of the tensors on the wire
    # --- failing clients and bad updates (see docs/deployment.md) ----------------------------
    round_timeout: float = 0.0  # seconds a round waits for replies; later ones fail; 0 = no limit
    min_train_clients: int = 1  # valid updates a round needs, else on-round-failure applies
    on_round_failure: str = "retry"  # retry (new sample, up to round-retries, then skip) | skip
    round_retries: int = 2  # extra attempts of a round that got too few valid updates
    max_update_norm: float = 100.0  # reject ||w_k - w|| > this * max(1, ||w||); 0 = no bound
    fail_rate: float = 0.0  # TESTING AID: share of sampled clients that fail on purpose (seeded)
    fail_mode: str = "raise"  # TESTING AID: raise | hang (past round-timeout) | nan | huge
    # --- runtime -----------------------------------------------------------------------------
    device: str = "cpu"  # cpu | cuda | auto
    # bf16 autocast is ~2x faster on CPUs with AVX512-BF16/AMX (BENCHMARKS.md); weights stay fp32
    precision: str = "auto"  # auto (bf16 autocast on CUDA if supported, else fp32) | fp32 | bf16
    threads: int = 0  # torch threads per simulated worker; 0 = all cores / workers
    sim_workers: int = 1  # Ray actors in the simulation; each holds one frozen base model
    out: str = "runs/{task}-{method}-a{alpha}-s{seed}"  # run folder; {field} is filled in
    progress: bool = True

    # ------------------------------------------------------------------------------------------
    def validate(self) -> RunConfig:
        """Check cross-field consistency; raise ``ConfigError`` naming the offending key."""
        positive = ["rounds", "num_clients", "clients_per_round", "local_epochs", "batch_size",
                    "eval_every", "lora_rank", "eval_batch_size", "sim_workers"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_kebab(name)} must be > 0, got {getattr(self, name)}")
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients-per-round={self.clients_per_round} exceeds num-clients={self.num_clients}"
            )
        if not self.alpha > 0:
            raise ConfigError(f"alpha (Dirichlet concentration) must be > 0, got {self.alpha}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora-alpha must be > 0, got {self.lora_alpha}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.min_size < 1:
            raise ConfigError(f"min-size must be >= 1, got {self.min_size}")
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError(f"max-length must be >= 8 tokens, got {self.max_length}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"valid-fraction must be in [0, 1), got {self.valid_fraction}")
        if self.aggregation not in ("fedavg", "exact-lora"):
            raise ConfigError(f"aggregation must be fedavg or exact-lora, got {self.aggregation!r}")
        if self.adapter_reduction <= 0:
            raise ConfigError(f"adapter-reduction must be > 0, got {self.adapter_reduction}")
        if not 0.0 < self.slora_density <= 1.0:
            raise ConfigError(f"slora-density must be in (0, 1], got {self.slora_density}")
        r1 = self.slora_stage1_rounds
        if r1 is not None and not 1 <= r1 <= self.rounds:
            raise ConfigError(f"slora-stage1-rounds must be in [1, rounds={self.rounds}], got "
                              f"{self.slora_stage1_rounds}")
        if self.slora_stage1_lr is not None and not self.slora_stage1_lr > 0:
            raise ConfigError(f"slora-stage1-lr must be > 0, got {self.slora_stage1_lr}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.transport_dtype not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"transport-dtype must be fp32, fp16 or bf16, got "
                              f"{self.transport_dtype!r}")
        for name in ("max_train_samples", "max_test_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{_kebab(name)} must be > 0, got {value}")
        if self.max_answer_length <= 0 or self.n_best <= 0 or self.doc_stride < 0:
            raise ConfigError("max-answer-length and n-best must be > 0 and doc-stride >= 0, got "
                              f"{self.max_answer_length}, {self.n_best}, {self.doc_stride}")
        if self.ner_max_classes == 1 or self.ner_max_classes < 0:
            raise ConfigError(f"ner-max-classes must be 0 (keep all) or >= 2, got "
                              f"{self.ner_max_classes}")
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
        return self

    def run_dir(self) -> Path:
        """The run folder, with ``{field}`` placeholders of ``out`` filled in."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Path(self.out.format(**values))

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping of every field (None values included)."""
        return {_kebab(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

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
            name = _field_name(key)
            setattr(cfg, name, _coerce(name, value))
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
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
        # Allow a [fedpeft] table or a flat file.
        data = data.get("fedpeft", data)
        cfg = RunConfig.from_mapping(data, base=cfg)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        name = _field_name(key.strip())
        setattr(cfg, name, _parse(name, raw.strip()))
    return cfg.validate()


# --- helpers ------------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_TYPES = typing.get_type_hints(RunConfig)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _field_name(key: str) -> str:
    name = key.replace("-", "_")
    if name not in _FIELDS:
        known = [_kebab(n) for n in _FIELDS]
        close = difflib.get_close_matches(_kebab(name), known, n=3, cutoff=0.75)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"unknown setting {key!r}{hint} (see `fedpeft run --help-config`)")
    return name


def _base_type(name: str) -> tuple[Any, bool]:
    """The field's type without Optional, and whether None is allowed."""
    tp = _TYPES[name]
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def _parse(name: str, raw: str) -> Any:
    """Parse a command-line string for field ``name``."""
    tp, optional = _base_type(name)
    if optional and raw.lower() in ("", "none", "null"):
        return None
    if typing.get_origin(tp) is list:
        return [s.strip() for s in raw.split(",") if s.strip()]
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{_kebab(name)} must be true or false, got {raw!r}")
    try:
        return tp(raw)
    except ValueError:
        raise ConfigError(f"{_kebab(name)} must be {tp.__name__}, got {raw!r}") from None


def _coerce(name: str, value: Any) -> Any:
    """Check a typed value (from TOML/JSON) against field ``name``."""
    tp, optional = _base_type(name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{_kebab(name)} cannot be empty")
    if isinstance(value, str) and tp is not str:
        return _parse(name, value)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{_kebab(name)} must be a list, got {value!r}")
        return [str(v) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{_kebab(name)} must be {tp.__name__}, got {value!r}")
    return value


def describe_fields() -> str:
    """One line per setting with its default, for ``--help-config``."""
    import inspect
    import re

    source = inspect.getsource(RunConfig)
    comments = dict(re.findall(r"^\s+(\w+):[^=\n]+=[^#\n]*#\s*(.+)$", source, flags=re.M))
    lines = []
    for f in dataclasses.fields(RunConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(f"  {_kebab(f.name):<22} {default!r:<40} {comments.get(f.name, '')}")
    return "\n".join(lines)


__all__ = ["ConfigError", "RunConfig", "describe_fields", "field", "load_config", "to_toml"]
