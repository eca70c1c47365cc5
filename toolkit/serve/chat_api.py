"""`POST /v1/chat/completions` in the OpenAI format, on LitServe.

LitServe queues the requests, forms dynamic batches for the inference worker, runs the worker processes
and streams their output back. This module is its two ends:
- `ChatSpec` (the API-server side): checks each request before it is queued (model, messages, limits, the
  chat template renders it), stamps it with a completion id, and shapes the worker's text into OpenAI
  responses or server-sent events. It records every answer (`FeedbackLog`) so feedback can name its id.
- `ChatAPI` (the worker side): holds the model; `predict` runs one batched `generate` per batch.

LitServe's own `OpenAISpec` is not used: it has no `seed`, makes its ids up where the worker cannot see
them, and always reports finish_reason "stop".
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import litserve as ls
from fastapi import BackgroundTasks
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from toolkit.data.conversations import ROLES
from toolkit.serve.errors import RequestError
from toolkit.serve.feedback import FeedbackLog
from toolkit.serve.generation import Sampling, render_prompt, stream_batch
from toolkit.serve.models import load_served
from toolkit.serve.spec import QueuedSpec


@dataclass(frozen=True)
class ChatLimits:
    """serve.max_tokens (the most a request may ask for), serve.default_max_tokens (when it does not say),
    serve.max_messages, serve.context_length (prompt + answer tokens)."""

    max_tokens: int
    default_max_tokens: int
    max_messages: int
    context_length: int


class Message(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(BaseModel):
    """The OpenAI request fields this server honours; others the OpenAI client may send are accepted."""

    model: str = ""
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None

    model_config = {"extra": "allow"}


def message_text(message: Message, index: int) -> str:
    """A message's content as text: a string, or OpenAI's list of text parts."""
    content = message.content
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(f"messages[{index}].content holds non-text parts; this model reads text only",
                       f"messages[{index}].content")  # fmt: skip


class ChatSpec(QueuedSpec):
    def __init__(self, model_name: str, model_dir: str, feedback: FeedbackLog, limits: ChatLimits) -> None:
        super().__init__()
        self.api_path = "/v1/chat/completions"
        self.model_name, self.model_dir, self.feedback, self.limits = model_name, model_dir, feedback, limits
        self.tokenizer: Any = None
        self.add_endpoint(self.api_path, self.chat_completion, ["POST"])

    def setup(self, server: Any) -> None:
        super().setup(server)
        self.tokenizer = load_served(self.model_dir, tokenizer_only=True)
        self.feedback.prepare()

    def check(self, request: ChatRequest) -> dict[str, Any]:
        """The request as a job for the worker, or a RequestError naming the field and its limit."""
        if request.model and request.model != self.model_name:
            raise RequestError(
                f"model='{request.model}' is not served here; GET /v1/models lists '{self.model_name}'",
                "model", 404, "model_not_found",
            )  # fmt: skip
        if request.n != 1:
            raise RequestError(f"n={request.n}: this server returns one choice per request (n=1)", "n")
        if not request.messages:
            raise RequestError("messages is empty; give at least one message", "messages")
        if len(request.messages) > self.limits.max_messages:
            raise RequestError(
                f"{len(request.messages)} messages is over the limit serve.max_messages="
                f"{self.limits.max_messages}", "messages",
            )  # fmt: skip
        messages = []
        for i, message in enumerate(request.messages):
            if message.role not in ROLES:
                raise RequestError(f"messages[{i}].role='{message.role}' is not one of {', '.join(ROLES)}",
                                   f"messages[{i}].role")  # fmt: skip
            messages.append({"role": message.role, "content": message_text(message, i)})
        sampling = self.sampling(request)
        try:
            prompt_ids = render_prompt(self.tokenizer, messages)
        except Exception as err:  # the template's own refusal (e.g. roles out of order) names the problem
            raise RequestError(f"the chat template cannot render these messages: {err}", "messages") from err
        if len(prompt_ids) + sampling.max_tokens > self.limits.context_length:
            raise RequestError(
                f"{len(prompt_ids)} prompt tokens + max_tokens={sampling.max_tokens} exceed the context "
                f"length {self.limits.context_length}", "messages", 400, "context_length_exceeded",
            )  # fmt: skip
        job_id = f"chatcmpl-{uuid.uuid4().hex}"
        return {"id": job_id, "messages": messages, "prompt_ids": prompt_ids, "sampling": sampling}

    def sampling(self, request: ChatRequest) -> Sampling:
        max_tokens = request.max_completion_tokens or request.max_tokens
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        if max_tokens is None:
            max_tokens = self.limits.default_max_tokens
        if not 1 <= max_tokens <= self.limits.max_tokens:
            raise RequestError(f"{field}={max_tokens} is out of range: 1 to serve.max_tokens="
                               f"{self.limits.max_tokens}", field)  # fmt: skip
        if not 0.0 <= request.temperature <= 2.0:
            raise RequestError(f"temperature={request.temperature} is out of range 0 to 2", "temperature")
        if not 0.0 < request.top_p <= 1.0:
            raise RequestError(f"top_p={request.top_p} is out of range (0, 1]", "top_p")
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stop) > 4 or not all(stop):
            raise RequestError("stop takes up to 4 non-empty strings", "stop")
        return Sampling(max_tokens, request.temperature, request.top_p, tuple(stop), request.seed)

    async def chat_completion(self, request: ChatRequest, background_tasks: BackgroundTasks) -> Any:
        job = self.check(request)
        deltas = self.submit(job)  # the worker streams; whole answers are joined here
        if request.stream:
            return StreamingResponse(
                self.events(job, deltas), media_type="text/event-stream", background=background_tasks
            )
        return await self.whole(job, deltas)

    async def whole(self, job: dict, deltas: Any) -> dict[str, Any]:
        text, last = "", {}
        async for delta in deltas:
            text += delta["text"]
            last = delta if delta["finish_reason"] else last
        await asyncio.to_thread(self.feedback.add_completion, job["id"], job["messages"], text,
                                last["finish_reason"])  # fmt: skip
        return {
            "id": job["id"],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": last["finish_reason"],
                }
            ],  # fmt: skip
            "usage": usage(last),
        }

    async def events(self, job: dict, deltas: Any) -> Any:
        """Server-sent events: the role first, then text as it is made, then the finish reason."""
        created = int(time.time())

        def chunk(delta: dict, finish_reason: str | None = None, extra: dict | None = None) -> str:
            body = {
                "id": job["id"],
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                **(extra or {}),
            }
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        text = ""
        try:
            async for delta in deltas:
                text += delta["text"]
                if delta["text"]:
                    yield chunk({"content": delta["text"]})
                if delta["finish_reason"]:
                    await asyncio.to_thread(self.feedback.add_completion, job["id"], job["messages"], text,
                                            delta["finish_reason"])  # fmt: skip
                    yield chunk({}, delta["finish_reason"], {"usage": usage(delta)})
        except RequestError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"


def usage(delta: dict) -> dict[str, int]:
    prompt, completion = delta.get("prompt_tokens", 0), delta.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ChatAPI(ls.LitAPI):
    """The inference worker: the model, one batched generate per batch of jobs."""

    def __init__(self, spec: ChatSpec, max_batch_size: int, batch_timeout: float,
                 authorize: Any = None) -> None:  # fmt: skip
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=spec)
        self.model_dir = spec.model_dir
        if authorize is not None:
            self.authorize = authorize

    def setup(self, device: str) -> None:
        self.model, self.tokenizer = load_served(self.model_dir, device=device)

    def decode_request(self, request: dict) -> dict:
        return request

    def batch(self, inputs: list[dict]) -> list[dict]:
        return list(inputs)

    def predict(self, jobs: Any) -> Any:
        batched = isinstance(jobs, list)  # LitServe hands a lone job over unbatched at max_batch_size=1
        jobs = jobs if batched else [jobs]
        prompts, samplings = [j["prompt_ids"] for j in jobs], [j["sampling"] for j in jobs]
        for deltas in stream_batch(self.model, self.tokenizer, prompts, samplings):
            rows = [asdict(d) for d in deltas]
            yield rows if batched else rows[0]

    def unbatch(self, output: Any) -> Any:
        yield from output

    def encode_response(self, output: Any) -> Any:
        yield from output
