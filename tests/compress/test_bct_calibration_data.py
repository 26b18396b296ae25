"""Calibration passages for BCT: a folder means its train split, passages are drawn with a seed and batched."""

import pytest
from transformers import AutoTokenizer

from effllm.compress.bct.calibration_data import calibration_batches, calibration_file, load_passages


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir / "model")  # byte-level, no padding token


def test_folder_means_its_train_split_and_bad_sources_name_the_fix(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_text("x" * 50)
    assert calibration_file(tmp_path) == tmp_path / "train.txt"
    assert calibration_file(tmp_path / "train.txt") == tmp_path / "train.txt"
    with pytest.raises(ValueError, match="a text file or a folder with train.txt"):
        calibration_file(tmp_path / "missing")
    (tmp_path / "short.txt").write_text("too short\n\nalso short")
    with pytest.raises(ValueError, match="no paragraph of >= 40 characters"):
        calibration_batches(tokenizer, tmp_path / "short.txt", 4, 16)


def test_passages_are_drawn_with_the_seed_and_truncated(tmp_path, tokenizer):
    text = "\n\n".join(f"passage number {i:02d} " + "word " * (8 + i) for i in range(30))
    (tmp_path / "t.txt").write_text(text)
    assert len(load_passages(tmp_path / "t.txt")) == 30
    first = calibration_batches(tokenizer, tmp_path / "t.txt", 5, 24, seed=0)
    again = calibration_batches(tokenizer, tmp_path / "t.txt", 5, 24, seed=0)
    other = calibration_batches(tokenizer, tmp_path / "t.txt", 5, 24, seed=1)
    assert len(first) == 5 and all(batch["input_ids"].shape[1] <= 24 for batch in first)
    assert [b["input_ids"].tolist() for b in first] == [b["input_ids"].tolist() for b in again]
    assert [b["input_ids"].tolist() for b in first] != [b["input_ids"].tolist() for b in other]
