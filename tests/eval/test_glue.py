"""GLUE evaluation: the loader on local copies in every supported format, the metrics against hand computations,
and ``effllm eval --task glue:TASK`` end to end on tiny classifiers."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from glue_fixtures import MNLI, PAIRS, SST2, STSB, save_classifier, word_tokenizer, write_fixtures

from effllm.cli import main
from effllm.eval.glue import TASKS, compute_metrics, evaluate_glue, glue_metrics, glue_task, load_glue


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {labels: save_classifier(root / f"labels{labels}", labels) for labels in (1, 2, 3)}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- metrics against hand computations ------------------------------------------------------------------------
PREDICTIONS = [1, 1, 0, 0, 1, 0, 1, 1]
REFERENCES = [1, 0, 0, 1, 1, 0, 0, 1]  # tp 3 (0, 4, 7), fp 2 (1, 6), fn 1 (3), tn 2 (2, 5)


def test_classification_metrics_by_hand():
    assert glue_metrics(TASKS["mrpc"], PREDICTIONS, REFERENCES) == pytest.approx(
        {"accuracy": 5 / 8, "f1": 2 * 3 / (2 * 3 + 2 + 1)})
    mcc = (3 * 2 - 2 * 1) / math.sqrt((3 + 2) * (3 + 1) * (2 + 2) * (2 + 1))
    assert glue_metrics(TASKS["cola"], PREDICTIONS, REFERENCES) == pytest.approx({"matthews_correlation": mcc})
    assert glue_metrics(TASKS["cola"], [1] * 8, REFERENCES) == {"matthews_correlation": 0.0}  # undefined -> 0
    assert glue_metrics(TASKS["mnli"], [0, 1, 2, 2], [0, 2, 2, 1]) == {"accuracy": 0.5}


def test_correlation_metrics_by_hand():
    # deviations (-2, -1, 0, 1, 2) and (-1, -2, 1, 0, 2): products sum to 8, squares to 10 and 10
    assert glue_metrics(TASKS["stsb"], [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(
        {"pearson": 0.8, "spearmanr": 0.8})
    # ties share their average rank: ranks (1.5, 1.5, 3, 4.5, 4.5) against (1, 2, 3, 4, 5)
    tied = glue_metrics(TASKS["stsb"], [1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 2.0, 3.0, 3.0])
    assert tied["spearmanr"] == pytest.approx(9 / math.sqrt(90))
    assert tied["pearson"] == pytest.approx(float(torch.corrcoef(torch.tensor([[1.0, 2, 3, 4, 5],
                                                                                [1.0, 1, 2, 3, 3]]))[0, 1]))


def test_metric_source_is_reported():
    metrics, source = compute_metrics(TASKS["sst2"], [1, 0], [1, 1])
    assert metrics == {"accuracy": 0.5}
    assert source == "evaluate" or source.startswith("effllm (evaluate's glue metric unavailable")


# --- data ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, rows", [("sst2", SST2), ("mrpc", PAIRS), ("rte", PAIRS), ("stsb", STSB),
                                        ("mnli", MNLI)])
def test_local_copies_load_in_every_format(fixtures, task, rows):
    spec = glue_task(f"glue:{task}")
    data = load_glue(spec, fixtures[task])
    assert len(data) == len(rows)
    assert data[spec.text_columns[0]] == [row[0] for row in rows]
    assert data["label"] == pytest.approx([row[-1] for row in rows])
    if task == "mnli":  # validation_matched, not the mismatched split beside it
        assert len(load_glue(TASKS["mnli_mismatched"], fixtures[task])) == 2


def test_data_errors(fixtures, tmp_path):
    with pytest.raises(ValueError, match="unknown GLUE task 'glue:sst3'"):
        glue_task("glue:sst3")
    with pytest.raises(ValueError, match="missing sentence1, sentence2 \\(it has sentence, label, idx\\)"):
        load_glue(TASKS["mrpc"], fixtures["sst2"])
    with pytest.raises(FileNotFoundError, match="no validation.csv"):
        load_glue(TASKS["sst2"], tmp_path)
    with pytest.raises(ValueError, match="no split 'test'"):
        load_glue(TASKS["mnli"], fixtures["mnli"], split="test")
    hidden = tmp_path / "test.csv"
    hidden.write_text("sentence,label\na good film,-1\n")
    with pytest.raises(ValueError, match="hidden labels"):
        load_glue(TASKS["sst2"], hidden)


# --- evaluation ---------------------------------------------------------------------------------------------
def _by_hand(model_dir, rows, regression=False):
    """Predictions of the saved classifier, one example at a time (no batching, no padding)."""
    from transformers import BertForSequenceClassification

    model, tokenizer = BertForSequenceClassification.from_pretrained(model_dir).eval(), word_tokenizer()
    predictions = []
    with torch.no_grad():
        for row in rows:
            logits = model(**tokenizer(*row[:-1], return_tensors="pt")).logits[0]
            predictions.append(logits[0].item() if regression else int(logits.argmax()))
    return predictions


def test_cli_glue_sst2_matches_a_hand_count(fixtures, classifiers, tmp_path):
    out = tmp_path / "sst2.json"
    result = run("eval", classifiers[2], "--task", "glue:sst2", "--dataset", fixtures["sst2"], "--batch-size", "4",
                 "--json", out)
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    predictions = _by_hand(classifiers[2], SST2)
    correct = sum(p == row[1] for p, row in zip(predictions, SST2))
    assert figures["metrics"]["accuracy"] == pytest.approx(correct / len(SST2))
    assert figures["examples"] == len(SST2) and figures["split"] == "validation" and figures["task"] == "glue:sst2"
    assert "accuracy" in result.output


def test_glue_pairs_regression_and_three_classes(fixtures, classifiers):
    """Batched evaluation with padding agrees with one-at-a-time predictions on every task shape."""
    from effllm.auto_model import load_pretrained
    from effllm.model_loading import ModelRef

    for task, labels, rows in (("mrpc", 2, PAIRS), ("stsb", 1, STSB), ("mnli", 3, MNLI)):
        spec = TASKS[task]
        model = load_pretrained(ModelRef.parse(str(classifiers[labels])))
        result = evaluate_glue(model, word_tokenizer(), spec, load_glue(spec, fixtures[task]), batch_size=3,
                               progress=False)
        by_hand = _by_hand(classifiers[labels], rows, regression=labels == 1)
        assert result.predictions == pytest.approx(by_hand, abs=1e-5)
        # the metrics of the predictions it made (batched predictions move in the 6th digit with the thread count,
        # and a Pearson over a few rows amplifies that beyond any fixed tolerance against by_hand's)
        labels_ = [row[-1] for row in rows]
        assert result.metrics == pytest.approx(glue_metrics(spec, result.predictions, labels_), rel=1e-6)
        assert result.metrics == pytest.approx(glue_metrics(spec, by_hand, labels_), rel=1e-2)
        assert set(result.metrics) == set(spec.metrics)


def test_cli_glue_errors(fixtures, classifiers, tmp_path):
    result = run("eval", classifiers[2], "--task", "glue:mnli", "--dataset", fixtures["mnli"])
    assert result.exit_code == 2 and "the model has 2 output labels but GLUE mnli needs 3" in result.output
    result = run("eval", classifiers[2], "--task", "glue:nope", "--dataset", fixtures["sst2"])
    assert result.exit_code == 2 and "unknown GLUE task" in result.output
    result = run("eval", classifiers[2], "--task", "glue:sst2", "--dataset", tmp_path / "missing.csv")
    assert result.exit_code == 2 and "does not exist" in result.output
