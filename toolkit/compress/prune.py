"""Magnitude pruning of a saved model's linear layers with `torch.nn.utils.prune`.

Pruning here zeroes weights in place: the tensors keep their shape, so the saved model is as large as before
and runs no faster (dense kernels); what it buys is sparsity that a sparse runtime or a later structural step
can use. The report says so beside the numbers.
"""

from __future__ import annotations

import torch
from torch.nn.utils import prune
from transformers import PreTrainedModel

from toolkit.errors import ToolkitError
from toolkit.models.build import linear_layers


def body_linears(model: PreTrainedModel) -> list[tuple[str, torch.nn.Linear]]:
    """Linear layers inside the model's base (e.g. `bert.`, `model.`): task heads (classifier, LM head) are
    left alone, since zeroing rows of a 2-way classifier removes a class. A model without a separate base
    (the seed MLP) keeps its `classifier`."""
    linears = linear_layers(model)
    prefix = model.base_model_prefix
    if prefix and hasattr(model, prefix):
        return [(name, module) for name, module in linears if name.startswith(f"{prefix}.")]
    return [(name, module) for name, module in linears if module is not getattr(model, "classifier", None)]


def prune_model(model: PreTrainedModel, amount: float, structured: bool = False) -> dict[str, float]:
    """Zero `amount` of the body's linear weights, permanently; returns the sparsity reached.

    Unstructured: the globally smallest |w| over all body linears (L1). Structured: in each layer, the output
    rows (neurons) with the smallest L2 norm.
    """
    if not 0.0 < amount < 1.0:
        raise ToolkitError(f"prune.amount={amount} must be a fraction between 0 and 1 (e.g. 0.3)")
    layers = body_linears(model)
    if not layers:
        raise ToolkitError(f"{type(model).__name__} has no linear layers to prune")
    if structured:
        for _, module in layers:
            prune.ln_structured(module, "weight", amount=amount, n=2, dim=0)
    else:
        params = [(module, "weight") for _, module in layers]
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    for _, module in layers:
        prune.remove(module, "weight")  # bake the mask into the weight: a plain model again
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    total = sum(m.weight.numel() for _, m in layers)
    return {"sparsity": zeros / total, "layers": len(layers), "pruned_weights": zeros}
