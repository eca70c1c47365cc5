"""LLM evaluation beyond perplexity: lm-evaluation-harness tasks on every causal-LM variant, and held-out
prompts answered side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from toolkit.data.assets import asset_path
from toolkit.data.sources import load_splits
from toolkit.errors import ToolkitError
from toolkit.models.build import load_tokenizer
from toolkit.run.pipeline import run_pipeline
from toolkit.run.samples import held_out_prompts
from toolkit.tasks.harness import flatten_results, task_manager

from .helpers import copy_run, quantize_cfg

PROMPT = "Is the following movie review positive or negative? Answer with one word.\n\nReview: {{text}}"


def sentiment_task(folder: Path, test_rows: int | None = None) -> Path:
    """An lm-eval multiple-choice task over the Rotten Tomatoes snippets of the SFT recipes' own test split
    (the same seed and split sizes: no training row is scored), in the recipe's prompt."""
    folder.mkdir(parents=True, exist_ok=True)
    test = load_splits(asset_path("rotten_tomatoes"), None, 0.1, 0.1, 42)["test"]
    rows = [r for r in test if r["category"] in ("fresh", "rotten")][:test_rows]
    data = folder / "rt_test.jsonl"
    data.write_text(
        "".join(json.dumps({"text": r["text"], "label": int(r["category"] == "fresh")}) + "\n" for r in rows)
    )
    task = {
        "task": "rt_sentiment",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": PROMPT,
        "doc_to_choice": ["negative", "positive"],
        "doc_to_target": "label",
        "target_delimiter": "",  # the answer follows the chat template's assistant header directly
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / "rt_sentiment.yaml").write_text(OmegaConf.to_yaml(task))
    return folder


def lm_eval_overrides(tasks: Path, limit: int) -> dict:
    return {"tasks": ["rt_sentiment"], "include_path": str(tasks), "limit": limit, "batch_size": 8}


def test_every_variant_gets_harness_scores_and_held_out_answers(sft_run, tmp_path):
    cfg, _ = sft_run
    run_dir = copy_run(sft_run, tmp_path)
    tasks = sentiment_task(tmp_path / "tasks", test_rows=16)
    quantize = OmegaConf.merge(quantize_cfg("int8_weight_only"), {"max_metric_drop": None})
    cfg = OmegaConf.merge(
        cfg,
        {
            "stages": ["quantize", "evaluate", "report"],
            "quantize": quantize,
            "evaluate": {"samples": 2, "max_new_tokens": 4, "lm_eval": lm_eval_overrides(tasks, 8)},
        },
    )
    assert run_pipeline(cfg, run_dir) == ["quantize", "evaluate", "report"]
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    for variant in ("base", "fine_tuned", "quantized"):
        assert 0.0 <= metrics[variant]["lm_eval/rt_sentiment/acc"] <= 1.0
        assert "perplexity" in metrics[variant]  # the task's own metrics stay
    samples = json.loads((run_dir / "evaluate" / "samples.json").read_text())
    assert len(samples) == 2
    for sample in samples:
        assert sample["prompt"].endswith("<|im_start|>assistant\n")  # the turn to answer, nothing of it
        assert sample["reference"] in ("positive", "negative")
        assert set(sample["answers"]) == {"base", "fine_tuned", "quantized"}
    report = (run_dir / "report.md").read_text()
    assert "## Held-out prompts" in report and "| lm_eval/rt_sentiment/acc |" in report
    assert f"| reference | {samples[0]['reference']} |" in report


def test_held_out_prompt_is_the_conversation_before_its_last_answer():
    from toolkit.data.conversations import encode_conversation

    tokenizer = load_tokenizer(asset_path("smollm2_135m_instruct"))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green."},
    ]
    encoded = encode_conversation(tokenizer, messages, "assistant")
    from datasets import Dataset

    [prompt] = held_out_prompts(Dataset.from_list([encoded]), 1)
    assert tokenizer.decode(prompt["reference_ids"]) == "Green.<|im_end|>"
    text = tokenizer.decode(prompt["prompt_ids"])
    assert text.endswith("Another one?<|im_end|>\n<|im_start|>assistant\n") and "Blue." in text


def test_harness_results_flatten_to_one_name_per_metric():
    results = {
        "rt": {"alias": "rt", "acc,none": 0.75, "acc_stderr,none": "N/A", "sample_len": 8},
        "gsm": {"exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1},
    }
    assert flatten_results(results) == {
        "lm_eval/rt/acc": 0.75,
        "lm_eval/gsm/exact_match[strict-match]": 0.5,
        "lm_eval/gsm/exact_match_stderr[strict-match]": 0.1,
    }


def test_unknown_harness_task_is_refused_before_anything_runs(tmp_path):
    tasks = sentiment_task(tmp_path / "tasks", test_rows=4)
    options = OmegaConf.create({"tasks": ["rt_sentimnt"], "include_path": str(tasks)})
    with pytest.raises(ToolkitError) as err:
        task_manager(options)
    assert str(err.value) == (
        f"evaluate.lm_eval.tasks: 'rt_sentimnt' is not in the harness's tasks or {tasks}; list them with "
        "lm_eval ls tasks; evaluate.lm_eval.include_path adds a folder of task YAMLs"
    )


@pytest.mark.slow  # ~10 min on 2 CPU cores: 40 real LoRA steps of a 135M model, then 2 x 400 harness requests
def test_sentiment_sft_beats_the_base_model_on_a_local_harness_task(tmp_path):
    """The real SmolLM2-135M-Instruct, LoRA-tuned by the sentiment SFT recipe as written (40 steps), scores
    higher than its base on held-out snippets as lm-eval multiple choice (measured: 0.745 -> 0.845 on 200)."""
    from .helpers import compose_config

    tasks = sentiment_task(tmp_path / "tasks")
    cfg = compose_config(
        [
            "recipe=nlp/smollm2_lora_sft",
            "stages=[train,export,evaluate]",
            "logger=none",
            "progress_bar=false",
            "data.max_eval_examples=16",  # the recipe's own generated-label accuracy: not what is tested here
            "task.max_new_tokens=3",
            "trainer.limit_val_batches=1",
        ]
    )
    cfg.evaluate.lm_eval = OmegaConf.merge(cfg.evaluate.lm_eval, lm_eval_overrides(tasks, 200))
    run_pipeline(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "evaluate" / "metrics.json").read_text())
    base, tuned = (metrics[v]["lm_eval/rt_sentiment/acc"] for v in ("base", "fine_tuned"))
    print(f"lm_eval rt_sentiment acc: base {base:.3f}, fine-tuned {tuned:.3f}")
    assert tuned > base + 0.03, (base, tuned)
