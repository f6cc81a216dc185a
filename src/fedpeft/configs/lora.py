"""The LoRA family's settings (``methods/lora.py`` and the methods built on it), and those of the
methods with a LoRA rank per client (``methods/lora_family.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ConfigError, check_finite, setting

LORA_FAMILY = ("fedlr", "federa", "ffa-lora", "slora")  # the methods lora-dora/-rslora apply to
QUANTIZABLE = ("fedlr", "ffa-lora")  # the methods quantize=4bit applies to (frozen base as is)
SVD_STARTS = ("fedsa-lora", "rolora", "fedex-lora", "flexlora")  # the methods lora-init applies to


@dataclass
class LoraConfig:
    """LoRA family (paper: r=32, alpha=32 on query and value)"""

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
    quantize: str = setting(
        "none", "none | 4bit: QLoRA-style NF4 base (bitsandbytes; CUDA; fedlr, ffa-lora)")

    def check_lora(self) -> None:
        """Checked as part of a ``RunConfig`` (``method`` and ``device`` are the run's)."""
        method = getattr(self, "method", None)
        if self.lora_rank <= 0:
            raise ConfigError(f"lora-rank must be > 0, got {self.lora_rank}")
        check_finite(self, "lora_alpha", "lora_dropout")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora-alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora-dropout must be in [0, 1), got {self.lora_dropout}")
        variants = [name for name, on in (("lora-dora", self.lora_dora),
                                          ("lora-rslora", self.lora_rslora)) if on]
        if variants and method not in LORA_FAMILY:
            raise ConfigError(f"{' and '.join(variants)} apply to the LoRA family "
                              f"({', '.join(LORA_FAMILY)}), not method={method}")
        if self.lora_init not in ("gaussian", "svd"):
            raise ConfigError(f"lora-init must be gaussian or svd, got {self.lora_init!r}")
        if self.lora_init != "gaussian" and method not in SVD_STARTS:
            raise ConfigError(f"lora-init={self.lora_init} applies to method="
                              f"{', '.join(SVD_STARTS)} (fedlr is the gaussian start, federa the "
                              f"svd one), not method={method}")
        self._check_quantize(method)

    def _check_quantize(self, method: str | None) -> None:
        if self.quantize not in ("none", "4bit"):
            raise ConfigError(f"quantize must be none or 4bit, got {self.quantize!r}")
        if self.quantize != "4bit":
            return
        if method not in QUANTIZABLE:
            raise ConfigError(f"quantize=4bit (a frozen 4-bit base, QLoRA) works with "
                              f"{', '.join(QUANTIZABLE)}: method={method} changes the "
                              "frozen weights themselves (FeDeRA's residual, SLoRA's sparse "
                              "stage) or trains them all")
        import torch

        device = getattr(self, "device", "cpu")
        if device == "cpu" or not torch.cuda.is_available():
            raise ConfigError(f"quantize=4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels); "
                              f"this run has device={device}"
                              f"{'' if torch.cuda.is_available() else ' and no CUDA'}; "
                              "use quantize=none on a CPU")


@dataclass
class RankedLoraConfig:
    """LoRA rank per client: flora, flexlora, hetlora (methods/lora_family.py)"""

    client_ranks: str | None = setting(
        None, "flora/flexlora/hetlora: LoRA rank per client, 4,8,16,32 (each client one of "
        "them, seeded, balanced) or table:r0,r1,... (one per partition); each <= lora-rank")
    hetlora_gamma: float = setting(
        0.99, "hetlora: rank self-pruning keeps max(1, floor(gamma * r)) components")
    hetlora_lambda: float = setting(
        1e-3, "hetlora: weight of the pruning regulariser on the tail components; 0 = no pruning")

    def check_ranked_lora(self) -> None:
        """The ranks against the run's method, lora-rank and clients (lora_family.py)."""
        from ..methods import METHODS
        from ..methods.lora_family import check_client_ranks

        method = METHODS.get(getattr(self, "method", None))
        check_client_ranks(self, getattr(method, "heterogeneous_ranks", False))
