"""Hydra-composed recipes that fine-tune Hugging Face models with PyTorch Lightning."""

import logging as _logging
import os as _os
import warnings as _warnings

import torch as _torch

# Importing transformers pulls in torchao, which logs warnings about optional CUDA kernels (and torch about
# its pytree registrations) on every run; PEFT pulls in bitsandbytes, which on CPUs with AVX512-BF16 logs that
# an optional hub kernel package is missing (its fallback is the kernel training uses anyway). All harmless
# on any machine, so keep them out of users' output.
for _name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

# Deprecation chatter between pinned libraries (torchdata -> torch, lightning -> torch, peft -> transformers).
for _message in (
    "'set_vital' is deprecated",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    "`is_gradient_checkpointing` is deprecated",
):
    _warnings.filterwarnings("ignore", message=_message)

# Without this DeepSpeed probes for an accelerator and warns that it fell back to the CPU on every CPU run.
if not _torch.cuda.is_available():
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")

__version__ = "0.1.0"
