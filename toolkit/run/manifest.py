"""Checksums for exported artifacts: `manifest.json` beside the files, verified before they are loaded.

A truncated or altered weight file then fails with one line naming it, instead of loading garbage or
failing deep inside a deserialiser.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from toolkit.errors import ToolkitError

MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record size and sha256 of every file under `directory` (written last, inside the atomic write)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps({"files": entries}, indent=2) + "\n")


def verify_manifest(directory: Path) -> None:
    """Raise a ToolkitError naming the first file that is missing, truncated or changed."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        raise ToolkitError(f"{directory} has no {MANIFEST}: it was not written completely; rerun its stage")
    for name, expected in json.loads(manifest.read_text())["files"].items():
        path = directory / name
        if not path.is_file():
            raise ToolkitError(f"{path} is missing (listed in {manifest}); rerun the stage that wrote it")
        size = path.stat().st_size
        if size != expected["bytes"] or sha256(path) != expected["sha256"]:
            raise ToolkitError(
                f"{path} is corrupted: {size} bytes, sha256 differs from {manifest} "
                f"(expected {expected['bytes']} bytes); rerun the stage that wrote it"
            )
