"""Conversations over one KV cache, against transformers: a checkpoint with Qwen2.5's real chat template (the demo
model, its tokenizer_config.json given tests/fixtures/chat_templates/qwen2.5.jinja), two user turns.

One reference conversation is made with `run_auto --chat --prompt A` then `run_auto --reply B`; the other forms
(--messages, kill -9 and resume, the interactive `doit chat`) must give the same step files, and the replies must
be what transformers' generate gives on the same token ids.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.runtime.tokenizer import Tokenizer
from tests.run_helpers import REPO, run_doit, run_stage, step_files, summary

T, C, STEPS = 8, 128, 8
USERS = ("What is the capital of France?", "And of Italy?")
REPEATING = ("Paris Paris Paris. Rome Rome Rome. Berlin.", "And of Italy?")
FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    from pipeline.convert.onnx_dir import convert
    from pipeline.demo.checkpoint import write_demo_checkpoint

    tmp = tmp_path_factory.mktemp("chat")
    model = tmp / "model"
    write_demo_checkpoint(model, seed=0)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (FIXTURES / "qwen2.5.jinja").read_bytes().decode("utf-8")
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))
    convert(model, tmp / "onnx", blocks=2, max_input_len=T, max_cache_len=C, kv_dtype="float32", log=lambda *a: None)
    messages = tmp / "conversation.json"
    messages.write_text(json.dumps([{"role": "user", "content": u} for u in USERS]))
    return model, tmp / "onnx", messages


def file_ids(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime, inode) of every file in every step folder: a file rewritten (atomically: a new inode) shows."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_ino) for p in root.glob("step_*/*")}


@pytest.fixture(scope="module")
def conversation(qwen25, tmp_path_factory):
    """The reference: turn 0, then --reply; what each command wrote."""
    _, onnx_dir, _ = qwen25
    root = tmp_path_factory.mktemp("ref") / "run"
    run_doit("--onnx_dir", onnx_dir, "--run_root", root, "--chat", "--prompt", USERS[0], "--steps", STEPS)
    turn0 = file_ids(root)
    proc = run_doit("--onnx_dir", onnx_dir, "--run_root", root, "--reply", USERS[1], "--steps", STEPS)
    return {"root": root, "turn0": turn0, "after": file_ids(root), "stdout": proc.stdout}


def messages_of(root: Path) -> list[tuple]:
    """summary.json's turns without their timings."""
    return [(t["role"], t["text"], t["token_ids"], t["first_step"], t["last_step"], t["stop_reason"])
            for t in summary(root)["turns"]]


def hf_greedy(model, ids: list[int], new_tokens: int, **kwargs) -> tuple[list[int], float]:
    """transformers' greedy continuation (stopping at the checkpoint's EOS, as run_auto does) and the smallest
    top-1/top-2 margin of its (processed) scores."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens, pad_token_id=151643,
                             output_scores=True, return_dict_in_generate=True, **kwargs)
    margins = [float(torch.topk(sc[0], 2).values.diff().abs()) for sc in out.scores]
    return out.sequences[0, len(ids):].tolist(), min(margins)


@pytest.fixture(scope="module")
def hf(qwen25):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model_dir, _, _ = qwen25
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(model_dir))


def template_ids(tok, messages) -> list[int]:
    return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


def reply_content(tok, reply: dict) -> str:
    """An assistant message as the conversation holds it: the reply without the stop token it ended with."""
    ids = reply["token_ids"][:-1] if reply["stop_reason"] == "eos" else reply["token_ids"]
    return tok.decode(ids)


def conversation_ids(turns: list[dict]) -> list[int]:
    """All ids the conversation fed or sampled: each user turn's prefill (its first id is the previous reply's
    last, already counted) and each reply."""
    ids = []
    for i, t in enumerate(turns):
        ids += t["token_ids"][1:] if t["role"] == "user" and i else t["token_ids"]
    return ids


def check_replies_equal_transformers(turns, hf, users=USERS, **generate_kwargs):
    model, tok = hf
    user0, reply0, user1, reply1 = turns
    messages = [{"role": "user", "content": users[0]}]
    assert user0["token_ids"] == template_ids(tok, messages)
    assert len(user0["token_ids"]) > 3 * T  # Qwen2.5's default system turn is in it: several prefill chunks
    assert user1["token_ids"][0] == reply0["token_ids"][-1]  # sampled by turn 0, fed by turn 1
    for user, reply in ((user0, reply0), (user1, reply1)):
        seen = conversation_ids(turns[:turns.index(user) + 1])
        want, margin = hf_greedy(model, seen, STEPS, **generate_kwargs)
        assert margin > 1e-3, "the greedy choice is too close to call"
        assert reply["token_ids"] == want
        assert reply["stop_reason"] == ("eos" if want[-1] in (151643, 151645) else "max_steps")
    return messages + [{"role": "assistant", "content": reply_content(tok, reply0)},
                       {"role": "user", "content": users[1]}]


def test_two_turns_equal_transformers(qwen25, conversation, hf):
    """Turn 0's ids are apply_chat_template's; turn 1 prefills exactly what the template's rendering of the whole
    conversation adds to the cache; both replies are transformers' generate on the same ids (which recomputes
    the history that the pipeline kept in its cache)."""
    _, tok = hf
    s = summary(conversation["root"])
    turns = s["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant"] * 2
    assert [t["text"] for t in turns[::2]] == list(USERS)
    messages = check_replies_equal_transformers(turns, hf)
    # the whole conversation as the cache holds it is the template's text for it ...
    seq = conversation_ids(turns[:3])
    assert tok.decode(seq) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert json.loads((conversation["root"] / "run.json").read_text())["turns"][0]["rendering"] == "exact"
    # ... and its ids are transformers' but for the reply, which stays as generated (not re-tokenized)
    whole = template_ids(tok, messages)
    new = turns[2]["token_ids"][1:]
    assert whole[:len(turns[0]["token_ids"])] == turns[0]["token_ids"] and whole[-len(new):] == new
    assert s["generated_token_ids"] == turns[3]["token_ids"] and s["prompt"] == USERS[1]
    assert s["steps"] == turns[3]["last_step"] + 1


def test_later_turn_reuses_the_cache(conversation):
    """The --reply command rewrote no file of turn 0 and wrote exactly turn 1's step folders; the same command
    again rewrites nothing."""
    root, before, after = conversation["root"], conversation["turn0"], conversation["after"]
    turns = summary(root)["turns"]
    first = turns[2]["first_step"]
    assert all(after[name] == ids for name, ids in before.items()), "a step of turn 0 was rewritten"
    assert {int(n[5:9]) for n in before} == set(range(first))
    assert {int(n[5:9]) for n in set(after) - set(before)} == set(range(first, turns[3]["last_step"] + 1))
    meta = json.loads((root / f"step_{first:04d}" / "meta.json").read_text())
    assert meta["past_len"] == len(turns[0]["token_ids"]) + len(turns[1]["token_ids"]) - 1
    assert "turn 1:" in conversation["stdout"] and USERS[1] in conversation["stdout"]
    onnx_dir = json.loads((root / "run.json").read_text())["onnx_dir"]
    run_doit("--onnx_dir", onnx_dir, "--run_root", root, "--reply", USERS[1], "--steps", STEPS)
    assert file_ids(root) == after and summary(root)["turns"] == turns


def test_messages_replay_and_compare_across_turns(qwen25, conversation, tmp_path):
    _, onnx_dir, messages = qwen25
    root = tmp_path / "run"
    run_doit("--onnx_dir", onnx_dir, "--run_root", root, "--messages", messages, "--steps", STEPS)
    assert step_files(root) == step_files(conversation["root"])
    proc = subprocess.run([sys.executable, "-m", "pipeline.compare", str(root), str(conversation["root"])],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK: all" in proc.stdout
    # a file that disagrees with the run's conversation is refused in one line
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"role": "user", "content": USERS[0]}, {"role": "user", "content": "Why?"}]))
    proc = run_doit("--onnx_dir", onnx_dir, "--run_root", root, "--messages", other, check=False)
    assert proc.returncode == 2 and "turn 1" in proc.stderr and "Traceback" not in proc.stderr


def test_kill_minus_9_in_the_second_turn_then_resume(qwen25, conversation, tmp_path):
    _, onnx_dir, messages = qwen25
    root = tmp_path / "run"
    second = summary(conversation["root"])["turns"][2]["first_step"]
    cmd = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "--dir", str(REPO), "run_auto",
           "--onnx_dir", str(onnx_dir), "--run_root", str(root), "--messages", str(messages), "--steps", str(STEPS)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (root / f"step_{second + 1:04d}" / "hidden_block1.npy").exists():
        assert time.time() < deadline and proc.poll() is None, "run finished or hung before it could be killed"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    turn0 = {n: ids for n, ids in file_ids(root).items() if int(n[5:9]) < second}
    assert len({n[:9] for n in turn0}) == second
    run_doit("--onnx_dir", onnx_dir, "--run_root", root, "--messages", messages, "--steps", STEPS)
    assert messages_of(root) == messages_of(conversation["root"])
    assert step_files(root) == step_files(conversation["root"])
    assert all(file_ids(root)[n] == ids for n, ids in turn0.items()), "the resumed run rewrote turn 0"


def test_repetition_penalty_and_model_sampling_equal_transformers(qwen25, hf, tmp_path):
    """--sampling model --greedy --repetition_penalty 1.3: the generation_config's settings, greedy, penalized over
    the whole conversation in the cache, as transformers' generate(repetition_penalty=1.3) on the same ids."""
    _, onnx_dir, _ = qwen25
    root, messages = tmp_path / "run", tmp_path / "conversation.json"
    # unpenalized, the random-weight model repeats one token after this prompt: the penalty has work to do
    messages.write_text(json.dumps([{"role": "user", "content": u} for u in REPEATING]))
    run_doit("--onnx_dir", onnx_dir, "--run_root", root, "--messages", messages, "--steps", STEPS,
             "--sampling", "model", "--greedy", "--repetition_penalty", 1.3)
    settings = json.loads((root / "run.json").read_text())["sampling"]
    assert settings == {"greedy": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "seed": 0,
                        "repetition_penalty": 1.3}
    turns = summary(root)["turns"]
    check_replies_equal_transformers(turns, hf, REPEATING, repetition_penalty=1.3)
    model, _ = hf
    unpenalized = [hf_greedy(model, conversation_ids(turns[:i + 1]), STEPS)[0] for i in (0, 2)]
    assert unpenalized != [turns[1]["token_ids"], turns[3]["token_ids"]], "the penalty changed nothing"
    # by hand: the output stage takes the ids in the cache from the sibling step folders (or --context_ids)
    last = turns[3]["last_step"]
    step = root / f"step_{last:04d}"
    meta = json.loads((step / "meta.json").read_text())
    assert meta["seen_token_count"] == meta["next_past_len"] and meta["sampling"]["repetition_penalty"] == 1.3
    context = tmp_path / "context.txt"
    context.write_text(" ".join(map(str, conversation_ids(turns)[:meta["past_len"]])))
    for extra in ([], ["--context_ids", context]):
        (step / "next_token_id.txt").write_text("0\n")
        meta["stages"].pop("output", None)
        (step / "meta.json").write_text(json.dumps(meta))
        run_stage("output", "--step_dir", step, "--onnx_dir", onnx_dir, *extra)
        assert int((step / "next_token_id.txt").read_text()) == turns[3]["token_ids"][-1]
    context.write_text("1 2 3")
    (step / "meta.json").write_text(json.dumps(meta))
    proc = run_stage("output", "--step_dir", step, "--onnx_dir", onnx_dir, "--context_ids", context, check=False)
    assert proc.returncode == 2 and "repetition_penalty needs the" in proc.stderr


def chat_command(onnx_dir, root, *args) -> list[str]:
    return [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "--dir", str(REPO), "chat",
            "--onnx_dir", str(onnx_dir), "--run_root", str(root), *map(str, args)]


def test_doit_chat_two_turns_save_exit(qwen25, conversation, tmp_path):
    _, onnx_dir, _ = qwen25
    root, saved = tmp_path / "chat", tmp_path / "saved.json"
    typed = f"{USERS[0]}\n{USERS[1]}\n/save {saved}\n/exit\n"
    proc = subprocess.run(chat_command(onnx_dir, root, "--steps", STEPS), input=typed, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert step_files(root) == step_files(conversation["root"])
    tok = Tokenizer.load(onnx_dir)
    turns = summary(root)["turns"]
    replies = [r["token_ids"][:-1] if r["stop_reason"] == "eos" else r["token_ids"] for r in turns[1::2]]
    for reply in replies:  # streamed token by token (the stop token left out)
        assert "".join(tok.decode([i]) for i in reply) in proc.stdout
    assert proc.stdout.count("you> ") == 4 and "Traceback" not in proc.stderr
    assert json.loads(saved.read_text()) == [{"role": "user", "content": USERS[0]},
                                             {"role": "assistant", "content": tok.decode(replies[0])},
                                             {"role": "user", "content": USERS[1]},
                                             {"role": "assistant", "content": tok.decode(replies[1])}]


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(qwen25, tmp_path):
    _, onnx_dir, _ = qwen25
    root = tmp_path / "chat"
    proc = subprocess.Popen(chat_command(onnx_dir, root, "--steps", 60, "--ignore_eos"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write(USERS[0] + "\n")
        proc.stdin.flush()
        deadline = time.time() + 120
        while len(list(root.glob("step_*/next_token_id.txt"))) < 3:
            assert time.time() < deadline and proc.poll() is None, "the reply did not start"
            time.sleep(0.01)
        assert not (root / "summary.json").exists(), "the reply ended before it could be stopped"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(f"{USERS[1]}\n/exit\n", timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    assert "[stopped after" in out and "Traceback" not in err
    turns = summary(root)["turns"]
    assert turns[1]["stop_reason"] == "interrupted" and 1 <= len(turns[1]["token_ids"]) < 60
    assert turns[3]["stop_reason"] in ("max_steps", "cache_full") and turns[3]["token_ids"]
    # the new turn follows the last step that sampled a token: no step folder is missing or left over
    steps = sorted(int(p.name[5:]) for p in root.glob("step_*"))
    assert steps == list(range(turns[3]["last_step"] + 1))
    assert turns[2]["first_step"] == turns[1]["last_step"] + 1


def test_branch_inside_and_before_a_later_turn(qwen25, conversation, tmp_path):
    """--from_step inside turn 1 regenerates its rest (other sampling); --from_step at its first step with another
    --reply replaces it. Turn 0's steps are kept as they are."""
    _, onnx_dir, _ = qwen25
    root = tmp_path / "run"
    shutil.copytree(conversation["root"], root, ignore=shutil.ignore_patterns(".lock", ".doit*"))
    ref = summary(root)["turns"]
    first = ref[2]["first_step"]
    turn0 = {n: ids for n, ids in file_ids(root).items() if int(n[5:9]) < first}
    branch = ref[3]["first_step"] + 2
    run_doit("--onnx_dir", onnx_dir, "--run_root", root, "--reply", USERS[1], "--steps", STEPS,
             "--temperature", 1.5, "--seed", 3, "--from_step", branch)
    turns = summary(root)["turns"]
    kept = branch - ref[3]["first_step"]  # tokens sampled before the branch point
    assert [t["token_ids"] for t in turns[:3]] == [t["token_ids"] for t in ref[:3]]
    assert turns[3]["token_ids"][:kept] == ref[3]["token_ids"][:kept]
    assert turns[3]["token_ids"] != ref[3]["token_ids"]
    run_doit("--onnx_dir", onnx_dir, "--run_root", root, "--reply", "Why?", "--from_step", first)
    turns = summary(root)["turns"]
    assert [t["text"] for t in turns[::2]] == [USERS[0], "Why?"] and turns[3]["token_ids"]
    assert json.loads((root / "run.json").read_text())["sampling"]["temperature"] == 1.5  # the run's, as recorded
    assert all(file_ids(root)[n] == ids for n, ids in turn0.items()), "a branch rewrote turn 0"
    # a message that does not fit the cache is refused in one line, and the conversation stays as it was
    before = (root / "run.json").read_text()
    proc = run_doit("--onnx_dir", onnx_dir, "--run_root", root, "--reply", " ".join(["word"] * 120), check=False)
    assert proc.returncode == 2 and "no longer fits the 128-slot KV cache" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and (root / "run.json").read_text() == before


def test_by_hand_chat_steps_equal_run_auto(qwen25, conversation, tmp_path):
    """stages.token_embed --chat renders step 0 as run_auto does; a later turn's first step by hand takes the
    conversation's ids so far (--tokens_file) from --past_len on."""
    _, onnx_dir, _ = qwen25
    ref = conversation["root"]
    run_stage("token_embed", "--step_dir", tmp_path / "step_0000", "--onnx_dir", onnx_dir, "--past_len", 0,
              "--prompt", USERS[0], "--chat")
    root = tmp_path / "run"
    shutil.copytree(ref, root, ignore=shutil.ignore_patterns(".lock", ".doit*"))
    turns = summary(ref)["turns"]
    first = turns[2]["first_step"]
    past_len = json.loads((ref / f"step_{first:04d}" / "meta.json").read_text())["past_len"]
    shutil.rmtree(root / f"step_{first:04d}")
    ids = tmp_path / "conversation_ids.txt"
    ids.write_text(" ".join(map(str, conversation_ids(turns[:3]))))
    run_stage("token_embed", "--step_dir", root / f"step_{first:04d}", "--onnx_dir", onnx_dir,
              "--past_len", past_len, "--tokens_file", ids)
    for step, by_hand in ((0, tmp_path / "step_0000"), (first, root / f"step_{first:04d}")):
        for name in ("input_ids.npy", "attention_mask.npy", "position_ids.npy", "hidden_block0.npy"):
            assert (by_hand / name).read_bytes() == (ref / f"step_{step:04d}" / name).read_bytes(), (step, name)
    proc = run_stage("token_embed", "--step_dir", tmp_path / "x", "--onnx_dir", onnx_dir, "--past_len", 0,
                     "--prompt", "hi", "--system", "Be brief.", check=False)
    assert proc.returncode == 2 and "go with --chat" in proc.stderr
