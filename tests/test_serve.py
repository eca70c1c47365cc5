"""toolkit-serve as users meet it: a real server process on 127.0.0.1, the official `openai` client and curl.

The real SmolLM2-135M-Instruct serves the OpenAI-format checks (real answers to compare with the model's own
`generate`); the tiny SFT run serves the feedback checks and the feedback -> training loop.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import TOOLKIT_TRAIN, copy_run
from toolkit.data.assets import asset_path
from toolkit.layout import COMPLETIONS, FEEDBACK
from toolkit.run.manifest import write_manifest
from toolkit.serve.generation import render_prompt
from toolkit.serve.process import TOOLKIT_SERVE
from toolkit.serve.process import ServerProcess as Server

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "Say hello in Spanish.",
    "What is 2 + 2?",
    "Give me a word that rhymes with cat.",
    "What do bees make?",
    "Which planet is closest to the sun?",
    "What is frozen water called?",
]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def smollm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose exported model is SmolLM2-135M-Instruct itself (the serving side only reads
    export/model and its manifest)."""
    run_dir = tmp_path_factory.mktemp("smollm_run")
    shutil.copytree(asset_path("smollm2_135m_instruct"), run_dir / "export" / "model")
    write_manifest(run_dir / "export")
    return run_dir


@pytest.fixture(scope="module")
def smollm(smollm_run: Path) -> tuple:
    model_dir = smollm_run / "export" / "model"
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def server(smollm_run: Path):
    with Server(smollm_run, "serve.max_batch_size=8", "serve.batch_timeout=0.05") as running:
        yield running


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@torch.no_grad()
def offline_greedy(smollm: tuple, messages: list[dict], max_new_tokens: int) -> str:
    model, tokenizer = smollm
    ids = torch.tensor([render_prompt(tokenizer, messages)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_chat_completion_equals_generate(client: openai.OpenAI, smollm: tuple) -> None:
    reply = client.chat.completions.create(
        model="fine_tuned", messages=user(QUESTIONS[0]), max_tokens=24, temperature=0
    )
    choice = reply.choices[0]
    assert reply.id.startswith("chatcmpl-") and reply.model == "fine_tuned"
    assert choice.message.content == offline_greedy(smollm, user(QUESTIONS[0]), 24)
    assert choice.finish_reason in ("stop", "length")
    tokenizer = smollm[1]
    assert reply.usage.prompt_tokens == len(render_prompt(tokenizer, user(QUESTIONS[0])))
    assert 0 < reply.usage.completion_tokens <= 24


def test_streaming_sends_tokens_before_the_end(client: openai.OpenAI, smollm: tuple) -> None:
    arrivals, parts, ids = [], [], set()
    stream = client.chat.completions.create(
        model="fine_tuned", messages=user(QUESTIONS[6]), max_tokens=32, temperature=0, stream=True
    )
    finish = None
    for chunk in stream:
        ids.add(chunk.id)
        delta = chunk.choices[0].delta.content
        if delta:
            parts.append(delta)
            arrivals.append(time.monotonic())
        finish = chunk.choices[0].finish_reason or finish
    end = time.monotonic()
    assert len(ids) == 1 and finish in ("stop", "length")
    assert len(parts) >= 5, parts
    assert end - arrivals[0] > 0.05  # the first text came well before the answer was complete
    assert "".join(parts) == offline_greedy(smollm, user(QUESTIONS[6]), 32)


def test_models_and_health_with_curl(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["fine_tuned"]
    health = subprocess.run(["curl", "-s", "-w", " %{http_code}", f"{server.url}/health"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert health.stdout == "ok 200"


def test_sixteen_clients_all_answered_as_generate_would(server: Server, smollm: tuple) -> None:
    """128 requests from 16 concurrent clients: all answered, no error, each greedy answer equal to the
    model's own generate for the same messages (the batches mix prompts of different lengths)."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def ask(i: int) -> tuple[int, str]:
        q = i % len(QUESTIONS)
        reply = client.chat.completions.create(model="fine_tuned", messages=user(QUESTIONS[q]), max_tokens=12,
                                               temperature=0)  # fmt: skip
        return q, reply.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(128)))
    assert len(answers) == 128
    expected = {q: offline_greedy(smollm, user(text), 12) for q, text in enumerate(QUESTIONS)}
    wrong = [(q, got) for q, got in answers if got != expected[q]]
    assert not wrong, (wrong[:3], expected)


def test_seeded_sampling_repeats_whatever_it_is_batched_with(client: openai.OpenAI) -> None:
    def sample(seed: int, question: str) -> str:
        reply = client.chat.completions.create(model="fine_tuned", messages=user(question), max_tokens=16,
                                               temperature=1.0, top_p=0.9, seed=seed)  # fmt: skip
        return reply.choices[0].message.content

    alone = sample(7, QUESTIONS[2])
    with ThreadPoolExecutor(4) as pool:  # the same request again, batched with three others
        together = list(pool.map(sample, [7, 1, 2, 3], [QUESTIONS[2], *QUESTIONS[3:6]]))
    assert together[0] == alone
    assert len({sample(seed, QUESTIONS[2]) for seed in (11, 12, 13)}) > 1  # sampling does sample


def test_stop_string_ends_the_answer_before_it(client: openai.OpenAI, smollm: tuple) -> None:
    full = offline_greedy(smollm, user(QUESTIONS[0]), 24)
    word = full.split()[2]
    reply = client.chat.completions.create(model="fine_tuned", messages=user(QUESTIONS[0]), max_tokens=24,
                                           temperature=0, stop=[word])  # fmt: skip
    assert reply.choices[0].message.content == full[: full.index(word)]
    assert reply.choices[0].finish_reason == "stop"


BAD_REQUESTS = {  # body changes -> (status, param)
    "unknown model": ({"model": "gpt-4"}, 404, "model"),
    "empty messages": ({"messages": []}, 400, "messages"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    "max_tokens over the limit": ({"max_tokens": 100000}, 400, "max_tokens"),
    "negative max_tokens": ({"max_tokens": -1}, 400, "max_tokens"),
    "temperature out of range": ({"temperature": 5}, 400, "temperature"),
    "content of the wrong type": ({"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_4xx_naming_the_field(server: Server, case: str) -> None:
    change, status, param = BAD_REQUESTS[case]
    body = {"model": "fine_tuned", "messages": user("hi"), "max_tokens": 4, **change}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    assert httpx.get(f"{server.url}/health").text == "ok"


def test_malformed_json_and_unknown_feedback_id(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"messages": [', timeout=30,
                          headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = httpx.post(f"{server.url}/v1/feedback", json={"id": "chatcmpl-nope", "rating": 1})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": "id='chatcmpl-nope' is not a completion this run served",
        "type": "not_found_error",
        "param": "id",
        "code": None,
    }
    assert httpx.get(f"{server.url}/health").text == "ok"


def test_api_key_size_and_concurrency_limits(smollm_run: Path) -> None:
    key = {"TOOLKIT_SERVE_API_KEY": "s3cret-key"}
    with Server(smollm_run, "serve.max_concurrent=1", "serve.max_request_bytes=4000", env=key) as server:
        url = f"{server.url}/v1/chat/completions"
        body = {"model": "fine_tuned", "messages": user("hi"), "max_tokens": 4}
        refused = httpx.post(url, json=body)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        authed = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret-key", max_retries=0)
        assert authed.chat.completions.create(**body).choices[0].message.content is not None
        big = {**body, "messages": user("x" * 5000)}
        too_big = httpx.post(url, json=big, headers=server.headers())
        assert too_big.status_code == 413 and too_big.json()["error"]["param"] == "body"
        streaming = authed.chat.completions.create(**{**body, "max_tokens": 200}, stream=True)
        next(iter(streaming))  # in flight until its last event
        busy = httpx.post(url, json=body, headers=server.headers())
        assert busy.status_code == 429 and "serve.max_concurrent=1" in busy.json()["error"]["message"]
        streaming.close()
    assert "s3cret-key" not in server.log.read_text()


@pytest.fixture
def tiny_served(sft_run: tuple, tmp_path: Path) -> Path:
    return copy_run(sft_run, tmp_path)


def test_feedback_survives_a_killed_server(tiny_served: Path) -> None:
    """Feedback posted while the server is killed and restarted: every acknowledged line is on disk, whole
    and parseable; feedback after the restart may name an answer given before it."""
    acknowledged, stop = [], threading.Event()
    with Server(tiny_served) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        ids = [client.chat.completions.create(model="fine_tuned", messages=user(q), max_tokens=4).id
               for q in QUESTIONS[:4]]  # fmt: skip

        def post_forever() -> None:
            i = 0
            while not stop.is_set():
                try:
                    r = httpx.post(
                        f"{server.url}/v1/feedback", json={"id": ids[i % 4], "rating": 1}, timeout=5
                    )
                    if r.status_code == 200:
                        acknowledged.append(ids[i % 4])
                except httpx.TransportError:
                    pass
                i += 1

        poster = threading.Thread(target=post_forever)
        poster.start()
        while len(acknowledged) < 20:
            time.sleep(0.01)
        server.stop(signal.SIGKILL)  # mid-stream of feedback
        before_restart = len(acknowledged)
        server.start()
        while len(acknowledged) < before_restart + 10:
            time.sleep(0.01)
        stop.set()
        poster.join()
    raw = (tiny_served / FEEDBACK).read_bytes()
    assert raw.endswith(b"\n")
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert len(lines) >= len(acknowledged) > before_restart
    assert all(line["kind"] == "rating" and line["completion"] is not None for line in lines)
    assert (tiny_served / COMPLETIONS).is_file()


@torch.no_grad()
def answer_logp(model_dir: Path, messages: list[dict], answer: str) -> float:
    """Summed log-probability of the answer's tokens after the prompt, as the chat template renders them."""
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(model_dir).eval(),
        AutoTokenizer.from_pretrained(model_dir),
    )
    prompt = render_prompt(tokenizer, messages)
    full = tokenizer(
        tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False),
        add_special_tokens=False,
    )["input_ids"]
    logits = model(torch.tensor([full])).logits[0, len(prompt) - 1 : -1]
    targets = torch.tensor(full[len(prompt) :])
    return torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).sum().item()


def test_feedback_trains_the_next_model(tiny_served: Path, tmp_path: Path) -> None:
    """train -> serve -> feedback -> train -> serve: users compare two sampled answers per question; DPO on
    that feedback (`data=feedback`, the served model as the start) gives the preferred answers a higher
    log-probability than the served model did."""
    pairs = []
    with Server(tiny_served) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        for question in QUESTIONS * 2:
            a, b = (
                client.chat.completions.create(
                    model="fine_tuned", messages=user(question), max_tokens=6, temperature=1.0, seed=seed
                )
                for seed in (1, 2)
            )
            if a.choices[0].message.content == b.choices[0].message.content:
                continue
            for body in ({"id": a.id, "preferred_over": b.id}, {"id": a.id, "rating": 1},
                         {"id": b.id, "rating": -1}):  # fmt: skip
                assert httpx.post(f"{server.url}/v1/feedback", json=body).status_code == 200
            pairs.append((user(question), a.choices[0].message.content))
    assert len(pairs) >= 10
    first = tiny_served / "export" / "model"
    result = subprocess.run(
        [str(TOOLKIT_TRAIN), "recipe=nlp/smollm2_dpo", "data=feedback", f"data.path={tiny_served}/feedback",
         f"model.name_or_path={first}", "stages=[train,export]", "trainer.max_steps=12", "optim.lr=5e-3",
         "scheduler.num_warmup_steps=0", "data.batch_size=4", "trainer.val_check_interval=2",
         "trainer.limit_val_batches=1", "trainer.accelerator=cpu", "logger=none", "progress_bar=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (second_run,) = (tmp_path / "runs" / "nlp" / "smollm2_dpo").iterdir()
    split = json.loads((second_run / "data_split.json").read_text())
    assert str(tiny_served / "feedback") in json.dumps(split)  # the next run records where its data came from
    second = second_run / "export" / "model"
    before = sum(answer_logp(first, m, a) for m, a in pairs) / len(pairs)
    after = sum(answer_logp(second, m, a) for m, a in pairs) / len(pairs)
    assert after > before + 0.5, (before, after)
    with Server(second_run) as server:  # ... and the next model serves in turn
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        assert client.chat.completions.create(model="fine_tuned", messages=user("hi"), max_tokens=4).id


def curl_json(url: str, body: dict | str, headers: dict | None = None) -> tuple[int, dict]:
    """POST with curl: (status, parsed JSON body)."""
    data = body if isinstance(body, str) else json.dumps(body)
    args = [
        "curl",
        "-s",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-H",
        "content-type: application/json",
        "-d",
        data,
    ]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    text, status = out.rsplit("\n", 1)
    return int(status), json.loads(text)


def run_stages(tmp_path: Path, overrides: list[str]) -> Path:
    from tests.helpers import compose_config
    from toolkit.run.pipeline import run_pipeline

    cfg = compose_config([*overrides, "stages=[train,export]"])
    run_pipeline(cfg, tmp_path / "run")
    return tmp_path / "run"


def test_text_classifier_predicts_labels_with_probabilities(classifier_run: tuple, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    run_dir = copy_run(classifier_run, tmp_path)
    model_dir = run_dir / "export" / "model"
    with Server(run_dir) as server:
        status, body = curl_json(f"{server.url}/predict", {"text": "a gripping, beautifully acted film"})
        assert status == 200
        labels = body["labels"]
        assert [label["score"] for label in labels] == sorted(
            (label["score"] for label in labels), reverse=True
        )
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        with torch.no_grad():
            logits = model(**tokenizer("a gripping, beautifully acted film", return_tensors="pt")).logits
        expected = {model.config.id2label[i]: float(p) for i, p in enumerate(torch.softmax(logits, -1)[0])}
        assert {label["label"]: label["score"] for label in labels} == pytest.approx(expected, abs=1e-5)
        assert curl_json(f"{server.url}/predict", {"image": "aGVsbG8="})[1]["error"]["param"] == "text"
        assert curl_json(f"{server.url}/predict", "{not json")[0] == 400


def test_image_classifier_and_a_file_that_is_no_image(tmp_path: Path) -> None:
    from tests.helpers import TINY_IMAGES, TINY_VIT

    run_dir = run_stages(tmp_path, ["recipe=vision/vit_fashion_mnist", TINY_VIT, *TINY_IMAGES])
    image = Image.fromarray((np.arange(28 * 28) % 255).astype("uint8").reshape(28, 28))
    png = io.BytesIO()
    image.save(png, format="PNG")
    with Server(run_dir) as server:
        status, body = curl_json(
            f"{server.url}/predict", {"image": base64.b64encode(png.getvalue()).decode()}
        )
        assert status == 200 and len(body["labels"]) == 10
        assert body["labels"][0]["score"] >= body["labels"][-1]["score"]
        status, body = curl_json(
            f"{server.url}/predict", {"image": base64.b64encode(b"not an image").decode()}
        )
        assert status == 400 and body["error"]["param"] == "image"
        assert "not a base64-encoded image file" in body["error"]["message"]


def test_recommender_returns_unseen_raw_item_ids(tmp_path: Path) -> None:
    from tests.helpers import TINY_RECSYS, TINY_SASREC
    from toolkit.data.interactions import ItemVocabulary

    run_dir = run_stages(tmp_path, ["recipe=recsys/sasrec_movielens", TINY_SASREC, *TINY_RECSYS])
    vocab = ItemVocabulary.from_pretrained(run_dir / "export" / "model")
    history = vocab.items[:5]
    with Server(run_dir) as server:
        status, body = curl_json(f"{server.url}/predict", {"items": [*history, "no-such-item"], "top_k": 4})
        assert status == 200, body
        assert body["ignored"] == ["no-such-item"]
        recommended = [entry["item"] for entry in body["items"]]
        assert len(recommended) == 4 and not set(recommended) & set(history)
        assert set(recommended) <= set(vocab.items)
        status, body = curl_json(f"{server.url}/predict", {"items": ["nope", "nada"]})
        assert status == 400 and body["error"]["param"] == "items"


def test_terminal_chat_streams_the_same_answers_and_resets(smollm_run: Path, smollm: tuple) -> None:
    """toolkit-chat: multi-turn, /system resets with a new system prompt, /exit; answers as generate's."""
    script = "What is 2 + 2?\nAnd 3 + 3?\n/system You are a pirate.\nWhat is 2 + 2?\n/exit\n"
    result = subprocess.run(
        [str(TOOLKIT_SERVE.with_name("toolkit-chat")), f"from_run={smollm_run}", "chat.max_tokens=12"],
        input=script, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    first = offline_greedy(smollm, user("What is 2 + 2?"), 12)
    follow_up = [*user("What is 2 + 2?"), {"role": "assistant", "content": first}, *user("And 3 + 3?")]
    pirate = [{"role": "system", "content": "You are a pirate."}, *user("What is 2 + 2?")]
    expected = [
        first,
        offline_greedy(smollm, follow_up, 12),
        "(conversation reset)",
        offline_greedy(smollm, pirate, 12),
    ]
    out = result.stdout
    positions = [out.index(text) for text in expected]
    assert positions == sorted(positions), out
