"""The settings each method family and the federation layer own, one config dataclass each
(as PEFT's tuners own theirs: ``LoraConfig``).

| dataclass | settings of | file |
|---|---|---|
| ``LoraConfig`` | the LoRA family (fedlr, federa, ffa-lora, slora, 2024-26 ones) | ``lora.py`` |
| ``RankedLoraConfig`` | flora, flexlora, hetlora: ranks per client, pruning | ``lora.py`` |
| ``SLoRAConfig`` | slora's sparse first stage | ``slora.py`` |
| ``AdapterConfig`` | fedap's Houlsby adapters | ``adapter.py`` |
| ``StrategyConfig`` | Flower strategy, server optimiser, robust rules, DP | ``strategy.py`` |
| ``TaskConfig`` | bring-your-own files, NER, QA, generative tasks | ``tasks.py`` |

``fedpeft.config.RunConfig`` keeps what every run has and is composed of these (dataclass
inheritance), so that a run is still one flat set of kebab-case keys (``lora-rank=8``) and one
TOML file. Each dataclass checks its own fields (``check_<name>``); ``RunConfig.validate`` calls
them; ``keys.py`` reads the keys from the command line, TOML and JSON into their typed
fields. These modules import nothing of fedpeft's but ``errors``, so that the config can be read
without loading torch, the models or the methods.
"""

from .adapter import AdapterConfig
from .base import ConfigError, setting
from .lora import LoraConfig, RankedLoraConfig
from .slora import SLoRAConfig
from .strategy import StrategyConfig
from .tasks import TaskConfig

__all__ = ["AdapterConfig", "ConfigError", "LoraConfig", "RankedLoraConfig", "SLoRAConfig",
           "StrategyConfig", "TaskConfig", "setting"]
