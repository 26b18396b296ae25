"""Small local GLUE data in the real column layout, a word-level tokenizer and tiny BERT classifiers built offline.

A plain module (not a conftest): tests/cli, tests/eval and tests/recipes all build from it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

WORDS = ("a good film great fun bad dull awful movie plot the was and not very it is story he she said "
         "cat dog sat on mat ran home is a an of to in").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]

SST2 = [("a good film", 1), ("great fun", 1), ("bad and dull", 0), ("an awful movie", 0), ("the plot was good", 1),
        ("not very fun", 0), ("it is a great story", 1), ("dull dull dull", 0), ("the movie was bad", 0)]
PAIRS = [("he said the cat sat", "she said the cat sat", 1), ("the dog ran home", "the cat sat on the mat", 0),
         ("a good film", "a great movie", 1), ("the plot was dull", "it is a great story", 0),
         ("the cat sat on the mat", "the cat is on the mat", 1), ("he ran", "she sat", 0)]
STSB = [("the cat sat", "the cat sat", 5.0), ("the dog ran home", "a dog ran home", 4.2),
        ("a good film", "a bad film", 2.0), ("he said", "the mat", 0.2), ("great fun", "good fun", 3.9)]
MNLI = [("the cat sat on the mat", "the cat sat", 0), ("the dog ran home", "the dog sat", 2),
        ("he said it is good", "she said it", 1), ("a good film", "the film was good", 0)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(dict.fromkeys([*SPECIAL, *WORDS]))}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def save_classifier(folder: Path, num_labels: int, seed: int = 0) -> Path:
    """A tiny BERT sequence classifier with the word tokenizer, saved as a Hugging Face folder."""
    tokenizer = word_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_fixtures(root: Path) -> dict[str, Path]:
    """One local copy per format: sst2 as CSV, mrpc as JSONL, stsb as a parquet folder, mnli as a saved
    DatasetDict (validation_matched), rte as a TSV file."""
    from datasets import Dataset, DatasetDict

    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    sst2 = Dataset.from_dict({"sentence": [s for s, _ in SST2], "label": [y for _, y in SST2],
                              "idx": list(range(len(SST2)))})
    paths["sst2"] = root / "sst2.csv"
    sst2.to_csv(paths["sst2"], index=False)
    pairs = Dataset.from_dict({"sentence1": [a for a, _, _ in PAIRS], "sentence2": [b for _, b, _ in PAIRS],
                               "label": [y for _, _, y in PAIRS], "idx": list(range(len(PAIRS)))})
    paths["mrpc"] = root / "mrpc.jsonl"
    pairs.to_json(paths["mrpc"], lines=True)
    paths["rte"] = root / "rte.tsv"
    pairs.to_csv(paths["rte"], sep="\t", index=False)
    stsb = Dataset.from_dict({"sentence1": [a for a, _, _ in STSB], "sentence2": [b for _, b, _ in STSB],
                              "label": [y for _, _, y in STSB], "idx": list(range(len(STSB)))})
    paths["stsb"] = root / "stsb"
    paths["stsb"].mkdir()
    stsb.to_parquet(paths["stsb"] / "validation.parquet")
    mnli = Dataset.from_dict({"premise": [a for a, _, _ in MNLI], "hypothesis": [b for _, b, _ in MNLI],
                              "label": [y for _, _, y in MNLI], "idx": list(range(len(MNLI)))})
    paths["mnli"] = root / "mnli"
    DatasetDict({"validation_matched": mnli, "validation_mismatched": mnli.select([0, 1])}).save_to_disk(
        str(paths["mnli"]))
    return paths
