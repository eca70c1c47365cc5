"""Secrets from the environment (W&B key, HF token, any *_KEY / *_TOKEN / *_SECRET / *_PASSWORD) never
reach a saved config, a logger's hyperparameters or a report: their values are replaced by `***`."""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_NAME = re.compile(
    r"(_KEY|_TOKEN|_SECRET|_PASSWORD)$|^(HF_TOKEN|WANDB_API_KEY|HUGGING_FACE_HUB_TOKEN)$"
)
MIN_LENGTH = 6  # shorter values ("1", "true") would redact ordinary settings


def secret_values() -> list[str]:
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k.upper()) and len(v) >= MIN_LENGTH}
    return sorted(values, key=len, reverse=True)  # longest first: a secret containing another is whole


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """`value` (nested dicts/lists/strings) with every secret value replaced by `***`."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    return value
