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
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FedpeftError


class ConfigError(FedpeftError, ValueError):
    """A setting is unknown, malformed or inconsistent with another one."""


LORA_FAMILY = ("fedlr", "federa", "ffa-lora", "slora")  # the methods lora-dora/-rslora apply to
LR_SCHEDULES = ("constant", "cosine", "step")  # see schedule.py
QUANTIZABLE = ("fedlr", "ffa-lora")  # the methods quantize=4bit applies to (frozen base as is)


def setting(default: Any, help: str = "", *, resumable: bool = False,
            structural: bool = True) -> Any:
    """A ``RunConfig`` field with its help text and what it may change.

    ``resumable``: it steers how the remaining rounds are run, not what the run computes, so a
    resumed run, or a finished run that ``fedpeft compare`` reuses, may differ in it (every other
    setting must be equal, else the runs are different runs). ``structural=False``: the model,
    the data and the partition do not depend on it, so a process's cached runtime survives a
    change of it (``federation/runtime.py``).
    """
    return field(default=default,
                 metadata={"help": help, "resumable": resumable, "structural": structural})


@dataclass
class RunConfig:
    """Everything a federated fine-tuning run needs. Keys on the CLI are kebab case."""

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
    # --- LoRA family (paper: r=32, alpha=32 on query and value) ------------------------------
    lora_rank: int = setting(32, "LoRA rank r")
    lora_alpha: float = setting(32.0, "LoRA alpha (s = alpha / r; alpha / sqrt(r) if rsLoRA)")
    lora_dropout: float = setting(0.0, "LoRA dropout")
    lora_dora: bool = setting(
        False, "LoRA family: DoRA (PEFT use_dora), a trained magnitude per output row")
    lora_rslora: bool = setting(
        False, "LoRA family: rsLoRA scaling s = alpha / sqrt(r) (PEFT use_rslora)")
    target_modules: list[str] | None = setting(None, "None = query/value of the architecture")
    lora_init: str = setting(
        "gaussian", "fedsa-lora/rolora/fedex-lora/flexlora: gaussian (FedLR's A ~ N(0, 1/r^2), "
        "B = 0) | svd (FeDeRA's A, B from the SVD of W, residual frozen); docs/methods.md")
    client_ranks: str | None = setting(
        None, "flora/flexlora/hetlora: LoRA rank per client, 4,8,16,32 (each client one of "
        "them, seeded, balanced) or table:r0,r1,... (one per partition); each <= lora-rank")
    hetlora_gamma: float = setting(
        0.99, "hetlora: rank self-pruning keeps max(1, floor(gamma * r)) components")
    hetlora_lambda: float = setting(
        1e-3, "hetlora: weight of the pruning regulariser on the tail components; 0 = no pruning")
    # --- FedAP adapters and SLoRA's sparse first stage (see docs/methods.md) -----------------
    adapter_reduction: int = setting(
        16, "FedAP bottleneck width = hidden size / this (FedPETuning: 16)")
    adapter_modules: list[str] | None = setting(
        None, "FedAP sites under each layer; None = attn/FFN outs")
    slora_stage1_rounds: int | None = setting(
        None, "SLoRA sparse rounds, then LoRA; None = rounds//4 (>=1)")
    slora_density: float = setting(
        0.01, "SLoRA stage 1: share of each target matrix that trains (~1%)")
    slora_stage1_lr: float | None = setting(
        None, "None = SLoRA's stage-1 default (lr applies to stage 2)")
    # --- data size limits (for quick runs and tests) -----------------------------------------
    max_train_samples: int | None = setting(None, "a seeded random subset of n training examples")
    max_test_samples: int | None = setting(None, "a seeded random subset of n test examples")
    valid_fraction: float = setting(
        0.0, "hold out this share of train as a validation split (lr choice)")
    local_test_fraction: float = setting(
        0.0, "hold out this seeded share of every client's shard as its local test split "
        "(personalised evaluation; it does not train); docs/reports.md")
    local_eval_clients: int = setting(
        0, "local-test-fraction: clients that score the model on their local split at each "
        "evaluation round; 0 = all, k = a seeded sample of k", structural=False)
    # --- bring-your-own data -----------------------------------------------------------------
    train_file: str | None = setting(None, "*-files tasks: the training file")
    test_file: str | None = setting(None, "*-files tasks: the test file")
    text_column: str = setting("text", "text-files: the column of the text")
    label_column: str = setting("label", "text-files: the column of the label")
    token_column: int = setting(0, "conll-files: 0-based column of the token")
    tag_column: int = setting(-1, "conll-files: 0-based column of the BIO tag (-1 = last)")
    skip_invalid: bool = setting(
        False, "conll-files/squad-files: skip bad sentences/questions (counted)")
    ner_max_classes: int = setting(
        16, 'NER partition classes: 15 commonest entity sets + "other"; 0=all')
    doc_stride: int = setting(128, "QA: tokens shared by consecutive sliding windows (paper L=384)")
    max_answer_length: int = setting(30, "QA: longest predicted answer span, in tokens")
    n_best: int = setting(
        20, "QA: start and end candidates per window considered in post-processing")
    # --- generative tasks on decoders (squad-gen, instruct-files; docs/tasks.md) --------------
    gen_eval_samples: int | None = setting(
        200, "squad-gen/instruct-files: seeded test subset scored (loss + greedy generation); "
        "None = all")
    max_new_tokens: int = setting(
        32, "squad-gen/instruct-files: longest generated answer, in tokens", resumable=True,
        structural=False)
    instruct_format: str = setting(
        "auto", "instruct-files: auto | alpaca (instruction/input/output) | dolly "
        "(instruction/context/response) | messages (chat)")
    partition_field: str | None = setting(
        None, "instruct-files: field holding the partition class (e.g. category); None = k-means")
    quantize: str = setting(
        "none", "none | 4bit: QLoRA-style NF4 base (bitsandbytes; CUDA; fedlr, ffa-lora)")
    # --- aggregation and transport (beyond the papers) ----------------------------------------
    aggregation: str = setting("fedavg", "fedavg | exact-lora (mean of s*B*A refactored by SVD)")
    strategy: str = setting("fedavg", "a Flower strategy by name (see `fedpeft strategies`)")
    server_lr: float | None = setting(
        None, "fedavgm/fedadam/fedyogi/fedadagrad: server learning rate; None = Flower's default")
    server_momentum: float | None = setting(None, "fedavgm: server momentum")
    beta_1: float | None = setting(None, "fedadam/fedyogi: first-moment decay")
    beta_2: float | None = setting(None, "fedadam/fedyogi: second-moment decay")
    tau: float | None = setting(None, "fedadam/fedyogi/fedadagrad: adaptivity (epsilon)")
    proximal_mu: float | None = setting(None, "fedprox: weight mu of (mu/2)||w - w_global||^2")
    trim_beta: float | None = setting(None, "fedtrimmedavg: share trimmed at each end")
    num_malicious_nodes: int | None = setting(
        None, "krum/multikrum/bulyan: hostile clients tolerated")
    num_nodes_to_select: int | None = setting(None, "multikrum: updates averaged")
    qffl_q: float | None = setting(None, "qfedavg: fairness exponent q")
    dp: str = setting("none", "none | server-fixed | client-fixed | server-adaptive | "
                      "client-adaptive: Flower's DP wrappers")
    dp_noise_multiplier: float | None = setting(
        None, "dp: Gaussian noise std / clipping norm")
    dp_clipping_norm: float | None = setting(
        None, "dp: L2 clipping norm of a client's update (adaptive: the initial one, 0.1)")
    dp_target_quantile: float | None = setting(
        None, "dp adaptive: share of updates left unclipped (Flower: 0.5)")
    dp_clip_norm_lr: float | None = setting(None, "dp adaptive: clipping norm's learning rate")
    dp_clipped_count_stddev: float | None = setting(
        None, "dp adaptive: noise std of the clipped-update count (Flower: clients-per-round/20)")
    dp_delta: float | None = setting(
        None, "dp fixed: delta of the reported epsilon; None = 1 / num-clients^1.1")
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
        "(CPU: one with every core; CUDA: one per GPU)",
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
                    "eval_every", "lora_rank", "eval_batch_size"]
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
        nonnegative = ["weight_decay", "max_grad_norm", "threads", "max_failed_rounds",
                       "doc_stride"]
        for name in nonnegative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{_kebab(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("alpha", "lora_alpha", "weight_decay", "max_grad_norm", "lora_dropout",
                     "round_timeout", "max_update_norm", "valid_fraction", "slora_density"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{_kebab(name)} must be a finite number, got "
                                  f"{getattr(self, name)}")
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
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora-alpha must be > 0, got {self.lora_alpha}")
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
        from .federation.strategies import check_strategy_settings

        check_strategy_settings(self)
        from .tracking import check_track

        check_track(self)
        if self.dp_delta is not None and not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp-delta must be in (0, 1), got {self.dp_delta}")
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
        self._validate_lora_variants()
        self._validate_local_eval()
        from .methods import check_method_settings

        check_method_settings(self)  # a method's own combinations (fedsa-lora, rolora)
        from .methods import METHODS
        from .methods.lora_family import check_client_ranks

        check_client_ranks(self, getattr(METHODS.get(self.method), "heterogeneous_ranks", False))
        self._validate_schedule()
        self._validate_generation()
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
        from .methods import METHODS
        from .tasks import TASKS

        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is unknown; choose from {', '.join(TASKS)}")
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is unknown; choose from "
                              f"{', '.join(METHODS)}")
        self.run_dir()  # a bad out= placeholder fails here, wherever a config is loaded
        return self

    def _validate_lora_variants(self) -> None:
        variants = [name for name, on in (("lora-dora", self.lora_dora),
                                          ("lora-rslora", self.lora_rslora)) if on]
        if variants and self.method not in LORA_FAMILY:
            raise ConfigError(f"{' and '.join(variants)} apply to the LoRA family "
                              f"({', '.join(LORA_FAMILY)}), not method={self.method}")

    def _validate_generation(self) -> None:
        if self.gen_eval_samples is not None and self.gen_eval_samples <= 0:
            raise ConfigError(f"gen-eval-samples must be > 0 (or none), got "
                              f"{self.gen_eval_samples}")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"max-new-tokens must be > 0, got {self.max_new_tokens}")
        if self.instruct_format not in ("auto", "alpaca", "dolly", "messages"):
            raise ConfigError(f"instruct-format must be auto, alpaca, dolly or messages, got "
                              f"{self.instruct_format!r}")
        if self.quantize not in ("none", "4bit"):
            raise ConfigError(f"quantize must be none or 4bit, got {self.quantize!r}")
        if self.quantize == "4bit":
            if self.method not in QUANTIZABLE:
                raise ConfigError(f"quantize=4bit (a frozen 4-bit base, QLoRA) works with "
                                  f"{', '.join(QUANTIZABLE)}: method={self.method} changes the "
                                  "frozen weights themselves (FeDeRA's residual, SLoRA's sparse "
                                  "stage) or trains them all")
            import torch

            if self.device == "cpu" or not torch.cuda.is_available():
                raise ConfigError(f"quantize=4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels); "
                                  f"this run has device={self.device}"
                                  f"{'' if torch.cuda.is_available() else ' and no CUDA'}; "
                                  "use quantize=none on a CPU")

    def _validate_local_eval(self) -> None:
        if not (math.isfinite(self.local_test_fraction) and 0.0 <= self.local_test_fraction < 1.0):
            raise ConfigError(f"local-test-fraction must be in [0, 1), got "
                              f"{self.local_test_fraction}")
        if not 0 <= self.local_eval_clients <= self.num_clients:
            raise ConfigError(f"local-eval-clients must be in [0 (all), num-clients="
                              f"{self.num_clients}], got {self.local_eval_clients}")
        if self.local_eval_clients and not self.local_test_fraction:
            raise ConfigError("local-eval-clients needs local-test-fraction > 0 (the clients' "
                              "local test splits it scores on)")
        if self.lora_init not in ("gaussian", "svd"):
            raise ConfigError(f"lora-init must be gaussian or svd, got {self.lora_init!r}")
        svd_starts = ("fedsa-lora", "rolora", "fedex-lora", "flexlora")
        if self.lora_init != "gaussian" and self.method not in svd_starts:
            raise ConfigError(f"lora-init={self.lora_init} applies to method="
                              f"{', '.join(svd_starts)} (fedlr is the gaussian start, federa the "
                              f"svd one), not method={self.method}")

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
        if self.strategy == "qfedavg" and (self.lr_schedule != "constant" or self.warmup_rounds):
            raise ConfigError("strategy=qfedavg uses one client learning rate for the whole run "
                              "(L = 1/lr); use lr-schedule=constant and warmup-rounds=0 with it")

    def resolved(self, saved: Mapping[str, Any] | None = None) -> RunConfig:
        """This config with the defaults that depend on other settings fixed, once, at the start
        of a run, so that they cannot move when ``rounds`` changes on a resume or an extension.

        ``saved``: the resolved config of the run being continued (``to_dict()`` form); its
        values win. A run saved before a default was resolved falls back to the method state
        it logged (``slora-stage1-rounds`` from the checkpoint)."""
        cfg = dataclasses.replace(self)
        if cfg.method == "slora" and cfg.slora_stage1_rounds is None:
            earlier = (saved or {}).get("slora-stage1-rounds")
            cfg.slora_stage1_rounds = int(earlier) if earlier else max(1, cfg.rounds // 4)
        if cfg.lr_schedule == "cosine" and cfg.lr_schedule_rounds is None:
            earlier = (saved or {}).get("lr-schedule-rounds")
            cfg.lr_schedule_rounds = int(earlier) if earlier else cfg.rounds
        return cfg

    def run_dir(self) -> Path:
        """The run folder: ``out`` with its ``{setting}`` placeholders (``{alpha}``,
        ``{num-clients}``) filled in; ``ConfigError`` for an unknown or malformed one."""
        import string

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        usage = ("placeholders are {setting}, e.g. {task} or {num-clients}; write {{ and }} for "
                 "a literal brace")
        try:
            pieces = list(string.Formatter().parse(self.out))
        except ValueError as err:
            raise ConfigError(f"out={self.out!r}: {err} ({usage})") from None
        parts = []
        for literal, name, spec, conversion in pieces:
            parts.append(literal)
            if name is None:
                continue
            key = name.replace("-", "_")
            if key not in values:
                close = difflib.get_close_matches(_kebab(key), map(_kebab, values), n=2)
                hint = f" (did you mean {' or '.join(close)}?)" if close else ""
                what = f"unknown setting {{{name}}}{hint}" if name else "an empty placeholder {}"
                raise ConfigError(f"out={self.out!r}: {what}; {usage}; settings: "
                                  f"{', '.join(_kebab(n) for n in values)}")
            value = values[key]
            try:
                if conversion:
                    value = {"r": repr, "a": ascii, "s": str}[conversion](value)
                parts.append(format(value, spec or ""))
            except KeyError:
                raise ConfigError(f"out={self.out!r}: unknown conversion !{conversion} in "
                                  f"{{{name}!{conversion}}} (!s, !r or !a)") from None
            except (ValueError, TypeError) as err:
                raise ConfigError(f"out={self.out!r}: {{{name}:{spec}}}: {err}") from None
        if not "".join(parts).strip():
            raise ConfigError("out is empty; expected the path of a run folder")
        return Path("".join(parts))

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
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a folder; expected a TOML file") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}); "
                              "expected a TOML file") from None
        except OSError as err:
            raise ConfigError(f"config file {path}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
        # Allow a [fedpeft] table or a flat file.
        data = data.get("fedpeft", data)
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: `fedpeft` must be a table of settings, got "
                              f"{data!r}")
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
    if tp is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # sim-workers = 2 in a TOML file
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
    """One line per setting with its default and help text, for ``--help-config``."""
    lines = []
    for f in dataclasses.fields(RunConfig):
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


__all__ = ["ConfigError", "RunConfig", "describe_fields", "differing_settings", "field",
           "load_config", "non_structural_settings", "resumable_settings", "setting", "to_toml"]
