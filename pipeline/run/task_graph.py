"""run_auto's task graph: one doit task per (step, stage) with its file_dep, targets and up-to-date checks, then
the summary. The actions are the Run's methods (pipeline/run/run_auto.py); this module only describes them."""
from __future__ import annotations

from doit.tools import config_changed

from pipeline.core import layout
from pipeline.core.layout import step_name
from pipeline.runtime import stage_ops


def step_tasks(run, guard, basename: str = "run_auto"):
    """doit task dicts: embed/block{k}/output per step, then summary. guard(fn, *args) makes an action."""
    m = run.manifest
    blocks = len(m.blocks)
    outputs = []
    if run.image:
        yield run.image.task(guard(run.vision), basename, run.options.backend)
    rope_files = (layout.ROPE_COS, layout.ROPE_SIN) if m.rope_input else ()
    for s in range(run.n_steps):
        d, name = run.step_dir(s), step_name(s)
        turn = run.plan.turn_of(s)
        chunk = turn.chunk(s)
        stopped = (lambda s=s: False if run.stopped_before(s) else None,)

        def redo(stage, s=s):  # doit runs a stage whose recorded work verify found not to hold
            return lambda: False if (s, stage) in run.redo else None
        # the previous step's last hidden states stand for the cache content (stage_ops.history_of)
        history = [str(stage_ops.final_hidden(run.step_dir(s - 1), m))] if s else []
        deps = list(history)
        if chunk is None:
            deps.append(str(run.step_dir(s - 1) / layout.NEXT_TOKEN_ID))
        elif run.image and turn.index == 0:
            deps.append(run.image.embeds_file)
        step_config = {"tokens": chunk if chunk is not None else "previous", "past_len": turn.past_len_at(s),
                       "onnx": m.graphs_fingerprint, "backend": run.options.backend}
        yield {"basename": basename, "name": f"{name}:embed", "actions": [guard(run.embed, s)],
               "file_dep": deps, "verbosity": 2, "uptodate": [*stopped, redo("embed"), config_changed(step_config)],
               "targets": [str(d / f) for f in (*layout.INPUT_FILES, *rope_files, layout.hidden_file(0),
                                                 layout.META)]}
        for k in range(blocks):
            yield {"basename": basename, "name": f"{name}:block{k}", "actions": [guard(run.block, s, k)],
                   "file_dep": [str(d / layout.hidden_file(k)), str(d / layout.ATTENTION_MASK),
                                str(d / layout.POSITION_IDS), *(str(d / f) for f in rope_files), *history],
                   "targets": [str(d / layout.hidden_file(k + 1))], "uptodate": [*stopped, redo(f"block{k}")],
                   "verbosity": 2}
        targets = [str(d / layout.LOGITS)]
        if s >= turn.first_sampling_step:
            targets += [str(d / layout.NEXT_TOKEN_ID), str(d / layout.NEXT_TOKEN_TEXT)]
        yield {"basename": basename, "name": f"{name}:output", "actions": [guard(run.output, s)],
               "file_dep": [str(d / layout.hidden_file(blocks)), *history], "targets": targets,
               "uptodate": [*stopped, redo("output")], "verbosity": 2}
        outputs.append(f"{basename}:{name}:output")
    yield {"basename": basename, "name": "summary", "actions": [guard(run.summarize)], "task_dep": outputs,
           "uptodate": [False], "verbosity": 2}
