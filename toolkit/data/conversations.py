"""Multi-turn conversations: the common file shapes read into one message list, and the tokens trained on.

Formats (`data.format`): `messages` (OpenAI: `[{role, content}]`), `sharegpt` (`[{from, value}]`, role names
mapped in YAML), `alpaca` (`instruction`, optional `input`, `output`). Each row becomes a list of
`{"role", "content"}` messages, or a one-line reason why it cannot (counted and reported by the data module).

Which tokens are labelled does not depend on how a chat template renders prefixes: the whole conversation is
rendered once, each assistant message's content is found in the rendered text (in order), and its span runs
on through the special token the template writes right after it (the end-of-turn token). The tokenizer's
character offsets then say which tokens fall inside a span. This holds for ChatML, Llama-3 headers, Mistral
`[INST]` and Gemma turns alike (tests check all four), where prefix-diffing breaks on templates that render a
turn differently once another follows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "tool": "tool"}
TRAIN_ON = ("assistant", "last_assistant", "all")  # all: every token (train_on_inputs)
IGNORE = -100


def parse_messages(
    rows: Any, role_key: str = "role", content_key: str = "content", roles: dict | None = None
):
    """`[{role, content}, ...]` -> (messages, None), or (None, what is wrong) for a bad conversation."""
    if not isinstance(rows, list) or not rows:
        return None, "empty conversation"
    messages = []
    for i, turn in enumerate(rows):
        if not isinstance(turn, dict):
            return None, f"turn {i} is not a mapping"
        role = turn.get(role_key)
        role = (roles or {}).get(role, role) if roles else role
        if role not in ROLES:
            valid = ", ".join(sorted(roles)) if roles else ", ".join(ROLES)
            return None, f"turn {i} has unknown role {turn.get(role_key)!r} (valid: {valid})"
        content = turn.get(content_key)
        if not isinstance(content, str):
            return None, f"turn {i} content is not a string ({type(content).__name__})"
        messages.append({"role": role, "content": content})
    return messages, None


def alpaca_messages(row: dict, input_template: str = "{instruction}\n\n{input}", system: str | None = None):
    """An alpaca row (instruction, optional input, output) -> a system?/user/assistant conversation."""
    instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
        return None, "instruction, input and output must be strings"
    user = input_template.format(instruction=instruction, input=extra) if extra else instruction
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": output}], None


def check_trainable(messages: list[dict], train_on: str) -> str | None:
    """Why a parsed conversation cannot be trained on, or None."""
    if not any(m["role"] == "assistant" for m in messages) and train_on != "all":
        return "no assistant turn to train on"
    if train_on == "last_assistant" and messages[-1]["role"] != "assistant":
        return "does not end with an assistant turn (data.train_on=last_assistant)"
    return None


def assistant_char_spans(text: str, messages: list[dict], special: Sequence[str]) -> list[tuple[int, int]]:
    """(start, end) in the rendered `text` of each assistant message's content plus the special tokens the
    template writes straight after it (its end-of-turn marker)."""
    spans, cursor = [], 0
    by_length = sorted(special, key=len, reverse=True)
    for message in messages:
        content = message["content"].strip()  # templates such as Llama-3's trim the content
        start = text.find(content, cursor) if content else -1
        if start < 0:
            continue  # an empty answer: nothing of it to train on
        end = start + len(content)
        token = next((t for t in by_length if t and text.startswith(t, end)), None)
        end += len(token or "")  # the end-of-turn marker right after the answer belongs to it
        if message["role"] == "assistant":
            spans.append((start, end))
        cursor = end
    return spans


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], train_on: str = "assistant"
) -> dict[str, list[int]]:
    """input_ids and labels (IGNORE outside the trained spans) of a whole conversation."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if train_on == "all":
        return {"input_ids": ids, "labels": list(ids)}
    spans = assistant_char_spans(
        text, messages, tokenizer.all_special_tokens + list(_added_tokens(tokenizer))
    )
    if train_on == "last_assistant":
        spans = spans[-1:]
    labels = [IGNORE] * len(ids)
    for i, (start, end) in enumerate(encoded["offset_mapping"]):
        piece = text[start:end]
        if piece.strip():  # a word token carries the space before it (" I"), which may precede the span
            start += len(piece) - len(piece.lstrip())
        if end > start and any(s <= start and end <= e for s, e in spans):
            labels[i] = ids[i]
    return {"input_ids": ids, "labels": labels}


def _added_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Added special tokens (e.g. `<|eot_id|>`, `<end_of_turn>`) that `all_special_tokens` may not list."""
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def fit_by_turns(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int, train_on: str
) -> tuple[dict[str, list[int]] | None, int]:
    """Encode, dropping whole earlier turns (the system prompt stays) until the conversation fits in
    `max_length` tokens; the last assistant turn is never cut. Returns (encoding or None, turns dropped)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    dropped = 0
    while turns:
        encoded = encode_conversation(tokenizer, system + turns, train_on)
        if len(encoded["input_ids"]) <= max_length and any(x != IGNORE for x in encoded["labels"]):
            return encoded, dropped
        # drop up to the next user turn, so the conversation still starts with what the user said
        cut = next((i for i, m in enumerate(turns[1:], 1) if m["role"] == "user"), len(turns))
        turns, dropped = turns[cut:], dropped + cut
        if not any(m["role"] == "assistant" for m in turns) and train_on != "all":
            break
    return None, dropped
