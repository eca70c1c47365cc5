"""Post-training quantization of a saved Hugging Face model, written back in a form `from_pretrained` loads.

Quantization goes through transformers' own quantizer integrations (`TorchAoConfig` for torchao,
`BitsAndBytesConfig` for NF4) so the result round-trips through `save_pretrained`/`from_pretrained` with no
code of ours on the loading side. The recipe's `quantize` group names the backend config; this module adds
what only the model can tell: which layers are linear, which tensor is the word embedding, whether the LM
head is tied to it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel, TorchAoConfig

from toolkit.errors import ToolkitError
from toolkit.models import DTYPES

WEIGHT_FILES = (".safetensors", ".bin", ".pt")


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Names of the model's `nn.Linear` modules (what every quantization backend here converts)."""
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def embedding_names(model: PreTrainedModel) -> tuple[str | None, str | None]:
    """Module names of the input word embedding and of the output embedding (LM head), None where absent."""
    modules = {id(module): name for name, module in model.named_modules()}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return (
        modules.get(id(inputs)) if inputs is not None else None,
        modules.get(id(outputs)) if outputs is not None else None,
    )


def torchao_config(
    linears: list[str],
    embedding: str | None,
    linear: Any,
    embeddings: Any = None,
) -> TorchAoConfig:
    """A `TorchAoConfig` with `linear` (a torchao AOBaseConfig) on each named linear weight and `embeddings`
    on the word embedding when one is given.

    Entries name each `.weight` exactly: a catch-all entry would also convert biases, whose quantized add
    torchao does not implement.
    """
    from torchao.quantization import FqnToConfig

    per_weight = {f"{name}.weight": linear for name in linears}
    if embedding is not None and embeddings is not None:
        per_weight[f"{embedding}.weight"] = embeddings
    return TorchAoConfig(FqnToConfig(per_weight), include_input_output_embeddings=embeddings is not None)


def bitsandbytes_config(linears: list[str], embedding: str | None, **kwargs: Any) -> Any:
    """transformers' `BitsAndBytesConfig(**kwargs)` (bitsandbytes converts every linear layer itself)."""
    from transformers import BitsAndBytesConfig

    if embedding is not None:
        # 4-bit has no embedding kind: only a tied LM head would be converted, as an extra untied copy
        raise ToolkitError(
            "quantize.include_embeddings=true is not supported with bitsandbytes 4-bit (it converts linear "
            "layers only); set quantize.include_embeddings=false"
        )

    return BitsAndBytesConfig(**kwargs)


def check_quantize_config(q: Any) -> str:
    """A quantize config checked before any stage runs (else a bad one fails only after training): its load
    dtype, its options (a trial build of its quantization config) and its device; returns the device."""
    from hydra.utils import instantiate

    check_dtype(q.dtype)
    instantiate(q.quantization_config)(["probe"], "embedding" if q.include_embeddings else None)
    return check_device(q.name, list(q.devices), q.get("reason", "its kernels"))


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ToolkitError(f"quantize.dtype '{dtype}' is not supported; valid: {', '.join(DTYPES)}")


def check_device(name: str, devices: list[str], reason: str) -> str:
    """The device to quantize on: CPU when the config runs there, else CUDA if present, else a clear error."""
    if "cpu" in devices:
        return "cpu"
    if "cuda" in devices and torch.cuda.is_available():
        return "cuda"
    raise ToolkitError(
        f"quantize={name} needs a CUDA GPU ({reason}); this machine has none. "
        "On CPU use quantize=int8_dynamic or quantize=int8_weight_only"
    )


def quantize_model(
    source: Path,
    auto_class: Any,
    build_config: Callable[..., Any],
    include_embeddings: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
) -> PreTrainedModel:
    """Load `source` (a `save_pretrained` directory) quantized; returns the quantized model in eval mode.

    `build_config(linears, embedding)` returns the transformers quantization config. With
    `include_embeddings`, the word embedding and the LM head are quantized too: on small models they are
    most of the bytes (half of MiniLM's). A head tied to the embedding is untied first (same values),
    because transformers' check of tied weights cannot compare quantized tensors. The weights load in `dtype`
    before they are quantized (torchao's int4 layout takes bfloat16 only).
    """
    check_dtype(dtype)
    with torch.device("meta"):
        skeleton = auto_class.from_config(AutoConfig.from_pretrained(source))
    linears = linear_layer_names(skeleton)
    if not linears:
        raise ToolkitError(
            f"{source} ({type(skeleton).__name__}) has no nn.Linear layers to quantize; "
            "quantization converts linear layers (use quantize=none for this model)"
        )
    embedding, head = embedding_names(skeleton)
    if not include_embeddings:
        linears = [name for name in linears if name != head]
        embedding = None
    config = build_config(linears, embedding)
    device_map = None if device == "cpu" else device
    load = {"quantization_config": config, "device_map": device_map, "dtype": DTYPES[dtype]}
    if include_embeddings and head is not None and _tied(skeleton):
        with tempfile.TemporaryDirectory(prefix="untied-") as tmp:
            untie_embeddings(source, auto_class, Path(tmp))
            return auto_class.from_pretrained(tmp, **load).eval()
    return auto_class.from_pretrained(source, **load).eval()


def _tied(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config.get_text_config(decoder=True), "tie_word_embeddings", False))


def untie_embeddings(source: Path, auto_class: Any, target: Path) -> None:
    """Save `source` again with its LM head as its own copy of the word embedding."""
    model = auto_class.from_pretrained(source)
    model.config.get_text_config(decoder=True).tie_word_embeddings = False
    weight = model.get_input_embeddings().weight.detach().clone()
    model.get_output_embeddings().weight = torch.nn.Parameter(weight)
    model.save_pretrained(target)


def weights_size_bytes(model_dir: Path) -> int:
    """Bytes of the weight files in a saved model directory: the size on disk that deployment pays."""
    return sum(f.stat().st_size for f in model_dir.iterdir() if f.name.endswith(WEIGHT_FILES))


def model_card(
    *, source: Path, config_name: str, config: Any, auto_class: Any, target: Path, gate: dict | None
) -> str:
    """README.md for `quantize/model`: what it is, how it was made, how to load it."""
    import torchao
    import transformers

    lines = [
        f"# {config_name}: post-training quantized model",
        "",
        f"- source (fp32): `{source}`",
        f"- quantization: `{type(config).__name__}` via transformers {transformers.__version__}, "
        f"torchao {torchao.__version__}",
        f"- config: `{config.to_dict() if hasattr(config, 'to_dict') else config}`"[:2000],
    ]
    if gate:
        lines.append(
            f"- validation {gate['metric']}: {gate['quantized']:.4f} quantized vs {gate['source']:.4f} "
            f"before quantization (allowed drop {gate['max_metric_drop']})"
        )
    lines += [
        "",
        "## Load",
        "",
        "```python",
        f"from transformers import {auto_class.__name__}",
        f'model = {auto_class.__name__}.from_pretrained("{target}")',
        "```",
        "",
        "Loading needs the quantization library installed (the config travels in config.json).",
        "On CPU, torchao's int8 layers are not faster than fp32 in eager mode; run the model under",
        "`torch.compile(model)` for lower latency (compiled once per input shape).",
        "",
    ]
    return "\n".join(lines)
