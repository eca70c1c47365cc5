"""Post-training quantization of a saved Hugging Face model, written back in a form `from_pretrained` loads.

Quantization goes through transformers' own quantizer integrations (`TorchAoConfig` for torchao,
`BitsAndBytesConfig` for NF4) so the result round-trips through `save_pretrained`/`from_pretrained` with no
code of ours on the loading side. The recipe's `quantize` group names the backend config; this module adds
what only the model can tell: which layers are linear, which tensor is the word embedding, whether the LM
head is tied to it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel, TorchAoConfig

from toolkit.errors import ToolkitError
from toolkit.models.build import linear_layers, torch_dtype

WEIGHT_FILES = (".safetensors", ".bin", ".pt")


def embedding_names(model: PreTrainedModel) -> tuple[str | None, str | None]:
    """Module names of the input word embedding and of the output embedding (LM head), None where absent."""
    modules = {id(module): name for name, module in model.named_modules()}
    try:
        inputs = model.get_input_embeddings()
    except NotImplementedError:  # a model over pixels or features (the seed MLP) has no token embedding
        inputs = None
    outputs = model.get_output_embeddings()
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

    torch_dtype(q.dtype, "quantize.dtype")
    instantiate(q.quantization_config)(["probe"], "embedding" if q.include_embeddings else None)
    return check_device(q.name, list(q.devices), q.get("reason", "its kernels"))


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
    most of the bytes (half of MiniLM's). A head tied to the embedding stays tied: it is not listed as a
    linear layer, so the embedding's quantized weight serves both (save with `save_quantized`). The weights
    load in `dtype` before they are quantized (torchao's int4 layout takes bfloat16 only).
    """
    load_dtype = torch_dtype(dtype, "quantize.dtype")
    with torch.device("meta"):
        skeleton = auto_class.from_config(AutoConfig.from_pretrained(source))
    linears = [name for name, _ in linear_layers(skeleton)]
    if not linears:
        raise ToolkitError(
            f"{source} ({type(skeleton).__name__}) has no nn.Linear layers to quantize; "
            "quantization converts linear layers (use quantize=none for this model)"
        )
    embedding, head = embedding_names(skeleton)
    if not include_embeddings or _tied(skeleton):
        linears = [name for name in linears if name != head]  # tied: quantized as the embedding
    if not include_embeddings:
        embedding = None
    config = build_config(linears, embedding)
    if device == "cpu" and getattr(config, "load_in_4bit", False):
        check_4bit_cpu_widths(skeleton, linears)
    device_map = None if device == "cpu" else device
    load = {"quantization_config": config, "device_map": device_map, "dtype": load_dtype}
    return auto_class.from_pretrained(source, **load).eval()


def check_4bit_cpu_widths(skeleton: PreTrainedModel, linears: list[str]) -> None:
    """bitsandbytes' CPU inference kernel repacks each 4-bit weight by blocks of 64 input features: a layer
    narrower or not a multiple of that fails at its first forward, so it is refused before anything loads."""
    modules = dict(skeleton.named_modules())
    widths = sorted({modules[name].in_features for name in linears if modules[name].in_features % 64})
    if widths:
        raise ToolkitError(
            f"4-bit quantization on CPU needs linear layers whose input width is a multiple of 64 "
            f"(bitsandbytes' CPU kernel); {type(skeleton).__name__} has widths {widths}: quantize on a "
            "GPU, or use quantize=int8_weight_only"
        )


def _tied(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config.get_text_config(decoder=True), "tie_word_embeddings", False))


def save_quantized(model: PreTrainedModel, target: Path, **save_kwargs: Any) -> None:
    """`model.save_pretrained(target, **save_kwargs)`, each tied weight stored once.

    transformers writes torchao's quantized tensors as their flattened parts (`lm_head._weight_qdata`, ...),
    which its de-duplication of tied weights does not see: a tied LM head would be stored a second time
    (SmolLM2: 0.31x instead of 0.25x fp32). The copies are dropped here; `from_pretrained` ties the head
    back to the embedding as for any checkpoint without it.
    """
    model.save_pretrained(target, **save_kwargs)
    tied = [
        name
        for name, source in getattr(model, "all_tied_weights_keys", {}).items()
        if model.get_parameter(name) is model.get_parameter(source)
    ]
    if tied:
        drop_saved_tensors(target, tied)


def drop_saved_tensors(directory: Path, names: list[str]) -> None:
    """Remove parameters (`lm_head.weight`, also as flattened parts `lm_head._weight_*`) from the
    safetensors files of a saved model, with their torchao metadata and shard-index entries."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    prefixes = tuple(f"{name.rpartition('.')[0]}._{name.rpartition('.')[2]}_" for name in names)

    def dropped(key: str) -> bool:
        return key in names or key.startswith(prefixes)

    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            if not any(dropped(key) for key in keys):
                continue  # a shard without them stays as written
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in keys if not dropped(key)}
        metadata = {key: value for key, value in metadata.items() if key not in names}
        if "tensor_names" in metadata:  # torchao's list of the (unflattened) tensors in this file
            kept = [key for key in json.loads(metadata["tensor_names"]) if key not in names]
            metadata["tensor_names"] = json.dumps(kept)
        save_file(tensors, path, metadata=metadata)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        content = json.loads(index.read_text())
        content["weight_map"] = {k: v for k, v in content["weight_map"].items() if not dropped(k)}
        index.write_text(json.dumps(content, indent=2))


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
