"""toolkit-serve under load: dynamic batching vs one request at a time, int8 vs fp32, server vs generate.

SmolLM2-135M-Instruct is served as a run's export (and its int8 variant, made by the quantize stage) by a
real `toolkit-serve` process on 127.0.0.1; the official `openai` client streams every answer (greedy,
64 new tokens at most), so the time to the first token is measured beside the whole latency.
  batched    -- 16 concurrent clients, serve.max_batch_size=16 (dynamic batching, 50 ms to fill a batch);
  sequential -- the same 16 clients, serve.max_batch_size=1: the worker answers one request at a time;
  quantized / fine_tuned -- one client, one request at a time: decoded tokens/s of the int8 and fp32 models;
  overhead   -- one request through the server (not streamed) vs `model.generate` in this process.

    python -m benchmarks --only serve
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.harness import Result, median, save_tiny_llama
from toolkit.config import compose_config
from toolkit.data.assets import asset_path
from toolkit.run.manifest import write_manifest
from toolkit.run.stages import quantize_stage
from toolkit.serve.generation import render_prompt
from toolkit.serve.process import ServerProcess

TOPICS = ["the sea", "a city at night", "bread", "an old clock", "winter", "a library", "trains", "bees",
          "the moon", "a market", "rain", "a garden", "hills", "violins", "coffee", "ships"]  # fmt: skip


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a paragraph about {TOPICS[i % len(TOPICS)]}."}]


def prepare_run(root: Path, tiny: bool) -> Path:
    """runs/<...>: export/model (the model as exported) and quantize/model (int8 dynamic, the stage's own)."""
    run, model_dir = root / "run", root / "run" / "export" / "model"
    if tiny:
        save_tiny_llama(model_dir)
    else:
        shutil.copytree(asset_path("smollm2_135m_instruct"), model_dir)
    write_manifest(run / "export")
    cfg = compose_config(["recipe=nlp/smollm2_lora_sft", f"model.name_or_path={model_dir}",
                          "quantize=int8_dynamic", "quantize.max_metric_drop=null"])  # fmt: skip
    quantize_stage(cfg, run)
    return run


def drive(server: ServerProcess, requests: int, clients: int, max_tokens: int) -> dict[str, float]:
    """`requests` streamed completions from `clients` threads: requests/s, tokens/s, latency, first token."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=900)

    def one(i: int) -> tuple[float, float, int]:
        start, first, tokens = time.perf_counter(), None, 0
        stream = client.chat.completions.create(
            model=server.model, messages=messages(i), max_tokens=max_tokens, temperature=0, stream=True
        )
        for chunk in stream:
            if chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        return end - start, (first or end) - start, tokens

    one(0)  # warm-up: the worker's first forward pass
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {
        "requests_per_s": requests / wall,
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "p50_latency_s": statistics.median(latencies),
        "p99_latency_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "p50_first_token_s": statistics.median(r[1] for r in results),
    }


def single_latency(server: ServerProcess, max_tokens: int, repeats: int) -> float:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=900)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        client.chat.completions.create(
            model=server.model, messages=messages(0), max_tokens=max_tokens, temperature=0
        )
        times.append(time.perf_counter() - start)
    return median(times[1:])


@torch.no_grad()
def generate_latency(model_dir: Path, max_tokens: int, repeats: int) -> float:
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(model_dir).eval(),
        AutoTokenizer.from_pretrained(model_dir),
    )
    ids = torch.tensor([render_prompt(tokenizer, messages(0))])
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
        )
        times.append(time.perf_counter() - start)
    return median(times[1:])


def main(tiny: bool = False) -> Result:
    requests, clients, max_tokens, repeats = (8, 4, 8, 2) if tiny else (32, 16, 64, 5)
    arms: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = prepare_run(Path(tmp), tiny)
        fast = ["serve.batch_timeout=0.05", f"serve.max_tokens={max_tokens}"]
        with ServerProcess(run, f"serve.max_batch_size={clients}", *fast) as server:
            arms["batched"] = drive(server, requests, clients, max_tokens)
        with ServerProcess(run, "serve.max_batch_size=1", *fast) as server:
            arms["sequential"] = drive(server, requests, clients, max_tokens)
            arms["fine_tuned"] = drive(server, max(4, requests // 4), 1, max_tokens)
            served = single_latency(server, max_tokens, repeats)
        with ServerProcess(run, "serve.max_batch_size=1", "serve.variant=quantized", *fast) as server:
            arms["quantized"] = drive(server, max(4, requests // 4), 1, max_tokens)
        direct = generate_latency(run / "export" / "model", max_tokens, repeats)
    figures = {
        "serve.throughput_batched_over_sequential": arms["batched"]["requests_per_s"]
        / arms["sequential"]["requests_per_s"],
        "serve.batched.p50_latency_s": arms["batched"]["p50_latency_s"],
        "serve.batched.p99_latency_s": arms["batched"]["p99_latency_s"],
        "serve.batched.p50_first_token_s": arms["batched"]["p50_first_token_s"],
        "serve.quantized_over_fine_tuned": arms["quantized"]["tokens_per_s"]
        / arms["fine_tuned"]["tokens_per_s"],
        "serve.overhead_over_generate": served / direct,
    }
    table = [{"arm": arm, **{k: round(v, 3) for k, v in values.items()}} for arm, values in arms.items()]
    blank = dict.fromkeys(table[0], None)
    table.append({**blank, "arm": "one request, server", "p50_latency_s": round(served, 3)})
    table.append({**blank, "arm": "one request, model.generate", "p50_latency_s": round(direct, 3)})
    command = f"toolkit-serve from_run=<run> serve.max_batch_size={clients}|1 [serve.variant=quantized]"
    notes = (
        f"{requests} streamed requests per load arm from {clients} client threads (greedy, up to "
        f"{max_tokens} new tokens, prompts 'Write a paragraph about <topic>'); fine_tuned/quantized: one "
        f"client; the last two rows: one non-streamed request through the server and model.generate in this "
        f"process, medians of {repeats}."
    )
    return Result("Serving: dynamic batching, int8, overhead over generate", command, table, figures, notes)
