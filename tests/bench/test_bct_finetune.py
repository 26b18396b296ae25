"""The BCT benchmark's fine-tuned downstream classifier, on a tiny BERT built from a config (seconds, CPU)."""

import random

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from effllm.bench.bct_finetune import (
    INFO_FILE,
    FinetuneConfig,
    cache_key,
    calibration_pairs,
    encode,
    evaluation_batches,
    finetuned_classifier,
    length_grouped_batches,
    pair_set,
    predict,
    task_pairs,
    train,
    warmup_linear_decay,
)

WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "paper", "light", "green", "north", "quiet"]


def paragraph(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(8, 20))) + "."


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny BERT folder (model + WordPiece tokenizer) and a corpus folder with train.txt and valid.txt."""
    root = tmp_path_factory.mktemp("bct_finetune")
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS])})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.3)  # wide init: 3 steps visibly learn
    model_dir = root / "model"
    BertForSequenceClassification(config).save_pretrained(model_dir)  # a pretrained-looking folder
    tokenizer.save_pretrained(model_dir)
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for name, count in (("train.txt", 24), ("valid.txt", 8)):
        (corpus / name).write_text("\n\n".join(paragraph(rng) for _ in range(count)) + "\n")
    return model_dir, corpus, tokenizer


def tiny_config(model_dir, corpus, **changes) -> FinetuneConfig:
    fields = dict(model=str(model_dir), corpus=str(corpus), train_paragraphs=8, valid_paragraphs=6, steps=3,
                  batch_size=14, lr=1e-3, eval_every=1, max_length=48)
    return FinetuneConfig(**{**fields, **changes})


def test_pairs_come_from_the_middle_of_train_and_the_start_of_valid(tiny_setup):
    model_dir, corpus, _ = tiny_setup
    train_pairs, valid_pairs = task_pairs(tiny_config(model_dir, corpus))
    train_text = (corpus / "train.txt").read_text().split("\n\n")
    assert len(train_pairs) == 2 * 7 and int(train_pairs.labels.sum()) == 7
    assert set(train_pairs.first) == set(train_text[12:19])  # paragraphs 12..19 of 24; the last is only a B
    positives = [i for i in range(len(train_pairs)) if train_pairs.labels[i] == 1]
    assert all(train_text.index(train_pairs.second[i]) == train_text.index(train_pairs.first[i]) + 1
               for i in positives)
    assert len(valid_pairs) == 2 * 5
    with pytest.raises(ValueError, match="only 8 of the 9"):
        task_pairs(tiny_config(model_dir, corpus, valid_paragraphs=9))


def test_length_grouped_batches_cover_every_pair_once_sorted_within_a_batch():
    lengths = [random.Random(1).randrange(5, 100) for _ in range(103)]
    batches = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(i for batch in batches for i in batch) == list(range(103))
    assert all(len(batch) <= 8 for batch in batches)
    assert all([lengths[i] for i in batch] == sorted(lengths[i] for i in batch) for batch in batches)
    again = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(0))
    assert again == batches  # the seed decides the epoch


def test_warmup_then_linear_decay():
    multipliers = [warmup_linear_decay(step, 4, 20) for step in range(20)]
    assert multipliers[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a > b for a, b in zip(multipliers[4:], multipliers[5:]))
    assert multipliers[-1] == pytest.approx(1 / 16)
    assert warmup_linear_decay(0, 0, 3) == 1.0  # no warm-up: full rate from the first step


def test_training_lowers_the_loss_and_keeps_the_best_validation_step(tiny_setup):
    model_dir, corpus, tokenizer = tiny_setup
    config = tiny_config(model_dir, corpus)
    train_pairs, valid_pairs = task_pairs(config)
    model = BertForSequenceClassification.from_pretrained(model_dir)
    model, record = train(model, tokenizer, train_pairs, valid_pairs, config, log=lambda _: None)
    losses = [point["train_loss"] for point in record["curve"]]
    assert len(losses) == 3 and losses[-1] < losses[0]  # full batch: the same 14 pairs every step
    best = max(record["curve"], key=lambda point: point["valid_accuracy"])
    assert record["best_step"] == best["step"] and record["valid_accuracy"] == best["valid_accuracy"]
    valid = evaluation_batches(tokenizer, valid_pairs, 4, config.max_length)
    assert float((predict(model, valid) == valid_pairs.labels).float().mean()) == pytest.approx(
        record["valid_accuracy"], abs=1e-4)  # the kept weights are the best step's


def test_predictions_come_back_in_pair_order(tiny_setup):
    model_dir, _, tokenizer = tiny_setup
    pairs = pair_set([paragraph(random.Random(i)) for i in range(9)], seed=3)
    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    batched = predict(model, evaluation_batches(tokenizer, pairs, 4, 48))
    with torch.no_grad():
        single = [int(model(**encode(tokenizer, pairs, [i], 48)).logits.argmax(-1)) for i in range(len(pairs))]
    assert batched.shape == (len(pairs),) and batched.tolist() == single


def test_cache_round_trip_skips_training(tiny_setup, tmp_path):
    model_dir, corpus, tokenizer = tiny_setup
    config = tiny_config(model_dir, corpus, steps=2)
    logs = []
    trained, _, record = finetuned_classifier(config, tmp_path, log=logs.append)
    assert not record["from_cache"] and (tmp_path / cache_key(config) / INFO_FILE).is_file()
    assert any("fine-tune: {'step': 2" in line for line in logs)
    logs.clear()
    cached, cached_tokenizer, cached_record = finetuned_classifier(config, tmp_path, log=logs.append)
    assert cached_record["from_cache"] and not any("'step'" in line for line in logs)
    assert cached_record["curve"] == record["curve"] and cached_record["best_step"] == record["best_step"]
    batch = encode(cached_tokenizer, task_pairs(config)[1], list(range(4)), 48)
    with torch.no_grad():
        assert torch.equal(cached(**batch).logits, trained(**batch).logits)
    assert cache_key(tiny_config(model_dir, corpus, steps=2, seed=1)) != cache_key(config)
    assert cache_key(tiny_config(model_dir, corpus, steps=2, lr=2e-3)) != cache_key(config)


def test_the_fine_tuned_classifier_compresses_with_gptq_on_text_pairs(tiny_setup):
    from dataclasses import replace

    from effllm.compress.bct import BCTConfig, compress

    model_dir, corpus, tokenizer = tiny_setup
    config = tiny_config(model_dir, corpus)
    train_pairs, valid_pairs = task_pairs(config)
    calib = calibration_pairs(tokenizer, train_pairs, 6, 4, config.max_length, seed=0)
    assert sum(len(batch["input_ids"]) for batch in calib) == 6
    assert all((batch["token_type_ids"] == 1).any() for batch in calib)  # pairs, not single paragraphs
    w4 = BCTConfig.uniform(4, 8)
    gptq = replace(w4, linear_weights=replace(w4.linear_weights, rounding="gptq"))
    model = compress(BertForSequenceClassification.from_pretrained(model_dir).eval(), gptq, calib=calib)
    assert type(model.classifier).__name__ == "BCTLinear" and type(model.bert.pooler.dense).__name__ == "BCTLinear"
    assert type(model.bert.pooler.activation).__name__ == "TableActivation"  # the pooler's tanh
    predictions = predict(model, evaluation_batches(tokenizer, valid_pairs, 4, config.max_length))
    assert predictions.shape == (len(valid_pairs),) and set(predictions.tolist()) <= {0, 1}
