"""Sampling: repetition penalty as transformers applies it, top-k / top-p on hand-checked cases, and the sampling
settings a checkpoint's generation_config.json defines."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.errors import StagepipeError
from pipeline.runtime.generation_config import sampling_from_generation_config
from pipeline.runtime.sampling import apply_repetition_penalty, candidates, check_sampling, sample
from schemas.run import SamplingSettings

torch = pytest.importorskip("torch")
generation = pytest.importorskip("transformers.generation")

# token 3 is the likeliest, then 0, 2, 1
PROBS = np.array([0.3, 0.05, 0.15, 0.5])
LOGITS = np.log(PROBS)


def settings(**kw) -> SamplingSettings:
    return SamplingSettings(**{"greedy": False, **kw})


@pytest.mark.parametrize("penalty", [1.3, 0.7, 1.0])
def test_repetition_penalty_equals_transformers(penalty):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=1000) * 4).astype(np.float32)
    seen = rng.integers(0, 1000, size=300)  # prompt + generated, with repeats
    ours = apply_repetition_penalty(logits, seen, penalty)
    processor = generation.RepetitionPenaltyLogitsProcessor(penalty=float(penalty))
    theirs = processor(torch.tensor(seen[None]), torch.tensor(logits[None]).clone())[0].numpy()
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs)
    unseen = np.setdiff1d(np.arange(1000), seen)
    assert np.array_equal(ours[unseen], logits[unseen])  # only seen tokens change
    assert penalty == 1.0 or np.all(ours[np.unique(seen)] != logits[np.unique(seen)])


def test_repetition_penalty_by_hand():
    out = apply_repetition_penalty(np.array([2.0, -1.0, 0.5, 3.0]), [0, 1, 1, 0], 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]  # positive divided, negative multiplied, once per distinct id


def test_greedy_applies_the_penalty():
    logits = np.array([2.0, 1.9, -1.0])
    assert sample(logits, SamplingSettings(), 0) == 0
    assert sample(logits, SamplingSettings(repetition_penalty=1.2), 0, seen_ids=[]) == 0
    assert sample(logits, SamplingSettings(repetition_penalty=1.2), 0, seen_ids=[0, 0]) == 1  # 2/1.2 < 1.9
    assert sample(np.array([-1.0, -1.1]), SamplingSettings(repetition_penalty=1.2), 0, seen_ids=[0]) == 1
    with pytest.raises(ValueError, match="seen_ids"):
        sample(logits, SamplingSettings(repetition_penalty=1.2), 0)


@pytest.mark.parametrize("kw, ids, probs", [
    (dict(top_k=1), [3], [1.0]),
    (dict(top_k=2), [3, 0], [0.625, 0.375]),
    (dict(top_p=0.45), [3], [1.0]),
    (dict(top_p=0.6), [3, 0], [0.625, 0.375]),
    (dict(top_p=0.85), [3, 0, 2], [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]),
    (dict(top_k=3, top_p=0.7), [3, 0], [0.625, 0.375]),  # top-k first: 0.5/0.95 < 0.7 <= 0.8/0.95
    (dict(), [3, 0, 2, 1], [0.5, 0.3, 0.15, 0.05]),
    (dict(temperature=2.0), [3, 0, 2, 1], np.sqrt(PROBS[[3, 0, 2, 1]]) / np.sqrt(PROBS).sum()),
    (dict(repetition_penalty=2.0), [0, 3, 2, 1], None),  # log-probs are negative: 3's doubles, 0.25 < 0.3
])
def test_top_k_top_p_by_hand(kw, ids, probs):
    seen = [3] if "repetition_penalty" in kw else None
    got_ids, got_probs = candidates(LOGITS, settings(**kw), seen)
    assert got_ids.tolist() == ids
    if probs is not None:
        np.testing.assert_allclose(got_probs, probs, rtol=1e-12)
    drawn = {sample(LOGITS, settings(**kw, seed=5), step, seen) for step in range(300)}
    assert drawn == set(ids)


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
                                dict(temperature=1.3, top_p=0.95), dict(top_k=7, repetition_penalty=0.9)])
def test_candidates_equal_transformers_processors(kw):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=500) * 3
    seen = rng.integers(0, 500, size=60)
    s = settings(**kw)
    processors = generation.LogitsProcessorList([generation.RepetitionPenaltyLogitsProcessor(s.repetition_penalty),
                                                 generation.TemperatureLogitsWarper(s.temperature)])
    if s.top_k:
        processors.append(generation.TopKLogitsWarper(s.top_k))
    processors.append(generation.TopPLogitsWarper(s.top_p))
    scores = processors(torch.tensor(seen[None]), torch.tensor(logits[None]))
    theirs = torch.softmax(scores, dim=-1)[0].numpy()
    ids, probs = candidates(logits, s, seen)
    assert set(ids.tolist()) == set(np.flatnonzero(theirs).tolist())
    np.testing.assert_allclose(probs, theirs[ids], rtol=1e-9)


def test_draws_are_the_same_as_before_per_seed_and_step():
    logits = np.random.default_rng(7).normal(size=50).astype(np.float32) * 3
    # recorded with pipeline/sampling.py before the repetition penalty was added
    expected = {(0.8, 10, 0.9, 3): [49, 49, 49, 49, 44, 49, 49, 49, 49, 7, 49, 49],
                (1.5, 0, 1.0, 11): [49, 49, 43, 21, 49, 49, 49, 7, 46, 34, 44, 7]}
    for (temperature, top_k, top_p, seed), tokens in expected.items():
        s = settings(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        assert [sample(logits, s, step) for step in range(12)] == tokens
        assert sample(logits, s, 9) == tokens[9]  # a step alone draws what it drew in the sequence


def test_check_sampling_refuses_a_non_positive_penalty():
    check_sampling(SamplingSettings(repetition_penalty=1.1))
    with pytest.raises(StagepipeError, match="--repetition_penalty 0.0: must be > 0"):
        check_sampling(SamplingSettings(repetition_penalty=0.0))


def write_config(folder, config) -> None:
    (folder / "generation_config.json").write_text(config if isinstance(config, str) else json.dumps(config))


def test_generation_config_to_sampling_settings(tmp_path):
    assert sampling_from_generation_config(tmp_path, seed=4) == SamplingSettings(seed=4)  # no file: greedy
    # Qwen2.5-7B-Instruct's generation_config.json
    write_config(tmp_path, {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                            "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
                            "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"})
    assert sampling_from_generation_config(tmp_path, seed=4) == SamplingSettings(
        greedy=False, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05, seed=4)
    write_config(tmp_path, {"do_sample": False, "temperature": 0.7, "repetition_penalty": 1.1})
    got = sampling_from_generation_config(tmp_path)
    assert got.greedy and got.repetition_penalty == 1.1  # transformers penalizes greedy decoding too
    # what the file leaves out (or sets to null) takes transformers' own defaults
    write_config(tmp_path, {"do_sample": True, "top_p": None})
    got = sampling_from_generation_config(tmp_path)
    defaults = generation.GenerationConfig._get_default_generation_params()
    assert not got.greedy and (got.temperature, got.top_k, got.top_p, got.repetition_penalty) == (
        defaults["temperature"], defaults["top_k"], defaults["top_p"], defaults["repetition_penalty"])


@pytest.mark.parametrize("config, match", [
    ("{not json", "cannot read it as JSON"),
    ([1, 2], "expected a JSON object"),
    ({"do_sample": "yes"}, "do_sample is \"yes\", expected true or false"),
    ({"do_sample": True, "top_k": 2.5}, "top_k is 2.5, expected a whole number"),
    ({"do_sample": True, "temperature": True}, "temperature is true, expected a number"),
    ({"do_sample": True, "temperature": 0}, "temperature 0.0: must be > 0"),
    ({"repetition_penalty": -1}, "repetition_penalty -1.0: must be > 0"),
])
def test_generation_config_errors_name_the_file(tmp_path, config, match):
    write_config(tmp_path, config)
    with pytest.raises(StagepipeError, match=match) as info:
        sampling_from_generation_config(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "generation_config.json")) and "\n" not in str(info.value)
