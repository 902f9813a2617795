"""How commands print one record: JSON for scripts (``--json``), aligned "name  value" lines for
people (lists joined with commas, nested values as JSON), as the AWS CLI's json and text outputs."""

from __future__ import annotations

import json
from typing import Any


def print_record(record: dict[str, Any], as_json: bool, width: int = 20) -> None:
    if as_json:
        print(json.dumps(record, indent=2))
        return
    for name, value in record.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ", ".join(value)
        elif isinstance(value, (list, dict)):
            value = json.dumps(value)
        print(f"{name:{width}} {value}")
