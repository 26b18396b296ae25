"""Recipes: YAML/JSON files -> typed configs (unknown keys are errors)."""

from __future__ import annotations

import json
from pathlib import Path


def load_config_file(path: str | Path) -> dict:
    """A mapping from a YAML or JSON file, with a clear error when it is not one."""
    import yaml

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data
