"""Read a JSON file into a pydantic model; a bad file becomes one line naming the field and the reason."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from pipeline.core.errors import StagepipeError


def load_model_file(path: Path, model: type[BaseModel]):
    path = Path(path)
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise StagepipeError(f"{path}: not found") from None
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "(file)"
        more = f" (and {len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""
        raise StagepipeError(f"{path}: field '{field}': {err['msg']}{more}; fix or regenerate the file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StagepipeError(f"{path}: cannot read ({e})") from None


def load_manifest(onnx_dir: Path):
    """An onnx_dir's manifest.json, validated."""
    from schemas.manifest import Manifest

    from pipeline.core.layout import MANIFEST

    path = Path(onnx_dir) / MANIFEST
    if not path.exists():
        raise StagepipeError(f"{path}: not found; convert a model first (doit convert / python -m pipeline.convert)")
    return load_model_file(path, Manifest)


def read_json_object(path: Path, fix: str = "restore or regenerate the file") -> dict:
    """A JSON file that must hold an object, as a dict; anything else is one clear error line."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StagepipeError(f"{path}: cannot read it as JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise StagepipeError(f"{path}: expected a JSON object; {fix}")
    return data
