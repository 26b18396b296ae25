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


@main.group()
def bench() -> None:
    """Benchmarks, measured side by side in one run."""


def _parse_sizes(text: str) -> list[int]:
    units = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            sizes.append(int(float(item[:-1]) * units[item[-1]]) if item[-1:] in units else int(item))
        except (ValueError, IndexError):
            raise UsageError(f"--sizes: {item!r} is not a size; write e.g. 1M,16M,100M") from None
    if not sizes or min(sizes) <= 0:
        raise UsageError("--sizes needs positive sizes, e.g. 1M,16M")
    return sizes


@bench.command("optim")
@click.option("--sizes", default="1M,4M,16M,64M,100M", show_default=True, help="Parameter counts to measure.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1), help="Best of N after warm-up.")
@click.option("--no-bnb", is_flag=True, help="Leave bitsandbytes out.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the rows as JSON here.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False),
              help="Write/refresh the optimizer section of this markdown file (e.g. docs/benchmarks.md).")
def bench_optim(sizes: str, repeats: int, no_bnb: bool, json_path: str | None, markdown_path: str | None) -> None:
    """Step time and state bytes/param: torch AdamW vs bitsandbytes vs effllm AdamW8bit."""
    parsed = _parse_sizes(sizes)
    from effllm.bench import optim

    rows = optim.run(parsed, repeats=repeats, include_bnb=not no_bnb)
    optim.write(rows, json_path, markdown_path)


if __name__ == "__main__":
    sys.exit(main())
