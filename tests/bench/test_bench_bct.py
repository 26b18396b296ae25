"""The BCT benchmark's pieces: passages, Spearman, downstream pairs (the run itself is a benchmark, not a test)."""

import torch

from effllm.bench.bct import load_passages, make_pairs, pair_features, spearman


def test_passages_are_paragraphs_of_at_least_40_characters(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("short\n\n" + "a" * 40 + "\n\n  " + "b" * 50 + "  \n\n" + "c" * 39 + "\n")
    assert load_passages(path) == ["a" * 40, "b" * 50]
    assert load_passages(path, 1, skip=1) == ["b" * 50]


def test_spearman_is_rank_correlation():
    x = torch.randn(500, dtype=torch.float64)
    assert abs(spearman(x, x.exp()) - 1) < 1e-12  # monotone: ranks equal
    assert abs(spearman(x, -x) + 1) < 1e-12
    assert abs(spearman(x, torch.randn(500, dtype=torch.float64))) < 0.2


def test_pairs_are_balanced_and_negatives_are_not_neighbours():
    pairs, labels = make_pairs(50, seed=0)
    assert len(pairs) == 2 * 49 and labels.sum() == 49
    positives, negatives = pairs[labels == 1], pairs[labels == 0]
    assert torch.equal(positives[:, 1] - positives[:, 0], torch.ones(49, dtype=torch.long))
    assert ((negatives[:, 1] - negatives[:, 0]).abs() > 1).all()
    features = pair_features(torch.randn(50, 8), pairs)
    assert features.shape == (98, 32)
