"""The ``effllm`` command line. Errors are one clear line: exit code 2 for usage/config errors, 1 for failures.

Subcommands import what they need when they run, so ``effllm --help`` stays fast.
"""

from __future__ import annotations

import platform
import sys

import click

from effllm import __version__


class UsageError(click.UsageError):
    """Bad input from the user: exit code 2."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="effllm")
def main() -> None:
    """effllm: 8-bit optimizers, post-training quantization and blockwise compression for LLMs."""


@main.command()
def env() -> None:
    """Versions, devices and which kernel backend runs where."""
    import torch

    from effllm import kernels

    rows = [
        ("effllm", __version__),
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("cpu threads", str(torch.get_num_threads())),
        ("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"),
    ]
    for name in ("triton", "transformers", "bitsandbytes", "safetensors", "accelerate"):
        rows.append((name, _version_of(name)))
    try:
        backends = kernels.describe()
    except (ValueError, RuntimeError) as error:
        raise UsageError(str(error)) from None
    rows += [(f"kernels ({key})", value) for key, value in backends.items()]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")


def _version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


@main.command()
@click.option("--text", "text_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Any English text file (e.g. ../shared/corpus/train.txt); bytes are the tokens.")
@click.option("--steps", type=click.IntRange(10), default=200, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(text_path: str, steps: int, seed: int) -> None:
    """Train a tiny LM with torch AdamW and effllm AdamW8bit side by side: loss and optimizer-state memory."""
    from effllm.train.optimizer_demo import format_rows, run_demo

    try:
        rows = run_demo(text_path, steps=steps, seed=seed)
    except ValueError as error:
        raise UsageError(str(error)) from None
    click.echo(format_rows(rows))


@main.group()
def bench() -> None:
    """Benchmarks, measured side by side in one run."""


@bench.command("optim")
@click.option("--sizes", default=None, help="Parameter counts to measure, or a model's shapes (smollm2-135m); "
              "default 1M,4M,16M,64M,100M,smollm2-135m.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1), help="Best of N after warm-up.")
@click.option("--no-bnb", is_flag=True, help="Leave bitsandbytes out.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--cache", type=click.Choice(["cold", "warm"]), default="cold", show_default=True,
              help="cold: caches flushed before each timed step, as in training; warm: not.")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(1),
              help="Run it all in N fresh processes and report their median and range (each process is one draw "
              "of where its tensors land in memory).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the rows as JSON here.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False),
              help="Write/refresh the optimizer section of this markdown file (e.g. docs/benchmarks.md).")
@click.option("--png", "png_path", type=click.Path(dir_okay=False),
              help="Draw step time against parameters here (linked from the section when beside it).")
def bench_optim(sizes: str, repeats: int, no_bnb: bool, device: str, cache: str, processes: int,
                json_path: str | None, markdown_path: str | None, png_path: str | None) -> None:
    """Step time and state bytes/param: torch AdamW vs bitsandbytes vs effllm AdamW8bit."""
    from effllm.bench import optim

    try:
        parsed = optim.parse_sizes(sizes or optim.DEFAULT_SIZES)
    except ValueError as error:
        raise UsageError(f"--sizes: {error}") from None
    try:
        optim.check_device(device)
    except ValueError as error:
        raise UsageError(f"--device {error}") from None
    if processes == 1:
        rows = optim.run(parsed, repeats=repeats, include_bnb=not no_bnb, device=device, cache=cache)
    else:
        rows = optim.run_in_processes(parsed, processes, repeats=repeats, include_bnb=not no_bnb, device=device,
                                      cache=cache)
    optim.write(rows, json_path, markdown_path, device=device, png_path=png_path)


def _group_size(value: str) -> int | None:
    if value.lower() in ("channel", "none", "0", "-1"):
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--group-size {value!r}: give a positive integer or 'channel'") from None


def _method_options(pairs: tuple[str, ...]) -> dict:
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {pair!r}: write KEY=VALUE, e.g. --option epochs=2")
        options[key.strip()] = yaml.safe_load(value)
    return options


@main.command()
@click.argument("model")
@click.option("--method", type=click.Choice(["rtn", "gptq", "cbq"]), default="rtn", show_default=True)
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bits (2..8).")
@click.option("--group-size", default="64", show_default=True, help="Input columns per scale, or 'channel'.")
@click.option("--sym/--asym", "symmetric", default=False, show_default=True, help="Symmetric or asymmetric grid.")
@click.option("--act-bits", type=int, default=None, help="Per-token activation bits (4..8); weight-only if unset.")
@click.option("--calib", default=None, help="Calibration text: a file, a corpus folder, or wikitext2/c4.")
@click.option("--nsamples", type=int, default=32, show_default=True, help="Calibration sequences.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sequence.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="Calibration device (default: cuda if available, else cpu).")
@click.option("--option", "options", multiple=True, help="Method option KEY=VALUE (GPTQ/CBQ config fields).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML/JSON PTQ config; command-line options given explicitly override it.")
@click.option("--gguf-file", default=None, help="GGUF file name inside MODEL (a folder or hub repo).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output model folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT.checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code from the hub (off by default).")
@click.option("--format", "out_format", type=click.Choice(["effllm", "compressed-tensors"]), default="effllm",
              show_default=True, help="OUT as effllm's packed folder, or compressed-tensors (weight-only; loads in "
                                      "plain transformers, vLLM serves 4 and 8 bits).")
@click.pass_context
def quantize(ctx, model, method, bits, group_size, symmetric, act_bits, calib, nsamples, seqlen, seed, device,
             options, config_file, gguf_file, out_dir, resume, overwrite, trust_remote_code, out_format) -> None:
    """Quantize MODEL (hub id, folder or .gguf file) with RTN, GPTQ or CBQ and save a packed model folder."""
    from pathlib import Path

    from effllm.ptq.config import PTQConfig, make_algorithm

    values = dict(method=method, bits=bits, group_size=_group_size(group_size), symmetric=symmetric,
                  act_bits=act_bits, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, device=device,
                  method_options=_method_options(options))
    try:
        if config_file:
            from effllm.recipes import load_config_file

            base = load_config_file(config_file)
            explicit = {k for k in values if ctx.get_parameter_source(_CLI_NAMES.get(k, k)).name == "COMMANDLINE"}
            values = {**base, **{k: v for k, v in values.items() if k in explicit or k not in base}}
        config = PTQConfig.from_dict(values)
        make_algorithm(config)  # validates the method options before any loading
        if out_format == "compressed-tensors":
            from effllm.quant.export_compressed_tensors import check_exportable, require_compressed_tensors

            require_compressed_tensors()
            check_exportable(config.spec, config.act_bits)
    except (ValueError, TypeError, ImportError) as error:
        raise UsageError(str(error)) from None
    out = Path(out_dir)
    if out.exists() and not (overwrite or resume):
        raise UsageError(f"output folder {out} already exists; pass --overwrite or choose another --out")

    from effllm.model_loading import ModelRef

    try:
        ref = ModelRef.parse(model, gguf_file)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    _run_quantize(ref, config, out, resume, overwrite, trust_remote_code, out_format)


_CLI_NAMES = {"group_size": "group_size", "method_options": "options"}


def _run_quantize(ref, config, out, resume, overwrite, trust_remote_code, out_format="effllm") -> None:
    import shutil
    import time

    import torch

    from effllm.model_loading import load_causal_lm, load_tokenizer
    from effllm.ptq.calibration import calibration_ids
    from effllm.ptq.quantize import check_quantizable, quantization_config, quantize
    from effllm.quant.serialization import save_quantized

    if config.device is None:
        config.device = "cuda" if torch.cuda.is_available() else "cpu"
    click.echo(f"loading {ref.path}{' / ' + ref.gguf_file if ref.gguf_file else ''}", err=True)
    model = load_causal_lm(ref, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(ref, trust_remote_code=trust_remote_code)
    try:
        check_quantizable(model, config)
        calib = calibration_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed) \
            if config.calib else torch.randint(0, model.config.vocab_size, (1, 2))
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    checkpoint = out.with_name(out.name + ".checkpoint")
    started = time.perf_counter()
    reports = quantize(model, config, calib, checkpoint_dir=checkpoint, resume=resume)
    elapsed = time.perf_counter() - started
    qconfig = quantization_config(model, config, reports)
    qconfig["quantize_seconds"] = round(elapsed, 1)
    if out_format == "compressed-tensors":
        from effllm.quant.export_compressed_tensors import ASYMMETRIC_LOAD_HINT, export_compressed_tensors

        # the effllm recipe travels beside the weights, as effllm's own folders carry it in config.json
        export_compressed_tensors(model, out, tokenizer, {"effllm_quantization.json": qconfig},
                                  overwrite=overwrite or resume)
        if not config.symmetric:
            click.echo(ASYMMETRIC_LOAD_HINT, err=True)
    else:
        save_quantized(model, out, qconfig, tokenizer, overwrite=overwrite or resume)
    shutil.rmtree(checkpoint, ignore_errors=True)
    click.echo(f"quantized {len(qconfig['modules'])} linears with {config.method} W{config.bits}"
               f"{'A' + str(config.act_bits) if config.act_bits else 'A16'} "
               f"g{config.group_size or 'channel'} in {elapsed:.0f} s -> {out}")


def _bits_option(name: str, value: str | None) -> int | None:
    """``--weight-bits``/``--act-bits``: an integer, or none/fp/float for floating point."""
    if value is None or value.lower() in ("none", "null", "fp", "float"):
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name} {value!r}: give an integer number of bits (2..8) or 'none'") from None


def _bct_config_from_options(config_file, weight_bits, act_bits, blocksize, act_blocksize, weight_map,
                             scale_format, rounding=None):
    """The BCTConfig of ``effllm compress``: a config file, or the bit options on top of ``BCTConfig.uniform``."""
    from dataclasses import replace

    from effllm.compress.bct import BCTConfig

    options = dict(weight_bits=weight_bits, act_bits=act_bits, blocksize=blocksize, act_blocksize=act_blocksize,
                   map=weight_map, scale_format=scale_format, rounding=rounding)
    given = [f"--{name.replace('_', '-')}" for name, value in options.items() if value is not None]
    if config_file:
        if given:
            raise UsageError(f"give either --config or {', '.join(given)}, not both (put those in the config file)")
        try:
            return BCTConfig.from_file(config_file)
        except (ValueError, TypeError) as error:
            raise UsageError(f"{config_file}: {error}") from None
    weight = _bits_option("--weight-bits", weight_bits) if weight_bits is not None else 8
    act = _bits_option("--act-bits", act_bits) if act_bits is not None else 8
    try:
        config = BCTConfig.uniform(weight, act)
        stored = {k: v for k, v in dict(blocksize=blocksize, map=weight_map, scale_format=scale_format).items()
                  if v is not None}
        if stored:
            config = replace(config, embeddings=replace(config.embeddings, **stored),
                             linear_weights=replace(config.linear_weights, **stored))
        if rounding is not None:
            config = replace(config, linear_weights=replace(config.linear_weights, rounding=rounding))
        if act_blocksize is not None:
            config = replace(config, **{name: replace(getattr(config, name), blocksize=act_blocksize) for name in
                                        ("activations", "attention_scores", "attention_probs", "layernorm",
                                         "residual")})
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    return config


@main.command()
@click.argument("model")
@click.option("--method", type=click.Choice(["bct"]), default="bct", show_default=True,
              help="bct: every component blockwise-quantized, no retraining (docs/bct.md).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="BCTConfig as YAML/JSON (docs/bct.md); instead of the options below.")
@click.option("--weight-bits", default=None, help="Bits of linear weights and embeddings (2..8, or none).  [8]")
@click.option("--act-bits", default=None, help="Bits of activations, attention, norms and tables (2..8, or none). "
                                               " [8]")
@click.option("--blocksize", type=int, default=None, help="Elements per scale of weights and embeddings.")
@click.option("--act-blocksize", type=int, default=None, help="Elements per scale of activations.")
@click.option("--map", "weight_map", type=click.Choice(["linear", "dynamic", "fitted"]), default=None,
              help="Code map of weights and embeddings.")
@click.option("--scale-format", type=click.Choice(["float32", "float16", "uint8"]), default=None,
              help="How weight and embedding scales are stored.")
@click.option("--rounding", type=click.Choice(["nearest", "gptq"]), default=None,
              help="Codes of linear weights: nearest, or gptq (error feedback on calibration text, needs --calib; "
                   "docs/bct.md).")
@click.option("--calib", default=None, help="Calibration text for --rounding gptq (or a config that asks for it): a "
                                            "text file, or a folder whose train.txt is used.")
@click.option("--nsamples", type=int, default=64, show_default=True, help="Calibration paragraphs.")
@click.option("--seqlen", type=int, default=128, show_default=True, help="Tokens per calibration paragraph, at most.")
@click.option("--gguf-file", default=None, help="GGUF file name inside MODEL.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output model folder.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code from the hub (off by default).")
def compress(model, method, config_file, weight_bits, act_bits, blocksize, act_blocksize, weight_map, scale_format,
             rounding, calib, nsamples, seqlen, gguf_file, out_dir, overwrite, trust_remote_code) -> None:
    """Compress MODEL (hub id or folder) with BCT and save a folder that effllm.load reads back."""
    from pathlib import Path

    config = _bct_config_from_options(config_file, weight_bits, act_bits, blocksize, act_blocksize, weight_map,
                                      scale_format, rounding)
    calibrated = config.linear_weights.bits is not None and config.linear_weights.rounding == "gptq"
    if calibrated and calib is None:
        raise UsageError("--rounding gptq needs calibration text: add --calib FILE_OR_FOLDER (e.g. ../shared/corpus)")
    if calib is not None and not calibrated:
        raise UsageError("--calib is only used by --rounding gptq; add it or drop --calib")
    if nsamples < 1 or seqlen < 1:
        raise UsageError(f"--nsamples and --seqlen must be >= 1, got {nsamples} and {seqlen}")
    if calib is not None:
        from effllm.compress.bct.calibration_data import calibration_file

        try:
            calibration_file(calib)
        except ValueError as error:
            raise UsageError(str(error)) from None
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UsageError(f"output folder {out} already exists; pass --overwrite or choose another --out")
    from effllm.model_loading import ModelRef

    try:
        ref = ModelRef.parse(model, gguf_file)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    _run_compress(ref, config, out, overwrite, trust_remote_code, (calib, nsamples, seqlen) if calibrated else None)


def _run_compress(ref, config, out, overwrite: bool, trust_remote_code: bool, calibration=None) -> dict:
    """``calibration``: (text source, paragraphs, max tokens) when the config's rounding needs calibration data."""
    import time

    from effllm.auto_model import load_pretrained, load_tokenizer_if_any
    from effllm.compress.bct import compress as bct_compress
    from effllm.compress.bct import compression_report, format_report, save_compressed
    from effllm.compress.bct.compress import check_supported

    click.echo(f"loading {ref.path}{' / ' + ref.gguf_file if ref.gguf_file else ''}", err=True)
    model = load_pretrained(ref, trust_remote_code=trust_remote_code)
    if getattr(model.config, "quantization_config", None):
        raise UsageError(f"{ref.path} is already quantized; compress the original floating-point model")
    try:
        check_supported(model)
    except ValueError as error:
        raise UsageError(str(error)) from None
    tokenizer = load_tokenizer_if_any(ref, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        click.echo(f"note: {ref.path} has no tokenizer; the output folder will have none either", err=True)
    batches = None
    if calibration is not None:
        from effllm.compress.bct.calibration_data import calibration_batches

        if tokenizer is None:
            raise UsageError(f"{ref.path} has no tokenizer, which calibration text needs; add one or use --rounding "
                             "nearest")
        source, nsamples, seqlen = calibration
        try:
            batches = calibration_batches(tokenizer, source, nsamples, seqlen)
        except ValueError as error:
            raise UsageError(str(error)) from None
    started = time.perf_counter()
    bct_compress(model, config, calib=batches)
    seconds = time.perf_counter() - started
    report = compression_report(model)
    try:
        save_compressed(model, out, tokenizer, overwrite=overwrite)
    except FileExistsError as error:
        raise UsageError(str(error)) from None
    click.echo(format_report(report))
    click.echo(f"compressed {type(model).__name__} with BCT in {seconds:.1f} s -> {out}")
    return report


@main.command()
@click.argument("recipe_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--results", "results_path", type=click.Path(dir_okay=False), help="Where to write results.json.")
@click.option("--overwrite", is_flag=True, help="Replace output folders that exist.")
def run(recipe_file: str, results_path: str | None, overwrite: bool) -> None:
    """Run a recipe (stages: train, quantize, compress, eval) and print its results table."""
    from effllm.recipes import Recipe, format_results, run_recipe

    try:
        recipe = Recipe.load(recipe_file)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    try:
        rows = run_recipe(recipe, results_path, overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise UsageError(str(error)) from None
    click.echo(format_results(rows))


@main.command("eval")
@click.argument("model")
@click.option("--task", default="perplexity", show_default=True,
              help="perplexity, or glue:TASK (cola, sst2, mrpc, qqp, stsb, mnli, mnli_mismatched, qnli, rte, wnli).")
@click.option("--dataset", default=None,
              help="perplexity: wikitext2 (default), c4, ptb, or a text file. glue: a local copy of the task "
                   "(datasets folder, CSV/TSV/JSON/parquet file or folder); default: nyu-mll/glue from the hub.")
@click.option("--seqlen", type=int, default=2048, show_default=True,
              help="Tokens per window (glue: most tokens per example).")
@click.option("--max-chars", type=int, default=None, help="Evaluate only the first N characters of the text.")
@click.option("--limit", type=click.IntRange(1), default=None, help="glue: evaluate only the first N examples.")
@click.option("--batch-size", type=int, default=None, help="Batch size (perplexity: 1, glue: 32).")
@click.option("--gguf-file", default=None, help="GGUF file name inside MODEL.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the figures as JSON here.")
@click.option("--trust-remote-code", is_flag=True)
def eval_command(model, task, dataset, seqlen, max_chars, limit, batch_size, gguf_file, json_path,
                 trust_remote_code):
    """Evaluate MODEL: perplexity by the standard protocol (non-overlapping windows of SEQLEN tokens), or a GLUE
    task's validation split with its official metrics."""
    import torch

    from effllm.eval.perplexity import load_eval_text, perplexity
    from effllm.model_loading import ModelRef, load_causal_lm, load_tokenizer

    if task.startswith("glue:"):
        _eval_glue(model, task, dataset, seqlen, limit, batch_size or 32, gguf_file, json_path, trust_remote_code)
        return
    if task != "perplexity":
        raise UsageError(f"unknown task {task!r}; available: perplexity, glue:TASK (e.g. glue:sst2)")
    dataset = dataset or "wikitext2"
    try:
        ref = ModelRef.parse(model, gguf_file)
        text = load_eval_text(dataset, max_chars)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    model_obj = load_causal_lm(ref, trust_remote_code=trust_remote_code)
    if torch.cuda.is_available():
        model_obj = model_obj.cuda()
    tokenizer = load_tokenizer(ref, trust_remote_code=trust_remote_code)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    try:
        result = perplexity(model_obj, ids, seqlen, batch_size or 1)
    except ValueError as error:
        raise UsageError(str(error)) from None
    figures = dict(result.to_dict(), model=model, dataset=dataset, task=task, max_chars=max_chars)
    click.echo(f"perplexity {result.perplexity:.3f} ({result.windows} windows of {seqlen} tokens, {dataset})")
    if json_path:
        _write_json(json_path, figures)


def _write_json(json_path: str, figures: dict) -> None:
    import json
    from pathlib import Path

    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(figures, indent=2) + "\n")
    tmp.replace(path)


def _eval_glue(model, task, dataset, seqlen, limit, batch_size, gguf_file, json_path, trust_remote_code) -> None:
    import torch

    from effllm.auto_model import load_pretrained, load_tokenizer_if_any
    from effllm.eval.glue import evaluate_glue, glue_task, load_glue
    from effllm.model_loading import ModelRef

    try:
        glue = glue_task(task)
        ref = ModelRef.parse(model, gguf_file)
        data = load_glue(glue, dataset)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise UsageError(str(error)) from None
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    model_obj = load_pretrained(ref, trust_remote_code=trust_remote_code)
    if torch.cuda.is_available():
        model_obj = model_obj.cuda()
    tokenizer = load_tokenizer_if_any(ref, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise UsageError(f"{ref.path} has no tokenizer; GLUE needs one (save it with the model)")
    try:
        result = evaluate_glue(model_obj, tokenizer, glue, data, batch_size, seqlen)
    except ValueError as error:
        raise UsageError(str(error)) from None
    metrics = ", ".join(f"{name} {value:.4f}" for name, value in result.metrics.items())
    click.echo(f"glue:{result.task} {result.split}: {metrics} ({result.examples} examples; metrics: "
               f"{result.metric_source})")
    if json_path:
        _write_json(json_path, dict(result.to_dict(), model=model, dataset=dataset or "nyu-mll/glue",
                                    task=f"glue:{result.task}", limit=limit))


if __name__ == "__main__":
    sys.exit(main())
