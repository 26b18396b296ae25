"""DESIGN.md's import directions: kernels import nothing of effllm, the core (effllm/quant) only the kernels, and the
capabilities (optim, ptq, compress) the core and the kernels but never each other."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CAPABILITIES = ("optim", "ptq", "compress")


def effllm_imports(path: Path) -> set[str]:
    """Top-level effllm subpackages a module imports (relative imports resolved against its package)."""
    inside_effllm = path.is_relative_to(ROOT / "effllm")
    package = ["effllm", *path.relative_to(ROOT / "effllm").parent.parts] if inside_effllm else ["effllm", "kernels"]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [".".join([*base, node.module] if node.module else base)]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "effllm" and len(parts) > 1:
                found.add(parts[1])
    return found


def modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize("path", modules(ROOT / "kernels"), ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_import_nothing_of_effllm(path):
    assert effllm_imports(path) <= {"kernels"}


@pytest.mark.parametrize("path", modules(ROOT / "effllm" / "quant"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_only_the_kernels(path):
    assert effllm_imports(path) <= {"quant", "kernels"}


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_capabilities_never_import_each_other(capability):
    others = set(CAPABILITIES) - {capability}
    offenders = {str(p.relative_to(ROOT)): sorted(effllm_imports(p) & others)
                 for p in modules(ROOT / "effllm" / capability) if effllm_imports(p) & others}
    assert not offenders, offenders
