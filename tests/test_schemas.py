"""The exported JSON Schemas match the pydantic models, and bad files are refused with the field named."""
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.errors import StagepipeError
from pipeline.core.jsonfile import load_model_file
from schemas.export import SCHEMA_DIR, SCHEMAS, schema_text
from schemas.run import StepMeta

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_exported_schema_is_current(name):
    path = SCHEMA_DIR / f"{name}.schema.json"
    assert path.exists(), f"{path} missing: run python -m schemas.export"
    assert path.read_text() == schema_text(SCHEMAS[name]), f"{path} is stale: run python -m schemas.export"


def _meta(**overrides):
    base = dict(step=0, mode="prefill", past_len=0, q_len=3, next_past_len=3, max_input_len=8, max_cache_len=64,
                input_token_ids=[1, 2, 3], onnx_fingerprint="abc", sampling={})
    base.update(overrides)
    return StepMeta.model_validate(base)


def test_bad_meta_names_field_and_reason(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text(_meta().model_dump_json().replace('"mode":"prefill"', '"mode":"sideways"'))
    with pytest.raises(StagepipeError, match=r"field 'mode'.*prefill.*decode"):
        load_model_file(path, StepMeta)
    path.write_text(_meta().model_dump_json().replace('"step":0', '"step":-4'))
    with pytest.raises(StagepipeError, match=r"field 'step'.*greater than or equal to 0"):
        load_model_file(path, StepMeta)
    path.write_text("{not json")
    with pytest.raises(StagepipeError, match=r"meta.json"):
        load_model_file(path, StepMeta)


def test_stage_given_bad_meta_prints_one_line(tmp_path):
    step = tmp_path / "step_0000"
    step.mkdir()
    (step / "meta.json").write_text(_meta().model_dump_json().replace('"q_len":3', '"q_len":"many"'))
    (tmp_path / "onnx").mkdir()
    proc = subprocess.run([sys.executable, "-m", "stages.output", "--step_dir", str(step), "--onnx_dir",
                           str(tmp_path / "onnx")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    # no manifest yet: the first problem named is the missing manifest, in one line, no traceback
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
