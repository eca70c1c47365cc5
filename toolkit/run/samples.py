"""Held-out prompts answered by every variant, side by side: what a metric cannot show about a chat model.

A prompt is a test conversation up to its last trained-on turn: the tokens before the last run of labels
(which is the reference answer). Read from the encoded example, so it holds for any chat template and
format, multi-turn or single-turn.
"""

from __future__ import annotations

from typing import Any

import torch


def held_out_prompts(dataset: Any, count: int) -> list[dict[str, list[int]]]:
    """The first `count` test examples as {prompt_ids, reference_ids}; preference pairs carry their prompt,
    and their chosen (or KTO's rated) answer is the reference."""
    prompts = []
    rows = dataset.select(range(min(count, len(dataset))))
    if "prompt_ids" in dataset.column_names:
        answer = "chosen_ids" if "chosen_ids" in dataset.column_names else "completion_ids"
        return [{"prompt_ids": row["prompt_ids"], "reference_ids": row[answer]} for row in rows]
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        trained = [i for i, label in enumerate(labels) if label != -100]
        if not trained:
            continue
        end = trained[-1] + 1
        start = end
        while start > 0 and labels[start - 1] != -100:  # back to the start of the last labelled run
            start -= 1
        prompts.append({"prompt_ids": ids[:start], "reference_ids": ids[start:end]})
    return prompts


@torch.no_grad()
def answer_prompts(model: Any, tokenizer: Any, prompts: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy answers, one prompt at a time (no padding to get wrong; a handful of prompts)."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = model.generation_config.pad_token_id or tokenizer.pad_token_id or tokenizer.eos_token_id
    answers = []
    for prompt in prompts:
        ids = torch.tensor([prompt["prompt_ids"]], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def samples_record(tokenizer: Any, prompts: list[dict], answers: dict[str, list[str]]) -> list[dict]:
    """evaluate/samples.json: each prompt (its text, special tokens kept: the turns show), the reference
    answer and every variant's answer."""
    return [
        {
            "prompt": tokenizer.decode(prompt["prompt_ids"]),
            "reference": tokenizer.decode(prompt["reference_ids"], skip_special_tokens=True).strip(),
            "answers": {variant: texts[i] for variant, texts in answers.items()},
        }
        for i, prompt in enumerate(prompts)
    ]
