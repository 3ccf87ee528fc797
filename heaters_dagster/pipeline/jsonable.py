"""Turn typed results (dataclasses, paths, numpy values) into JSON for stage_results and metadata."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


def to_jsonable(value: Any, *, max_list: int = 200) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name), max_list=max_list) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, max_list=max_list) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [to_jsonable(v, max_list=max_list) for v in value[:max_list]]
        return items
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if hasattr(value, "tolist") and hasattr(value, "shape"):  # numpy
        return f"<array shape={tuple(value.shape)}>" if getattr(value, "size", 0) > 16 else value.tolist()
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
