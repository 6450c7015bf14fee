"""Write the JSON Schema of every file stagepipe writes next to the models: `python -m schemas.export`.

tests/test_schemas.py fails when these files are stale, so regenerate them after changing a model.
"""
from __future__ import annotations

import json
from pathlib import Path

from schemas.manifest import Manifest
from schemas.run import CacheRecord, RunSetRecord, RunSettings, RunSummary, SetSummary, StepMeta, VisionMeta

SCHEMAS = {"manifest": Manifest, "run": RunSettings, "meta": StepMeta, "summary": RunSummary, "cache": CacheRecord,
           "vision_meta": VisionMeta, "run_set": RunSetRecord, "set_summary": SetSummary}
SCHEMA_DIR = Path(__file__).parent


def schema_text(model) -> str:
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def main():
    for name, model in SCHEMAS.items():
        path = SCHEMA_DIR / f"{name}.schema.json"
        path.write_text(schema_text(model))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
