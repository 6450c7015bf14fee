"""summary.json: what a run folder generated so far, read back from its step folders."""
from __future__ import annotations

from pipeline.core import layout
from pipeline.core.jsonfile import load_model_file
from pipeline.core.layout import read_token_file
from pipeline.runtime import stage_ops
from schemas.run import RunSummary, VisionMeta


def image_step_seconds(vision_dir) -> float:
    path = vision_dir / layout.META
    return sum(r.seconds for r in load_model_file(path, VisionMeta).stages.values()) if path.exists() else 0.0


def build_summary(run) -> RunSummary:
    m, n = run.manifest, len(run.chunks)
    generated, prefill_s, decode_s, decode_steps, steps = [], 0.0, 0.0, 0, 0
    stop_reason = "running"
    stops = set(run.settings.stop_token_ids)
    complete_prefill = True
    for s in range(run.n_steps):
        meta_path = run.step_dir(s) / layout.META
        if not meta_path.exists():
            complete_prefill &= s >= n
            break
        meta = stage_ops.load_meta(meta_path)
        steps += 1
        seconds = sum(r.seconds for r in meta.stages.values())
        if s < n:
            prefill_s += seconds
        else:
            decode_s += seconds
            decode_steps += 1
        token_file = run.step_dir(s) / layout.NEXT_TOKEN_ID
        if s >= n - 1:
            if not token_file.exists() or "output" not in meta.stages:
                break
            generated.append(read_token_file(token_file))
            if generated[-1] in stops:
                stop_reason = "eos"
                break
            if len(generated) >= run.settings.max_new_tokens:
                stop_reason = "max_steps"
                break
            if meta.next_past_len >= m.max_cache_len:
                stop_reason = "cache_full"
                break
    if getattr(run, "image", None) is not None:  # an image prompt's first token waits for the image step too
        prefill_s += image_step_seconds(run.dir / layout.VISION)
    ids = run.settings.prompt_token_ids
    return RunSummary(prompt=run.settings.prompt, prompt_token_ids=ids, generated_token_ids=generated,
                      text=run.tokenizer.decode(generated, skip_special_tokens=True), stop_reason=stop_reason,
                      steps=steps, time_to_first_token_s=prefill_s if generated and complete_prefill else None,
                      decode_tokens_per_s=decode_steps / decode_s if decode_steps and decode_s > 0 else None)
