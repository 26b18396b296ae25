"""The installed package is what the tree holds: every package directory is listed in pyproject.toml."""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "effllm").rglob("__init__.py")}
    on_disk.add("effllm.kernels")
    assert on_disk == listed, f"add to / remove from pyproject packages: {sorted(on_disk ^ listed)}"
    assert config["package-dir"]["effllm.kernels"] == "kernels"


def test_kernel_sources_ship_with_the_package():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = data["effllm.kernels"]
    assert any(p.endswith(".c") for p in patterns)
    assert list((ROOT / "kernels" / "csrc").glob("*.c"))
