"""Export a finished run's global model for use outside fedpeft.

    fedpeft export RUN_DIR --format peft   --out DIR   # LoRA family: a PEFT adapter folder
    fedpeft export RUN_DIR --format merged --out DIR   # every method but fedap: a full model

The run folder's ``config.toml`` rebuilds the run's model (pretrained encoder, seeded head, the
method applied; FeDeRA's anchor recomputed, SLoRA's stage restored from the last round's
``method-state`` in ``rounds.jsonl``), and ``final_state.safetensors`` is loaded into it.

- ``peft`` (fedlr, federa, ffa-lora, slora after its switch): ``save_pretrained`` of the PEFT
  model, task head included (``modules_to_save``); load with
  ``PeftModel.from_pretrained(AutoModelFor<Task>.from_pretrained(base, num_labels=...), DIR)``.
  FeDeRA trains on a residual base W - s*B0@A0, so its adapter is first converted to a plain
  LoRA adapter of rank 2r on the *original* pretrained weights, with PEFT's PiSSA->LoRA identity
  s*(B@A - B0@A0) = s*[B | -B0] @ [A ; A0] (``pissa_to_lora``; alpha doubles with r, so s is
  unchanged). We apply the identity ourselves rather than through ``save_pretrained(...,
  path_initial_model_for_weight_conversion=...)`` because that path keeps only the LoRA tensors
  and drops ``modules_to_save`` (the trained classification head).
- ``merged``: LoRA merged into the weights (``merge_and_unload``), SLoRA's sparse deltas folded
  in, then ``save_pretrained``: loads with ``AutoModelFor<Task>.from_pretrained(DIR)``. FedAP's
  adapters are extra nonlinear modules that no transformers architecture has, so they cannot be
  merged; use its ``final_state.safetensors`` with fedpeft.

Both folders also get the tokenizer and ``fedpeft-export.json`` (method, base model, head size).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .config import load_config
from .errors import FedpeftError
from .federation.runtime import Runtime
from .methods.adapter import Adapted
from .methods.lora import lora_layers
from .methods.slora import sparse_layers
from .models import load_model, resolve_model_path
from .runlog import load_state, read_rounds

FORMATS = ("peft", "merged")


def pissa_to_lora(a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor,
                  b0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of rank 2r whose product is ``B@A - B0@A0``: A' = [A ; A0] (2r, d_in) and
    B' = [B | -B0] (d_out, 2r), as in PEFT's ``LoraModel.subtract_mutated_init``."""
    return torch.cat([a, a0], dim=0), torch.cat([b, -b0], dim=1)


def load_run(run_dir: str | Path) -> tuple[Runtime, dict[str, torch.Tensor] | None]:
    """The run's global model on the CPU (in ``runtime.model``) and its anchor, if any."""
    run = Path(run_dir)
    check_run(run)
    runtime = Runtime(load_config(run / "config.toml", ["device=cpu"]))
    try:
        rounds = read_rounds(run)
    except (ValueError, OSError) as err:
        raise ExportError(f"{run / 'rounds.jsonl'}: cannot be read ({err}); expected one JSON "
                          "object per line, as fedpeft writes it") from None
    states = [r["method-state"] for r in rounds if isinstance(r, dict) and "method-state" in r]
    if states:
        runtime.method.load_state_dict(states[-1], runtime)
    anchor = runtime.method.make_anchor(runtime.model)
    final = run / "final_state.safetensors"
    try:
        state = load_state(final)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ExportError(f"{final}: not a readable safetensors file ({_first_line(err)})"
                          ) from None
    try:
        runtime.method.import_state(runtime.model, state)
    except (KeyError, ValueError, RuntimeError) as err:
        raise ExportError(f"{final} does not match the model that {run / 'config.toml'} "
                          f"describes ({_first_line(err)})") from None
    return runtime, anchor


class ExportError(FedpeftError, ValueError):
    """The run folder cannot be exported, or the output folder is not a place to write to."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_run(run: Path) -> None:
    """Raise ``ExportError`` unless ``run`` is a finished run folder."""
    if not run.is_dir():
        raise ExportError(f"{run} is not a finished run folder: "
                          f"{'it is a file' if run.exists() else 'no such folder'}")
    for name in ("config.toml", "final_state.safetensors"):
        if not (run / name).is_file():
            raise ExportError(f"{run} is not a finished run folder: {name} is missing")


def check_output(run_dir: str | Path, out: str | Path) -> None:
    """Refuse an output folder that would overwrite something: the run folder itself or a
    folder inside a run folder, a file, or a non-empty folder that is not an earlier export."""
    from .runlog import is_run_folder

    out, run = Path(out), Path(run_dir)
    resolved = out.resolve()
    for folder in (resolved, *resolved.parents):
        if is_run_folder(folder) or folder == run.resolve():
            raise ExportError(f"--out {out} is inside the run folder {folder}; write the export "
                              "elsewhere (run folders are never written into)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; expected a folder to write (new or empty)")
    if out.is_dir() and any(out.iterdir()) and not (out / "fedpeft-export.json").exists():
        raise ExportError(f"--out {out} is a folder that holds other files; expected a new or "
                          "empty folder (or an earlier fedpeft export, which is replaced)")


def export_run(run_dir: str | Path, fmt: str, out: str | Path) -> Path:
    """Write the run's global model to ``out`` in format ``peft`` or ``merged``."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    check_run(Path(run_dir))
    check_output(run_dir, out)
    runtime, anchor = load_run(run_dir)
    out = Path(out)
    model = peft_model(runtime, anchor) if fmt == "peft" else merged_model(runtime)
    model.save_pretrained(out)
    runtime.tokenizer.save_pretrained(out)
    task = runtime.task
    info: dict[str, Any] = {
        "method": runtime.cfg.method, "format": fmt, "run": str(run_dir),
        "base-model": resolve_model_path(runtime.cfg.model),
        "auto-class": task.auto_model_class().__name__,
        "model-kwargs": {k: v for k, v in task.model_kwargs().items() if k != "label2id"},
    }
    (out / "fedpeft-export.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def peft_model(runtime: Runtime, anchor: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """The run's PEFT model, on the original pretrained weights (FeDeRA converted)."""
    from peft import PeftModel

    model = runtime.model
    if not isinstance(model, PeftModel):
        raise ExportError(f"{runtime.cfg.method} is not a LoRA-family method, so it has no PEFT "
                          "adapter; use --format merged")
    if getattr(runtime.method, "merges_base", False):  # flora, fedex-lora
        raise ExportError(f"{runtime.cfg.method} folds updates into the frozen weights, which an "
                          "adapter on the pretrained model cannot carry; use --format merged")
    return plain_lora(runtime, anchor) if anchor else model


def plain_lora(runtime: Runtime, anchor: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A rank-2r LoRA model on the pretrained W equal to FeDeRA's (residual + rank-r) model."""
    import copy

    from peft import get_peft_model

    trained = runtime.model
    config = copy.deepcopy(trained.peft_config["default"])
    # the same scaling s at rank 2r: alpha/r doubles alpha, rsLoRA's alpha/sqrt(r) by sqrt(2)
    config.r = 2 * config.r
    config.lora_alpha = (math.sqrt(2) if config.use_rslora else 2) * config.lora_alpha
    config.init_lora_weights = True
    config.inference_mode = False
    base = load_model(runtime.cfg.model, runtime.task.auto_model_class(), seed=runtime.cfg.seed,
                      **runtime.task.model_kwargs())
    plain = get_peft_model(base, config)
    targets = lora_layers(plain)  # same module names as in the trained model
    with torch.no_grad():
        for name, layer in lora_layers(trained).items():
            a, b = pissa_to_lora(layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                 anchor[f"{name}.lora_A.default.weight"],
                                 anchor[f"{name}.lora_B.default.weight"])
            targets[name].lora_A["default"].weight.copy_(a)
            targets[name].lora_B["default"].weight.copy_(b)
        heads = {k: v for k, v in trained.state_dict().items()  # + DoRA's magnitudes
                 if ".modules_to_save." in k or ".lora_magnitude_vector." in k}
        missing = set(heads) - set(plain.state_dict())
        if missing:
            raise RuntimeError(f"head tensors not found in the converted model: {sorted(missing)}")
        plain.load_state_dict(heads, strict=False)
    return plain


def merged_model(runtime: Runtime) -> torch.nn.Module:
    """The run's model as a plain transformers model (LoRA merged, sparse deltas folded in)."""
    from peft import PeftModel
    from torch.nn.utils import parametrize

    model = runtime.model
    if any(isinstance(m, Adapted) for m in model.modules()):
        raise ExportError(f"{runtime.cfg.method}'s bottleneck adapters are nonlinear modules "
                          "that cannot be merged into the encoder's weights (and PEFT has no "
                          "Houlsby adapters); use the run's final_state.safetensors with fedpeft")
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    for layer in sparse_layers(model).values():
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return model
