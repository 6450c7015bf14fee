"""Sampling settings as a checkpoint's generation_config.json defines them (what transformers' generate() uses)."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import StagepipeError
from pipeline.core.jsonfile import read_json_object
from pipeline.runtime.sampling import check_sampling
from schemas.run import SamplingSettings
from pipeline.core.layout import GENERATION_CONFIG

GENERATION_CONFIG_FILE = GENERATION_CONFIG
# transformers' GenerationConfig defaults for what a file leaves out (or sets to null)
_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


def sampling_from_generation_config(folder, seed: int = 0) -> SamplingSettings:
    """SamplingSettings from folder/generation_config.json: do_sample false or missing -> greedy; temperature,
    top_k, top_p and repetition_penalty as given, else transformers' defaults (1.0, 50, 1.0, 1.0). A folder
    without the file gives greedy defaults, as transformers does."""
    path = Path(folder) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return SamplingSettings(seed=seed)
    config = read_json_object(path, "restore the checkpoint's copy")

    def value(key, kinds, what):
        v = config.get(key)
        if v is None:
            return _DEFAULTS.get(key, False)
        if isinstance(v, bool) != (kinds is bool) or not isinstance(v, kinds):  # JSON true is no number here
            raise StagepipeError(f"{path}: {key} is {json.dumps(v)}, expected {what}; fix the file")
        return v

    settings = SamplingSettings(
        greedy=not value("do_sample", bool, "true or false"),
        temperature=float(value("temperature", (int, float), "a number")),
        top_k=value("top_k", int, "a whole number"),
        top_p=float(value("top_p", (int, float), "a number")),
        repetition_penalty=float(value("repetition_penalty", (int, float), "a number")),
        seed=seed,
    )
    try:
        return check_sampling(settings)
    except StagepipeError as e:
        raise StagepipeError(f"{path}: {e}") from None
