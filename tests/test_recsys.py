"""Sequential recommendation: leave-last-out split, full-catalogue HR/NDCG, popularity, models, recipes."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from transformers import AutoModel

from toolkit.data.interactions import ItemVocabulary, SequentialRecData, training_windows
from toolkit.errors import ToolkitError
from toolkit.models.recommenders import BERT4RecConfig, BERT4RecModel, SASRecConfig, SASRecModel
from toolkit.run.pipeline import run_pipeline
from toolkit.tasks.next_item import NextItemPrediction, exclude, hit_rate_and_ndcg, rank_of_targets

from .helpers import TINY_BERT4REC, TINY_RECSYS, TINY_SASREC, compose_config

# user, item, timestamp; rows deliberately out of time order. User 1: a b c d e f (times 10..60),
# user 2: c a e b (times 5..8), user 3: only two interactions (dropped with min_interactions 3).
FIXTURE_ROWS = [
    ("u1", "d", 40), ("u2", "e", 7), ("u1", "a", 10), ("u1", "f", 60), ("u3", "a", 1), ("u2", "c", 5),
    ("u1", "c", 30), ("u2", "b", 8), ("u1", "b", 20), ("u3", "b", 2), ("u1", "e", 50), ("u2", "a", 6),
]  # fmt: skip


@pytest.fixture
def interactions(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,ts\n" + "".join(f"{u},{i},{t}\n" for u, i, t in FIXTURE_ROWS))
    return path


def fixture_data(path, **kwargs) -> SequentialRecData:
    columns = {"user_column": "user", "item_column": "item", "time_column": "ts"}
    data = SequentialRecData(str(path), min_interactions=3, max_length=3, **columns, **kwargs)
    data.setup()
    return data


def decode(data, ids):
    return [data.vocab.items[i - 1] for i in ids if i > 0]


def test_leave_last_out_split_never_shows_a_later_item(interactions, caplog):
    with caplog.at_level(logging.WARNING, logger="toolkit.data.interactions"):
        data = fixture_data(interactions)
    assert "dropped 1 of 3 users with fewer than 3 interactions" in caplog.text
    assert data.vocab.items == ["a", "b", "c", "d", "e", "f"]  # u3's items stay: they are in others' logs
    test = {tuple(decode(data, r["seen"])): decode(data, [r["target"]]) for r in data.splits["test"]}
    assert test == {("a", "b", "c", "d", "e"): ["f"], ("c", "a", "e"): ["b"]}
    val = [(decode(data, r["seen"]), decode(data, [r["target"]])) for r in data.splits["validation"]]
    assert val == [(["a", "b", "c", "d"], ["e"]), (["c", "a"], ["e"])]
    # training windows of u1 hold a..d only (its validation item e and test item f never appear)
    train = [(decode(data, r["input_ids"]), decode(data, r["labels"])) for r in data.splits["train"]]
    assert train == [(["a", "b", "c"], ["b", "c", "d"]), (["c"], ["a"])]
    times = {(u, i): t for u, i, t in FIXTURE_ROWS}
    cutoff = {"u1": 50, "u2": 7}  # the validation item's time: nothing at or after it may be trained on
    for user, (inputs, labels) in zip(["u1", "u2"], train, strict=True):
        assert all(times[(user, i)] < cutoff[user] for i in inputs + labels)


def test_eval_batch_predicts_the_target_at_the_last_position(interactions):
    data = fixture_data(interactions)
    batch = next(iter(data.test_dataloader()))
    assert decode(data, batch["input_ids"][0].tolist()) == ["c", "d", "e"]  # the last max_length items
    assert batch["labels"][:, :-1].eq(-100).all()
    assert decode(data, batch["labels"][:, -1].tolist()) == ["f", "b"]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1]
    masked = fixture_data(interactions, objective="masked")
    row = next(iter(masked.test_dataloader()))["input_ids"][1].tolist()
    assert row == [masked.vocab.index["a"], masked.vocab.index["e"], masked.vocab.mask_id]


def test_masked_training_masks_only_real_items(interactions):
    data = fixture_data(interactions, objective="masked", mask_prob=0.5)
    torch.manual_seed(0)
    batch = data.collate_train(data.splits["train"])
    chosen = batch["labels"] != -100
    assert chosen.any(1).all(), "every window has a masked item"
    assert (batch["input_ids"][chosen] == data.vocab.mask_id).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    last_only = fixture_data(interactions, objective="masked", mask_prob=1.0, mask_last_prob=1.0)
    batch = last_only.collate_train(last_only.splits["train"])
    assert (batch["labels"][:, :-1] == -100).all() and (
        batch["input_ids"][:, -1] == last_only.vocab.mask_id
    ).all()


def test_training_windows_cover_long_histories_without_gaps():
    history = list(range(1, 12))
    windows = training_windows(history, length=4, objective="causal")
    assert windows == [[7, 8, 9, 10, 11], [3, 4, 5, 6, 7], [1, 2, 3]]
    assert {x for w in windows for x in w[1:]} | {1} == set(history)  # every item is a label once


def test_hr_and_ndcg_match_hand_computed_values():
    scores = torch.tensor([[0.0, 0.9, 0.1, 0.5, 0.3], [0.0, 0.2, 0.2, 0.8, 0.1]])
    seen = torch.tensor([[3, 0], [0, 0]])  # user 0 has seen item 3; 0 pads
    ranked = exclude(scores, seen, never=[0])
    ranks = rank_of_targets(ranked, torch.tensor([4, 2]))
    # user 0: item 3 excluded -> order 1 (0.9), 4 (0.3), 2 (0.1): rank 1; user 1: 3, then 1 and 2 tie
    # at 0.2 and the lower id goes first -> rank 2
    assert ranks.tolist() == [1, 2]
    hit, ndcg = hit_rate_and_ndcg(ranks, k=2)
    assert hit.tolist() == [1.0, 0.0]
    assert ndcg.tolist() == pytest.approx([1 / math.log2(3), 0.0])
    hit3, ndcg3 = hit_rate_and_ndcg(ranks, k=3)
    assert ndcg3.tolist() == pytest.approx([1 / math.log2(3), 1 / math.log2(4)])


def test_popularity_baseline_on_the_fixture(interactions):
    data = fixture_data(interactions)
    task = NextItemPrediction(k=1)
    task.bind(data)
    # visible counts (everything but the test items): a 2, b 1, c 2, d 1, e 2. u1 has seen a-e, so f
    # (count 0) is the only item left: a hit. u2 has seen c, a, e: b and d tie at 1 and b has the lower id.
    assert task.baselines(data) == {"popularity": {"hr@1": 1.0, "ndcg@1": 1.0}}
    without_filter = NextItemPrediction(k=1, exclude_seen=False)
    without_filter.bind(data)
    assert without_filter.baselines(data)["popularity"]["hr@1"] == 0.0  # a (count 2) would always win


def test_causal_model_scores_only_from_the_past_and_round_trips(tmp_path):
    config = SASRecConfig(vocab_size=12, n_embd=16, n_layer=1, n_head=2, n_positions=6, bos_token_id=0,
                          eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = SASRecModel(config).eval()
    a = torch.tensor([[0, 3, 4, 5, 6, 7]])
    b = torch.tensor([[0, 3, 4, 5, 9, 11]])
    labels = torch.full_like(a, -100)
    labels[0, 3] = 8
    with torch.no_grad():
        out_a, out_b = model(a, labels=labels), model(b, labels=labels)
        assert out_a.logits.shape == (1, 12)  # scored at the labelled position only
        torch.testing.assert_close(out_a.logits, out_b.logits)  # later items do not leak backwards
        assert model(a).logits.shape == (1, 12)  # no labels: the next-item scores after the sequence
    assert config.multi_query is False  # one key/value head per attention head, as in SASRec
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)  # what quantization converts
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, SASRecModel)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(a).logits, model(a).logits)


def test_masked_model_reads_both_sides_of_the_mask_and_round_trips(tmp_path):
    config = BERT4RecConfig(vocab_size=13, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=6)  # fmt: skip
    torch.manual_seed(0)
    model = BERT4RecModel(config).eval()
    mask = 12
    a = torch.tensor([[0, 3, 4, mask, 6, 7]])
    b = torch.tensor([[0, 3, 4, mask, 9, 11]])  # other items after the mask
    labels = torch.full_like(a, -100)
    labels[0, 3] = 5
    with torch.no_grad():
        out_a, out_b = model(a, labels=labels), model(b, labels=labels)
        assert out_a.logits.shape == (1, 13)
        # bidirectional: the items after the mask change its scores (small at N(0, 0.02) initialisation)
        assert (out_a.logits - out_b.logits).abs().max() > 1e-5
        assert out_a.loss == pytest.approx(
            float(torch.nn.functional.cross_entropy(out_a.logits, labels[0, 3:4]))
        )
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, BERT4RecModel)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(a, labels=labels).logits, out_a.logits)


def test_interactions_from_parquet_match_csv(interactions, tmp_path):
    import pandas as pd

    parquet = tmp_path / "log.parquet"
    pd.read_csv(interactions).to_parquet(parquet)
    from_csv, from_parquet = fixture_data(interactions), fixture_data(parquet)
    assert from_parquet.vocab.items == from_csv.vocab.items
    assert from_parquet.splits == from_csv.splits


def test_missing_columns_name_the_columns_present(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,product,when\nu1,a,1\n")
    with pytest.raises(ToolkitError) as err:
        SequentialRecData(str(path), user_column="user", item_column="item", time_column="ts").setup()
    assert "lack column(s) ['item', 'ts']" in str(err.value)
    assert "columns present: user, product, when" in str(err.value)


def test_too_few_interactions_are_errors_with_counts(interactions):
    columns = {"user_column": "user", "item_column": "item", "time_column": "ts"}
    with pytest.raises(
        ToolkitError, match=r"no user has data.min_interactions=10 interactions \(all 3 users"
    ):
        SequentialRecData(str(interactions), min_interactions=10, **columns).setup()
    with pytest.raises(ToolkitError, match="data.min_interactions=2: leave-last-out needs at least 3"):
        SequentialRecData(str(interactions), min_interactions=2, **columns).setup()
    with pytest.raises(ToolkitError, match="data.objective 'mlm' unknown; valid: causal, masked"):
        SequentialRecData(str(interactions), objective="mlm", **columns)


@pytest.mark.parametrize(
    "recipe,model", [("recsys/sasrec_movielens", TINY_SASREC), ("recsys/bert4rec_movielens", TINY_BERT4REC)]
)
def test_recsys_recipe_end_to_end(recipe, model, tmp_path):
    cfg = compose_config([f"recipe={recipe}", model, *TINY_RECSYS])
    assert run_pipeline(cfg, tmp_path) == ["train", "export", "evaluate", "report"]
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert set(metrics) == {"base", "fine_tuned", "popularity"}
    for variant in metrics.values():
        assert 0.0 <= variant["ndcg@10"] <= variant["hr@10"] <= 1.0
    exported = tmp_path / "export" / "model"
    vocab = ItemVocabulary.from_pretrained(exported)
    model = AutoModel.from_pretrained(exported).eval()
    assert model.config.vocab_size == vocab.size and model.config.bos_token_id == 0
    assert (vocab.mask_id is not None) == recipe.startswith("recsys/bert4rec")
    split = json.loads((tmp_path / "data_split.json").read_text())
    assert split["test"]["rows"] == 40 and split["validation"]["rows"] == 40
