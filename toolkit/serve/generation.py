"""Chat generation for the server and the terminal chat: one batched `model.generate` per batch of requests,
each row with its own sampling settings, stop strings and token limit, its text streamed as it is made.

`generate` takes one setting for a whole batch; what differs per request is added through its hooks:
- `RowSampler` (a LogitsProcessor) draws each sampled row's token from its own seeded generator and leaves
  only that token possible, so generate's greedy step takes it. A row's answer then depends on its seed and
  prompt only, not on the requests it was batched with; greedy rows pass through untouched.
- `RowTracker` is both the streamer (generate hands it every new token) and the stopping criterion (a row
  ends at its end-of-turn token, a stop string or its own `max_tokens`); the others go on.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


@dataclass(frozen=True)
class Sampling:
    """One request's generation settings; temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Delta:
    """New text of one row since the last step; `finish_reason` ("stop" or "length") on its last delta."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The conversation as the model was trained to read it, ending where the assistant's answer begins."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds the special tokens


class RowSampler(LogitsProcessor):
    def __init__(self, samplings: list[Sampling]) -> None:
        self.samplings = samplings
        self.generators: list[torch.Generator | None] = []
        for s in samplings:
            if s.temperature <= 0:
                self.generators.append(None)
                continue
            generator = torch.Generator()
            generator.manual_seed(s.seed) if s.seed is not None else generator.seed()
            self.generators.append(generator)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, (s, generator) in enumerate(zip(self.samplings, self.generators, strict=True)):
            if generator is None:
                continue
            probs = torch.softmax(scores[row].float() / s.temperature, dim=-1)
            if s.top_p < 1.0:
                probs = nucleus(probs, s.top_p)
            token = torch.multinomial(probs.cpu(), 1, generator=generator).to(scores.device)
            scores[row] = torch.full_like(scores[row], float("-inf")).index_fill_(0, token, 0.0)
        return scores


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of most likely tokens whose mass reaches top_p, renormalised."""
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ahead of each one
    sorted_probs[before >= top_p] = 0.0
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return kept / kept.sum()


@dataclass
class Row:
    sampling: Sampling
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the answer already streamed
    finish_reason: str | None = None


class RowTracker(BaseStreamer):
    """Receives generate's new tokens (one per row per step), decides when each row is finished and queues
    every row's new text, holding back what may still turn out to be the start of a stop string."""

    def __init__(
        self, tokenizer: Any, prompt_lengths: list[int], samplings: list[Sampling], end_ids: set[int]
    ) -> None:
        self.tokenizer, self.end_ids = tokenizer, end_ids
        self.rows = [Row(s, n) for s, n in zip(samplings, prompt_lengths, strict=True)]
        self.deltas: queue.Queue[list[Delta] | BaseException | None] = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call hands over the prompts
            self.prompt_seen = True
            return
        deltas = []
        for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
            deltas.append(self.advance(row, token))
        self.deltas.put(deltas)

    def advance(self, row: Row, token: int) -> Delta:
        if row.finish_reason is not None:
            return Delta("")
        if token in self.end_ids:
            row.finish_reason = "stop"
            return self.flush(row, self.text(row))
        row.tokens.append(token)
        text = self.text(row)
        cut = first_stop(text, row.sampling.stop)
        if cut is not None:
            row.finish_reason = "stop"
            return self.flush(row, text[:cut])
        if len(row.tokens) >= row.sampling.max_tokens:
            row.finish_reason = "length"
            return self.flush(row, text)
        ready = text if not text.endswith("\ufffd") else text[: text.rfind("\ufffd")]  # half a character
        ready = ready[: safe_end(ready, row.sampling.stop)]
        delta, row.sent = ready[row.sent :], max(row.sent, len(ready))
        return Delta(delta)

    def flush(self, row: Row, text: str) -> Delta:
        delta = text[row.sent :]
        row.sent = len(text)
        return Delta(delta, row.finish_reason, row.prompt_tokens, len(row.tokens))

    def text(self, row: Row) -> str:
        return self.tokenizer.decode(row.tokens, skip_special_tokens=True)

    def end(self) -> None:
        """generate is done: rows still open ran out of generate's own token budget."""
        last = []
        for row in self.rows:
            if row.finish_reason is None:
                row.finish_reason = "length"
                last.append(self.flush(row, self.text(row)))
            else:
                last.append(Delta(""))
        self.deltas.put(last)
        self.deltas.put(None)

    def finished(self) -> torch.BoolTensor:
        return torch.tensor([row.finish_reason is not None for row in self.rows])


class TrackerStops(StoppingCriteria):
    """generate asks after every step which rows are finished; the tracker has just seen their tokens."""

    def __init__(self, tracker: RowTracker) -> None:
        self.tracker = tracker

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        return self.tracker.finished().to(input_ids.device)


def end_of_turn_ids(model: Any, tokenizer: Any) -> set[int]:
    """Where `generate` itself would stop: the generation config's end tokens (e.g. Llama-3's <|eot_id|>
    beside <|end_of_text|>), and the tokenizer's own."""
    configured = model.generation_config.eos_token_id
    ids = set(configured) if isinstance(configured, list) else {configured}
    return (ids | {tokenizer.eos_token_id}) - {None}


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def safe_end(text: str, stops: tuple[str, ...]) -> int:
    """The end of what may be sent: text up to any tail that is the beginning of a stop string."""
    for start in range(max(0, len(text) - max((len(s) for s in stops), default=0)), len(text)):
        if any(s.startswith(text[start:]) for s in stops if s):
            return start
    return len(text)


@torch.no_grad()
def stream_batch(
    model: Any, tokenizer: Any, prompts: list[list[int]], samplings: list[Sampling]
) -> Iterator[list[Delta]]:
    """One `generate` over the prompts (left-padded); yields after each step one Delta per prompt."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    tracker = RowTracker(tokenizer, [len(p) for p in prompts], samplings, end_of_turn_ids(model, tokenizer))
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "max_new_tokens": max(s.max_tokens for s in samplings),
        "do_sample": False,  # sampled rows are drawn by RowSampler
        "logits_processor": LogitsProcessorList([RowSampler(samplings)]),
        "stopping_criteria": StoppingCriteriaList([TrackerStops(tracker)]),
        "streamer": tracker,
        "pad_token_id": pad_id,
        "eos_token_id": None,  # the tracker ends each row at its end-of-turn token
        "top_k": None,
        "top_p": None,
        "temperature": None,
    }
    thread = threading.Thread(target=run_generate, args=(model, kwargs, tracker), daemon=True)
    thread.start()
    while (item := tracker.deltas.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item
    thread.join()


def run_generate(model: Any, kwargs: dict, tracker: RowTracker) -> None:
    try:
        model.generate(**kwargs)
    except BaseException as err:  # handed to the consumer: a failed batch fails its requests, not the server
        tracker.deltas.put(err)
