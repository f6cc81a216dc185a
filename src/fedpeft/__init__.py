"""fedpeft: federated parameter-efficient fine-tuning of pretrained encoders on Flower.

Implements FeDeRA (Yan et al., 2024, arXiv 2404.18848), SLoRA (Babakniya et al., 2023,
arXiv 2308.06522) and their baselines (full fine-tuning, BitFit, adapters, LoRA).
"""

__version__ = "0.1.0"
