"""Build the Hugging Face model: pretrained weights (local dir or hub id) or a fresh model from a config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, key: str = "model.dtype") -> torch.dtype:
    """The torch dtype a config's `key` names, or an error that lists the valid names."""
    if name not in DTYPES:
        raise ToolkitError(f"{key} '{name}' is not supported; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def build_model(
    auto_class: Any,
    name_or_path: str | None,
    config: dict | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    pad_token_id: int | None = None,
    attn_implementation: str | None = None,
    quantization_config: Any = None,
    device_map: Any = None,
    **model_kwargs: Any,
) -> PreTrainedModel:
    """`auto_class.from_pretrained(name_or_path)`, or `from_config` when `config` (with model_type) is given.

    `config` builds a randomly initialised model (tiny test models, training from scratch); `model_kwargs`
    go to both paths (e.g. num_labels for a classification head). `attn_implementation` (None: transformers'
    default, sdpa where the model has it) goes to both; `quantization_config` (a `BitsAndBytesConfig`, QLoRA's
    4-bit base) quantizes pretrained weights as they load, on `device_map`.
    """
    weights_dtype = torch_dtype(dtype)
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if trust_remote_code:
        log.warning(
            "model.trust_remote_code=true: code shipped with '%s' will run on this machine", name_or_path
        )
    if config is not None:
        config = dict(config)
        model_kwargs.pop("ignore_mismatched_sizes", None)  # a loading option: meaningless for a fresh model
        if "model_type" not in config:
            raise ToolkitError("model.config needs a model_type (e.g. llama, bert, gpt2, vit)")
        if quantization_config is not None:
            raise ToolkitError(
                "a 4-bit base (adapter=qlora) quantizes pretrained weights; model.config builds "
                "a random one: set model.name_or_path to a model directory and model.config=null"
            )
        hf_config = AutoConfig.for_model(config.pop("model_type"), **config, **model_kwargs)
        model = auto_class.from_config(
            hf_config, dtype=weights_dtype, trust_remote_code=trust_remote_code, **attention
        )
    else:
        check_source(name_or_path)
        if quantization_config is not None:
            model_kwargs.update(quantization_config=quantization_config, device_map=device_map)
        model = auto_class.from_pretrained(
            name_or_path,
            dtype=weights_dtype,
            trust_remote_code=trust_remote_code,
            **attention,
            **model_kwargs,
        )
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id  # classification heads find the last real token by it
    return model


def check_source(name_or_path: str | None) -> None:
    if not name_or_path:
        raise ToolkitError("model.name_or_path is empty; give a local model directory or a hub id")
    path = Path(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_local and not (path / "config.json").exists():
        raise ToolkitError(f"model.name_or_path '{name_or_path}' is not a model directory (no config.json)")


def load_tokenizer(name_or_path: str) -> Any:
    """`AutoTokenizer.from_pretrained`, refusing a local directory that holds no tokenizer in one line."""
    from transformers import AutoTokenizer

    path = Path(str(name_or_path))
    local = str(name_or_path).startswith((".", "/", "~")) or path.exists()
    if local and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ToolkitError(
            f"model.tokenizer '{name_or_path}' is not a tokenizer directory "
            "(no tokenizer.json or tokenizer_config.json)"
        )
    return AutoTokenizer.from_pretrained(name_or_path)


def linear_layers(model: torch.nn.Module, conv1d: bool = False) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every `nn.Linear`, the layers quantizers and pruning convert; `conv1d` adds GPT-2's
    `Conv1D` (a transposed linear layer that LoRA can target but torchao and torch's pruning cannot)."""
    kinds = (torch.nn.Linear, Conv1D) if conv1d else (torch.nn.Linear,)
    return [(name, module) for name, module in model.named_modules() if isinstance(module, kinds)]
