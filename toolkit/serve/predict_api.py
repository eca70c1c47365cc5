"""`POST /predict` for the other tasks, batched by LitServe like the chat API:
- text classifiers: `{"text": "..."}` -> every label with its probability, most likely first;
- image classifiers: `{"image": "<base64 PNG/JPEG/...>"}` -> the same;
- recommenders: `{"items": [raw item ids, oldest first], "top_k": 5}` -> the next items (raw ids) with their
  probability among the items not yet seen; ids outside the vocabulary are listed as `ignored`.

The API-server side (`PredictSpec`) turns the request into model inputs with the variant's own processor
(tokenizer, image processor or item vocabulary), so a bad request is refused before it is queued.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from toolkit.data.interactions import PAD, VOCAB_FILE, ItemVocabulary, left_pad
from toolkit.serve.errors import RequestError
from toolkit.serve.spec import QueuedSpec

KINDS = {
    "text": AutoModelForSequenceClassification,
    "image": AutoModelForImageClassification,
    "items": AutoModel,
}


def model_kind(model_dir: Path) -> str | None:
    """What a saved variant takes: items (a recommender), an image, text; None for a causal LM."""
    if (model_dir / VOCAB_FILE).exists():
        return "items"
    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or [""]
    if architectures[0].endswith("ForCausalLM"):
        return None
    return "image" if (model_dir / "preprocessor_config.json").exists() else "text"


class PredictRequest(BaseModel):
    text: str | None = None
    image: str | None = None
    items: list[str | int] | None = None
    top_k: int | None = None


class Preprocess:
    """The variant's processor: request -> model inputs, in the API-server process."""

    def __init__(self, model_dir: Path, kind: str, top_k: int, max_text_tokens: int = 512) -> None:
        self.kind, self.top_k, self.max_text_tokens = kind, top_k, max_text_tokens
        config = AutoConfig.from_pretrained(model_dir) if kind != "items" else None
        if kind == "text":
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        elif kind == "image":
            self.processor = AutoImageProcessor.from_pretrained(model_dir)
            self.channels = config.num_channels
        else:
            self.vocab = ItemVocabulary.from_pretrained(model_dir)
            self.by_text = {str(item): i + 1 for i, item in enumerate(self.vocab.items)}  # JSON: 1 == "1"
            recommender = json.loads((model_dir / "config.json").read_text())
            self.max_length = recommender.get("n_positions") or recommender["max_position_embeddings"]

    def __call__(self, request: PredictRequest) -> dict[str, Any]:
        given = [name for name in ("text", "image", "items") if getattr(request, name) is not None]
        if given != [self.kind]:
            raise RequestError(
                f"this model takes '{self.kind}' (got: {', '.join(given) or 'nothing'})", self.kind
            )
        return {"text": self.text, "image": self.image, "items": self.items}[self.kind](request)

    def text(self, request: PredictRequest) -> dict[str, Any]:
        if not request.text.strip():
            raise RequestError("text is empty", "text")
        ids = self.tokenizer(request.text, truncation=True, max_length=self.max_text_tokens)["input_ids"]
        return {"input_ids": ids}

    def image(self, request: PredictRequest) -> dict[str, Any]:
        try:
            image = Image.open(io.BytesIO(base64.b64decode(request.image, validate=True)))
            image.load()
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as err:
            raise RequestError(f"image is not a base64-encoded image file ({err})", "image") from err
        pixels = np.asarray(image.convert("L" if self.channels == 1 else "RGB"))
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
        values = self.processor(pixels, input_data_format="channels_last", return_tensors="np")[
            "pixel_values"
        ]
        return {"pixel_values": values[0].tolist()}

    def items(self, request: PredictRequest) -> dict[str, Any]:
        known = [self.by_text[str(i)] for i in request.items if str(i) in self.by_text]
        ignored = [i for i in request.items if str(i) not in self.by_text]
        if not known:
            raise RequestError(
                f"none of the {len(request.items)} items is in the model's vocabulary", "items"
            )
        top_k = request.top_k or self.top_k
        if not 1 <= top_k <= self.top_k:
            raise RequestError(f"top_k={top_k} is out of range: 1 to serve.top_k={self.top_k}", "top_k")
        inputs = known[-self.max_length :]
        if self.vocab.masked:  # BERT4Rec scores the next item at an appended [MASK]
            inputs = known[-(self.max_length - 1) :] + [self.vocab.mask_id]
        return {"input_ids": inputs, "seen": known, "ignored": ignored, "top_k": top_k}


class PredictSpec(QueuedSpec):
    def __init__(self, model_dir: str, kind: str, top_k: int) -> None:
        super().__init__()
        self.api_path = "/predict"
        self.model_dir, self.kind, self.top_k = model_dir, kind, top_k
        self.preprocess: Preprocess | None = None
        self.add_endpoint(self.api_path, self.predict, ["POST"])

    def setup(self, server: Any) -> None:
        super().setup(server)
        self.preprocess = Preprocess(Path(self.model_dir), self.kind, self.top_k)

    async def predict(self, request: PredictRequest) -> dict[str, Any]:
        job = self.preprocess(request)
        (result,) = [output async for output in self.submit(job)]  # the worker answers once per job
        if self.kind == "items":
            result["ignored"] = job["ignored"]
        return result


class PredictAPI(ls.LitAPI):
    """The inference worker of a classifier or recommender: one forward pass per batch."""

    def __init__(self, spec: PredictSpec, max_batch_size: int, batch_timeout: float, authorize: Any = None):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=spec)
        self.model_dir, self.kind = spec.model_dir, spec.kind
        if authorize is not None:
            self.authorize = authorize

    def setup(self, device: str) -> None:
        if self.kind == "items":
            import toolkit.models.recommenders  # noqa: F401  (registers the recommender classes with AutoModel)

            self.vocab = ItemVocabulary.from_pretrained(self.model_dir)
        self.model = KINDS[self.kind].from_pretrained(self.model_dir).eval()
        self.pad_id = getattr(self.model.config, "pad_token_id", None) or 0

    def decode_request(self, request: dict) -> dict:
        return request

    def batch(self, inputs: list[dict]) -> list[dict]:
        return list(inputs)

    @torch.no_grad()
    def predict(self, jobs: Any) -> Any:
        batched = isinstance(jobs, list)
        jobs = jobs if batched else [jobs]
        results = self.recommend(jobs) if self.kind == "items" else self.classify(jobs)
        yield results if batched else results[0]

    def classify(self, jobs: list[dict]) -> list[dict]:
        if self.kind == "image":
            inputs = {"pixel_values": torch.tensor([j["pixel_values"] for j in jobs], dtype=torch.float32)}
        else:
            width = max(len(j["input_ids"]) for j in jobs)
            ids = [j["input_ids"] + [self.pad_id] * (width - len(j["input_ids"])) for j in jobs]
            mask = [[1] * len(j["input_ids"]) + [0] * (width - len(j["input_ids"])) for j in jobs]
            inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        probs = torch.softmax(self.model(**inputs).logits.float(), -1)
        names = self.model.config.id2label
        return [
            {
                "labels": [
                    {"label": names[int(i)], "score": float(p)}
                    for p, i in zip(*row.sort(descending=True), strict=True)
                ]
            }
            for row in probs
        ]

    def recommend(self, jobs: list[dict]) -> list[dict]:
        length = max(len(j["input_ids"]) for j in jobs)
        ids = torch.tensor([left_pad(j["input_ids"], length, PAD) for j in jobs])
        scores = self.model(input_ids=ids, attention_mask=(ids != PAD).long()).logits.float()
        never = [PAD] + ([self.vocab.mask_id] if self.vocab.masked else [])
        results = []
        for row, job in zip(scores, jobs, strict=True):
            row[never + job["seen"]] = float("-inf")  # seen items are never recommended again
            probs = torch.softmax(row, -1)
            top = probs.topk(job["top_k"])
            items = [
                {"item": self.vocab.items[int(i) - 1], "score": float(p)} for p, i in zip(*top, strict=True)
            ]
            results.append({"items": items})
        return results

    def unbatch(self, output: Any) -> Any:
        yield from output

    def encode_response(self, output: Any) -> Any:
        yield from output
