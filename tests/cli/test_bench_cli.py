"""``effllm bench optim``: bad arguments are one clear usage error (exit code 2) before anything runs."""

from __future__ import annotations

from click.testing import CliRunner

from effllm.cli import main


def test_a_bad_size_is_a_usage_error_naming_it():
    result = CliRunner().invoke(main, ["bench", "optim", "--sizes", "1M,1X"])
    assert result.exit_code == 2
    assert "--sizes: '1x' is not a size" in result.output and "smollm2-135m" in result.output


def test_a_bad_device_is_a_usage_error_naming_it():
    result = CliRunner().invoke(main, ["bench", "optim", "--sizes", "1M", "--device", "tpu9"])
    assert result.exit_code == 2
    assert "--device 'tpu9' is not a torch device" in result.output


def test_zero_processes_is_a_usage_error():
    result = CliRunner().invoke(main, ["bench", "optim", "--sizes", "1M", "--processes", "0"])
    assert result.exit_code == 2
    assert "--processes" in result.output
