"""Write (or check) the JSON Schemas of the contracts in docs/schemas/.

    python -m eagle3.schemas           # rewrite docs/schemas/*.schema.json from the models
    python -m eagle3.schemas --check   # exit 1 when a checked-in schema differs from its model

The models are the source of truth; the schema files are for readers outside Python (a CI job, a
dashboard, another language). tests/test_contracts.py keeps them from drifting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def schemas() -> dict[str, dict]:
    """{file name: JSON Schema} of every contract."""
    from eagle3.data.manifest import DataManifest
    from eagle3.eval.report import BenchReport
    from eagle3.ops.gate import GateDecision
    from eagle3.traffic.record import TrafficRecord

    out = {}
    for name, model, title in (
        ("bench-report", BenchReport, "eagle3 bench report"),
        ("data-manifest", DataManifest, "eagle3 data manifest"),
        ("gate-decision", GateDecision, "eagle3 promotion gate decision"),
        ("traffic-record", TrafficRecord, "eagle3 traffic record (one served request)"),
    ):
        schema = model.model_json_schema(mode="serialization")
        out[f"{name}.schema.json"] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"{name}.schema.json",
            **schema,
            "title": title,
        }
    return out


def render(schema: dict) -> str:
    """The file's text: what eagle3.io.write_json_atomic writes with sorted keys."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eagle3.schemas", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    p.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="default: docs/schemas")
    args = p.parse_args(argv)
    stale = []
    for name, schema in schemas().items():
        path = args.dir / name
        text = render(schema)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
            continue
        from eagle3.io import write_json_atomic

        write_json_atomic(path, schema, sort_keys=True)  # the same text as render()
        print(path)
    if stale:
        print("out of date (run `python -m eagle3.schemas`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
