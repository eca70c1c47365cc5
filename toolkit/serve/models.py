"""Which saved variant of a run is served, checked before anything loads, and loading it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from toolkit.errors import ToolkitError
from toolkit.layout import VARIANT_DIRS, saved_variants
from toolkit.run.manifest import verify_manifest


def variant_dir(run_dir: Path, variant: str) -> Path:
    """The folder of `variant` in the run, its manifest verified; a one-line error naming what exists."""
    if variant not in VARIANT_DIRS:
        raise ToolkitError(
            f"serve.variant={variant} is not a model variant; valid: {', '.join(VARIANT_DIRS)}"
        )
    saved = saved_variants(run_dir)
    if variant not in saved:
        present = ", ".join(saved) or "none: run the export stage first (stages=[export])"
        raise ToolkitError(
            f"from_run={run_dir} has no {variant} model ({VARIANT_DIRS[variant]}); it has: {present}"
        )
    verify_manifest(saved[variant].parent)  # a truncated weight file is named here, not deep in loading
    return saved[variant]


def load_served(model_dir: str | Path, device: str | None = None, tokenizer_only: bool = False) -> Any:
    """(model in eval mode, tokenizer) of a saved causal LM, or the tokenizer alone."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer_only:
        return tokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if device and device != "cpu" and not getattr(model, "is_quantized", False):
        model = model.to(device)
    return model.eval(), tokenizer
