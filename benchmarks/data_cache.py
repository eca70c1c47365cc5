"""Tokenization runs once: `datasets` caches every split's map, so a second run loads it instead.

For each recipe's data module, two fresh processes set the data up one after the other against an empty
`HF_DATASETS_CACHE`: the first loads the csv, splits and tokenizes (chat template for SFT); the second finds
all of it in the cache.

    python -m benchmarks --only data_cache
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from hydra.utils import instantiate

from benchmarks.harness import Result

RECIPES = {
    "quickstart": "recipe=quickstart",
    "smollm2_sft": "recipe=nlp/smollm2_lora_sft",
    "sharegpt_mix": "recipe=nlp/smollm2_chat_sft",  # 11,205 ShareGPT chats + 999 alpaca rows, packed
}


def setup_seconds(override: str, cache: str) -> float:
    """Seconds one fresh process spends in the data module's setup, with `cache` as the datasets cache."""
    env = {**os.environ, "HF_DATASETS_CACHE": cache}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.data_cache", override], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"data setup failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["setup_seconds"]


def main(tiny: bool = False) -> Result:
    recipes = {"quickstart": RECIPES["quickstart"]} if tiny else RECIPES
    rows, figures = [], {}
    for name, override in recipes.items():
        with tempfile.TemporaryDirectory() as cache:
            first, cached = setup_seconds(override, cache), setup_seconds(override, cache)
        figures[f"data_cache.{name}.cached_over_first"] = cached / first
        figures[f"data_cache.{name}.first_seconds"] = first
        rows.append(
            {"data": name, "first run s": first, "second run s": cached, "second / first": cached / first}
        )
    command = "toolkit-train <recipe> ... twice with an empty HF_DATASETS_CACHE (data module setup timed)"
    notes = "Setup = load csv + fixed split + tokenize (+ chat template), rows of the full dataset."
    return Result("Data: tokenization cached by datasets", command, rows, figures, notes)


if __name__ == "__main__":
    from benchmarks.overhead import job_config

    data = instantiate(job_config([sys.argv[1]]).data)
    started = time.perf_counter()
    data.setup("fit")
    print(json.dumps({"setup_seconds": time.perf_counter() - started}))
