"""Fast unit tests of the rules the pipeline applies: step planning and masks, layer splits, cache slot writes,
how run_auto reconciles a run folder, the file contract's names, and options objects. No model needed."""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.convert.options import ConvertOptions, parse_cache_windows, resolve_cache_windows
from pipeline.core import layout
from pipeline.core.errors import StagepipeError
from pipeline.core.options import add_arguments, doit_params, from_values
from pipeline.run.options import RunOptions
from pipeline.run.run_auto import changed_settings, steps_to_discard
from pipeline.runtime.kv_cache import store_slots
from pipeline.runtime.plan import plan_step, step_inputs, window_for
from schemas.run import RunSettings, SamplingSettings


def manifest(T=8, C=64, windows=(8, 16, 32, 64)):
    return SimpleNamespace(max_input_len=T, max_cache_len=C, windows=lambda: list(windows))


# -- step planning ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("past_len, q_len, mode, T, W", [
    (0, 1, "prefill", 8, 8),     # a first step is always prefill, even one token
    (0, 8, "prefill", 8, 8),
    (8, 2, "prefill", 8, 16),    # a second prompt chunk
    (10, 1, "decode", 1, 16),
    (15, 1, "decode", 1, 16),    # 16 slots needed: the 16-window still holds them
    (16, 1, "decode", 1, 32),    # one more: the next window
    (63, 1, "decode", 1, 64),
])
def test_plan_step_picks_mode_T_and_the_smallest_window(past_len, q_len, mode, T, W):
    plan = plan_step(manifest(), past_len, q_len)
    assert (plan.mode, plan.T, plan.W, plan.C, plan.next_past_len) == (mode, T, W, 64, past_len + q_len)
    assert plan.block_graphs == (mode if W == 64 else f"{mode}_c{W}")


@pytest.mark.parametrize("past_len, q_len", [(64, 1), (60, 5), (0, 9), (-1, 1), (3, 0)])
def test_plan_step_refuses_what_does_not_fit(past_len, q_len):
    with pytest.raises(StagepipeError):
        plan_step(manifest(), past_len, q_len)


def test_window_for_is_the_smallest_that_holds():
    assert [window_for(manifest(), n) for n in (1, 8, 9, 33, 64)] == [8, 8, 16, 64, 64]


def test_step_inputs_mask_padding_and_positions():
    ids, mask, pos = step_inputs([5, 6, 7], past_len=4, T=4, W=8, mask_value=-1e4)
    assert ids.tolist() == [[5, 6, 7, 0]] and pos.tolist() == [[4, 5, 6, 7]]
    m = mask[0, 0]
    assert m.shape == (4, 12)
    assert (m[:3, :4] == 0).all() and (m[:3, 4:8] == -1e4).all()  # past slots visible, later slots hidden
    assert m[0, 8:].tolist() == [0, -1e4, -1e4, -1e4] and m[2, 8:].tolist() == [0, 0, 0, -1e4]  # causal
    assert (m[3, :8] == -1e4).all() and m[3, 8:].tolist() == [-1e4, -1e4, -1e4, 0]  # padding sees itself only


# -- layer splits and convert options ---------------------------------------------------------------------------------
def test_layer_ranges_even_explicit_and_bad():
    assert ConvertOptions(blocks=3).layer_ranges(7) == [(0, 3), (3, 5), (5, 7)]
    assert ConvertOptions().layer_ranges(28) == [(0, 7), (7, 14), (14, 21), (21, 28)]
    assert ConvertOptions().layer_ranges(2) == [(0, 1), (1, 2)]  # the default never asks for more blocks than layers
    assert ConvertOptions(layer_split=[3, 2]).layer_ranges(5) == [(0, 3), (3, 5)]
    for bad in (ConvertOptions(layer_split=[3, 3]), ConvertOptions(blocks=6)):
        with pytest.raises(StagepipeError):
            bad.layer_ranges(5)


def test_cache_windows_and_checked_options():
    assert parse_cache_windows("auto") is None and parse_cache_windows("none") == []
    assert resolve_cache_windows(None, 16, 1024) == [128, 256, 512, 1024]
    assert resolve_cache_windows([], 16, 1024) == [1024]
    o = ConvertOptions(precision="fp16", max_input_len=8, max_cache_len=64).checked()
    assert o.kv_dtype == "float16" and o.cache_windows == [8, 16, 32, 64]
    with pytest.raises(StagepipeError, match="max_input_len"):
        ConvertOptions(max_input_len=0).checked()


# -- KV slots -------------------------------------------------------------------------------------------------------
def test_store_slots_writes_only_the_steps_slots():
    cache = np.zeros((2, 1, 1, 8, 2), np.float32)
    present = np.ones((2, 1, 1, 4, 2), np.float32)  # T=4 rows, 3 real
    store_slots(cache, past_len=2, q_len=3, present=present)
    assert cache[0, 0, 0, :, 0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    with pytest.raises(StagepipeError, match="pass the 8-slot"):
        store_slots(cache, past_len=6, q_len=3, present=present)


# -- reconciling a run folder ------------------------------------------------------------------------------------------
def settings(**kw):
    base = dict(prompt="hi", prompt_token_ids=[1, 2], onnx_dir="o", onnx_fingerprint="f", max_new_tokens=4,
                sampling=SamplingSettings())
    return RunSettings(**(base | kw))


def test_changed_settings_names_what_differs():
    assert changed_settings(settings(), settings(max_new_tokens=9)) == []  # --steps may grow: continue
    assert changed_settings(settings(), settings(prompt="ho", prompt_token_ids=[3])) == ["prompt", "prompt_token_ids"]
    assert changed_settings(settings(), settings(sampling=SamplingSettings(greedy=False))) == ["sampling"]


def test_steps_to_discard():
    assert steps_to_discard([0, 1, 2, 3], None, 4) == []
    assert steps_to_discard([0, 1, 2, 3], 2, 4) == [2, 3]
    with pytest.raises(StagepipeError, match="step_0005 is past the 4 steps"):
        steps_to_discard([0, 5], None, 4)
    with pytest.raises(StagepipeError):
        steps_to_discard([0], -2, 4)


# -- the file contract ---------------------------------------------------------------------------------------------
def test_step_names_round_trip_and_strays_are_not_steps(tmp_path):
    assert layout.step_name(7) == "step_0007" and layout.step_number("step_0007") == 7
    assert layout.step_number("step_12345") == 12345
    for stray in ("step_0003.bak", "step_3", "xstep_0001", "step_000a"):
        assert layout.step_number(stray) is None
    for name in ("step_0002", "step_0010", "step_0003.bak", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_0001").write_text("a file, not a step folder")
    assert [d.name for d in layout.step_dirs(tmp_path)] == ["step_0002", "step_0010"]


def test_graph_names_and_tensor_order():
    assert layout.graph_set("decode", 128, 1024) == "decode_c128" and layout.graph_set("decode", 1024, 1024) == "decode"
    assert layout.graph_set_window("prefill_c256", 1024) == 256 and layout.graph_set_window("prefill", 1024) == 1024
    assert layout.graph_file("decode", "block0", 128, 1024) == "decode/block0_c128.onnx"
    names = ["logits.npy", "hidden_block10.npy", "hidden_block2.npy", "position_ids.npy", "input_ids.npy", "x.npy"]
    assert sorted(names, key=layout.tensor_sort_key) == ["input_ids.npy", "position_ids.npy", "hidden_block2.npy",
                                                          "hidden_block10.npy", "logits.npy", "x.npy"]
    assert [layout.writer_stage(n) for n in ("hidden_block0.npy", "hidden_block3.npy", "logits.npy", "meta.json")] \
        == ["embed", "block2", "output", None]


# -- options objects ------------------------------------------------------------------------------------------------
def test_one_options_object_builds_argparse_and_doit_params():
    p = argparse.ArgumentParser()
    add_arguments(p, ConvertOptions)
    a = p.parse_args(["--layer_split", "3,2", "--max_input_len", "4", "--cache_windows", "none", "--copy_weights"])
    o = from_values(ConvertOptions, vars(a))
    assert (o.layer_split, o.max_input_len, o.max_cache_len, o.cache_windows, o.copy_weights) == ([3, 2], 4, 1024,
                                                                                                   [], True)
    assert "(default: 1024)" in p.format_help()
    params = {d["name"]: d for d in doit_params(RunOptions)}
    assert params["steps"]["default"] == 32 and params["steps"]["type"] is int and params["chat"]["type"] is bool
    with pytest.raises(StagepipeError, match="choose one of"):
        from_values(ConvertOptions, {"precision": "int3"})
