"""The web app (pipeline/web: `stagepipe serve`) and the HTML compare report, in a real browser.

Headless Chromium (Debian's `chromium` package) driven by Playwright for Python loads every page from a server
bound to 127.0.0.1 in this process: the runs list, a run (and its live progress as step folders appear), a step's
tensors, a compare of a tampered run (the marked first divergence, then its cell), the chat (a streamed reply
through the stage pipeline, and the stop button) and the error page; the self-contained report opens from a
file:// URL. The tests without a browser check the safety rules and the error responses over plain HTTP.

STAGEPIPE_SCREENSHOTS=docs python -m pytest tests/test_web.py   rewrites the README's screenshots.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the web app needs the web extra: pip install -e '.[web]'")
pytest.importorskip("uvicorn", reason="the web app needs the web extra: pip install -e '.[web]'")

from tests.run_helpers import REPO, env_without_threads_noise, one_line_error  # noqa: E402

from pipeline.tools.compare import compare  # noqa: E402
from pipeline.tools.compare_view import cell_detail, heat_map, write_html_report  # noqa: E402
from pipeline.web.folder import RequestError, RunsFolder  # noqa: E402
from pipeline.web.options import ServeOptions  # noqa: E402
from pipeline.web.serve import serving  # noqa: E402

STEPS = 5
PROMPT = "Give me a short introduction to large language models."  # 10 tokens: two prefill chunks of 8
CHROMIUM = os.environ.get("STAGEPIPE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = os.environ.get("STAGEPIPE_SCREENSHOTS")
TAMPERED = ("step_0002", "hidden_block1.npy")


def start_run(onnx_dir: Path, run_root: Path, backend: str) -> subprocess.Popen:
    """`stagepipe run` in a child process (its lock is gone when it exits, so the pages see a finished run)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--onnx_dir", str(onnx_dir), "--run_root",
                             str(run_root), "--steps", str(STEPS), "--ignore_eos", "--backend", backend, "--prompt",
                             PROMPT],
                            cwd=REPO, env=env_without_threads_noise(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_onnx):
    """runs/x (onnx), runs/ref (numpy reference), runs/bad (x with step_0002/hidden_block1 + 0.5)."""
    root = tmp_path_factory.mktemp("web") / "runs"
    _, onnx_dir = small_onnx
    procs = [start_run(onnx_dir, root / "x", "onnx"), start_run(onnx_dir, root / "ref", "reference")]
    for proc in procs:
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out
    shutil.copytree(root / "x", root / "bad", ignore=shutil.ignore_patterns(".lock", ".doit*"))
    path = root / "bad" / TAMPERED[0] / TAMPERED[1]
    np.save(path, np.load(path) + 0.5)
    return {"root": root, "onnx_dir": onnx_dir}


@pytest.fixture(scope="module")
def server(runs):
    with serving(ServeOptions(runs=str(runs["root"]), port=0, onnx_dir=str(runs["onnx_dir"])),
                 cwd=runs["root"].parent) as url:
        yield url


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.headers.get("content-type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read().decode()


# -- without a browser --------------------------------------------------------------------------------------------
def test_names_stay_inside_the_runs_folder(runs, tmp_path):
    folder = RunsFolder(runs["root"])
    assert folder.run_names() == ["bad", "ref", "x"]
    assert folder.run("x") == runs["root"].resolve() / "x"
    for bad in ["../x", "/etc", "x/../../etc", ".hidden", "x//step_0000", "", "a\\b"]:
        with pytest.raises(RequestError) as e:
            folder.run(bad)
        assert e.value.status in (400, 404), bad
    outside = tmp_path / "outside"
    shutil.copytree(runs["root"] / "x", outside, ignore=shutil.ignore_patterns(".lock", ".doit*"))
    link = runs["root"] / "link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with pytest.raises(RequestError) as e:
            folder.run("link")
        assert e.value.status == 403 and "outside the runs folder" in str(e.value)
        assert "link" not in folder.run_names()  # symlinks are not followed when listing
        inner = runs["root"] / "x" / "step_0001" / "stolen.npy"
        inner.symlink_to(outside / "step_0001" / "logits.npy")
        try:
            with pytest.raises(RequestError) as e:
                folder.run("x")  # a symlink inside a run that points out refuses the whole run
            assert e.value.status == 403
        finally:
            inner.unlink()
    finally:
        link.unlink()
    step = folder.step(folder.run("x"), "step_0001")
    for bad in ["../run.json", "meta.json", "x.npy", ".npy/../a.npy"]:
        with pytest.raises(RequestError):
            folder.tensor(step, bad)


def test_bad_requests_get_error_pages_not_tracebacks(runs, server):
    for path, status in [("/run?run=../x", 400), ("/run?run=nope", 404), ("/run", 400), ("/nowhere", 404),
                         ("/step?run=x&step=step_9999", 404), ("/step?run=x&step=meta.json", 400),
                         ("/compare?a=x&b=nope", 404), ("/compare?a=x&b=ref&atol=abc", 400),
                         ("/chat?c=x", 404)]:
        code, kind, body = get(server + path)
        assert code == status and kind.startswith("text/html"), (path, code, body[:200])
        assert 'id="error"' in body and "Traceback" not in body, path
    code, kind, body = get(server + "/api/tensor?run=x&step=step_0001&file=../run.json")
    assert code == 404 and kind.startswith("application/json") and "no such tensor file" in json.loads(body)["error"]
    empty = runs["root"] / "empty"
    (empty / "step_0042").mkdir(parents=True)
    try:  # no step in common: the compare tool's one-line error, as a page
        code, _, body = get(server + "/api/compare?a=x&b=empty")
        assert code == 422 and "no step folder in common" in json.loads(body)["error"]
    finally:
        shutil.rmtree(empty)
    for body, kind, status, needle in [(b"not json", "application/json", 400, "expected JSON"),
                                       (b'{"message": "hi"}', "text/plain", 415, "as JSON")]:
        req = urllib.request.Request(server + "/api/chat/send", data=body, method="POST",
                                     headers={"Content-Type": kind})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == status and needle in json.loads(e.value.read())["error"]
    # another host name (DNS rebinding from a web page elsewhere) is refused
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(server + "/api/runs", headers={"Host": "evil.example"}))
    assert e.value.code == 400


def test_doit_serve_on_a_busy_port_is_one_error_line(runs):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        proc = subprocess.run([sys.executable, "-m", "doit", "serve", "--runs", str(runs["root"]), "--port",
                               str(busy.getsockname()[1])], cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    one_line_error(proc, "--port", "cannot listen there")


def test_pages_read_and_never_write(runs, server):
    before = {p: p.stat().st_mtime_ns for p in runs["root"].rglob("*") if "chats" not in p.parts}
    for path in ["/", "/run?run=x", "/step?run=x&step=step_0001", "/compare?a=bad&b=ref", "/compare?a=x", "/api/runs",
                 "/api/run?run=x", "/api/step?run=x&step=step_0001", "/api/kv?run=x",
                 "/api/tensor?run=x&step=step_0001&file=logits.npy", "/api/compare?a=bad&b=ref",
                 "/api/compare/cell?a=bad&b=ref&step=step_0002&file=hidden_block1.npy"]:
        assert get(server + path)[0] == 200, path
    after = {p: p.stat().st_mtime_ns for p in runs["root"].rglob("*") if "chats" not in p.parts}
    assert after == before


def test_run_and_tensor_data(runs, server):
    info = json.loads(get(server + "/api/run?run=x")[2])
    assert [s["dir"] for s in info["steps"]] == [f"step_000{i}" for i in range(STEPS + 1)]
    assert info["stages"] == ["embed", "block0", "block1", "output"] and not info["live"]
    assert info["steps"][0]["input_text"] and info["steps"][2]["next_token_text"] is not None
    assert info["rates"]["source"] == "summary.json" and info["rates"]["ttft_s"] > 0
    tensor = json.loads(get(server + "/api/tensor?run=x&step=step_0002&file=hidden_block1.npy")[2])
    arr = np.load(runs["root"] / "x" / "step_0002" / "hidden_block1.npy")
    assert sum(tensor["histogram"]["counts"]) == arr.size and tensor["shape"] == list(arr.shape)
    assert tensor["histogram"]["edges"][0] == pytest.approx(arr.min()) and tensor["max"] == pytest.approx(arr.max())
    kv = json.loads(get(server + "/api/kv?run=x")[2])
    filled = kv["expected_filled"]
    assert filled == 10 + STEPS - 1 and all(f["nonzero_slots"] == filled for f in kv["files"])


def test_heat_map_and_cell_detail(runs):
    root = runs["root"]
    report = compare(root / "bad", root / "ref")
    heat = heat_map(report)
    files = [c["file"] for c in heat["columns"]]
    assert files[:3] == ["input_ids.npy", "attention_mask.npy", "position_ids.npy"] and files[-1] == "logits.npy"
    assert heat["first"] == {"step": TAMPERED[0], "file": TAMPERED[1]}
    cell = heat["rows"][2]["cells"][files.index(TAMPERED[1])]
    assert cell["exceeds"] and cell["max_abs_err"] == pytest.approx(0.5, abs=1e-3)
    detail = cell_detail(root / "bad" / TAMPERED[0], root / "ref" / TAMPERED[0], TAMPERED[1])
    assert detail["size"] == 128 and detail["exact"] == 0 and sum(detail["counts"]) == 128
    assert len(detail["worst"]) == 10 and all(w["abs_err"] == pytest.approx(0.5, abs=1e-3) for w in detail["worst"])
    a = np.load(root / "bad" / TAMPERED[0] / TAMPERED[1])
    w = detail["worst"][0]
    assert a[tuple(w["index"])] == pytest.approx(w["a"])
    # a prefill step's padding rows are left out as compare leaves them out: 2 real rows of 8
    padded = cell_detail(root / "bad" / "step_0001", root / "ref" / "step_0001", "hidden_block2.npy")
    assert padded["real_rows"] == 2 and padded["size"] == 2 * 128
    exact = cell_detail(root / "bad" / "step_0001", root / "ref" / "step_0001", "input_ids.npy")
    assert exact["exact"] == exact["size"] and exact["counts"] == []


def test_html_report_is_self_contained(runs, tmp_path):
    from pipeline.tools import compare as compare_mod

    out = tmp_path / "report.html"
    assert compare_mod.main([str(runs["root"] / "bad"), str(runs["root"] / "ref"), "--html", str(out)]) == 1
    html = out.read_text()
    assert "Chart.js v4" in html and "StagepipeCompare" in html
    for remote in ('src="http', "src='http", 'href="http', "@import", "url(http"):
        assert remote not in html, remote
    data = json.loads(html.split('id="compare-data">')[1].split("</script>")[0])
    assert data["view"]["first_failure"]["path"] == "/".join(TAMPERED)
    assert "/".join(TAMPERED) in data["details"] and len(data["details"]) == data["view"]["tensors_compared"]


# -- in the browser -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need Playwright: "
                                                                 "pip install -e '.[test]'")
    if not CHROMIUM:
        pytest.skip("the browser tests need Chromium, which is not installed: apt-get install chromium")
    with sync_api.sync_playwright() as p:
        # as root Chromium needs --no-sandbox; the rest keep it off the (closed) network
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(30_000)
    yield page
    context.close()
    assert errors == []  # no script error on any page


def shot(page, name: str, full_page: bool = False):
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / f"web-{name}.png"), full_page=full_page)


def test_runs_list_run_and_step_pages(server, page):
    page.goto(server + "/")
    page.wait_for_selector("#runs-table")
    assert page.locator("#runs-table tbody tr").count() == 3
    assert page.input_value("#pick-a") == "bad" and page.input_value("#pick-b") == "ref"
    shot(page, "runs")
    page.click("#runs-table a[href='/run?run=x']")
    page.wait_for_selector("#steps-table")
    assert page.url.endswith("/run?run=x")
    assert page.locator("#steps-table tbody tr").count() == STEPS + 1
    assert page.locator("#steps-table thead th").all_inner_texts()[-5:] == \
        ["embed ms", "block0 ms", "block1 ms", "output ms", "total ms"]
    page.wait_for_selector("#kv-table")
    assert "14/64" in page.inner_text("#kv-table")
    assert page.locator("#stage-chart").bounding_box()["height"] > 100
    shot(page, "run")
    page.click("#steps-table a:text-is('step_0002')")
    page.wait_for_selector("#tensors-table")
    page.click("#tensors-table tr[data-file='hidden_block1.npy']")
    page.wait_for_selector("#tensor-histogram")
    assert "128 elements, 0 NaN, 0 Inf" in page.inner_text("#tensor-detail")
    shot(page, "step")


def test_compare_marks_the_first_divergence(server, page):
    page.goto(server + "/")
    page.wait_for_selector("#runs-table")
    page.click("#compare-form button")  # bad against ref, as preselected
    page.wait_for_selector("#heat")
    marked = page.locator("td.cell.first-divergence")
    assert marked.count() == 1
    assert (marked.get_attribute("data-step"), marked.get_attribute("data-file")) == TAMPERED
    assert page.locator("td.cell.exceeds").count() == 1
    assert "First divergence: step_0002/hidden_block1.npy" in page.inner_text("#verdict")
    marked.click()
    page.wait_for_selector("#worst")
    assert page.locator("#worst tbody tr").count() == 10
    assert all(abs(float(c) - 0.5) < 1e-3 for c in page.locator("#worst tbody tr td:nth-child(4)").all_inner_texts())
    assert page.locator("#error-histogram").count() == 1
    shot(page, "compare", full_page=True)
    page.check("input[value=cosine]")  # colour by 1 - cosine: the same cell stays marked
    assert page.locator("td.cell.first-divergence").get_attribute("data-file") == TAMPERED[1]


def test_html_report_in_the_browser(runs, page, tmp_path):
    out = tmp_path / "report.html"
    write_html_report(compare(runs["root"] / "bad", runs["root"] / "ref"), out)
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:") else
               route.continue_())  # no network at all
    page.goto(out.as_uri())
    page.click("td.cell.first-divergence")
    page.wait_for_selector("#worst")
    assert page.locator("#error-histogram").count() == 1 and "step_0002 / hidden_block1.npy" in \
        page.inner_text("#cell-detail")


def test_run_page_follows_a_run_as_it_generates(runs, server, page):
    """A run folder whose lock names a live process (this one) grows step by step; the page shows each new step
    without a reload, and stops following when the lock is gone."""
    src, live = runs["root"] / "x", runs["root"] / "live"
    live.mkdir()
    shutil.copy(src / "run.json", live / "run.json")
    (live / ".lock").write_text(str(os.getpid()))

    def add(n):
        tmp = live / f".tmp-{n}"
        shutil.copytree(src / f"step_000{n}", tmp)
        tmp.rename(live / f"step_000{n}")  # a step folder appears whole, as run_auto's files do

    try:
        page.goto(server + "/run?run=live")
        page.wait_for_selector("#live-badge")
        for n in range(3):
            add(n)
            page.wait_for_function(f"document.querySelectorAll('#steps-table tbody tr').length === {n + 1}")
        assert "steps so far" in page.inner_text("#run")
        (live / ".lock").unlink()
        page.wait_for_selector("#live-badge", state="detached")
    finally:
        shutil.rmtree(live)


CHAT_OBSERVER = """() => { window.lengths = []; new MutationObserver(() => {
    const all = document.querySelectorAll('.msg.assistant'), last = all[all.length - 1];
    if (last && !last.classList.contains('done')) window.lengths.push(last.querySelector('.text').textContent.length);
  }).observe(document.getElementById('messages'), {subtree: true, characterData: true, childList: true}); }"""
LAST_REPLY = ".msg.assistant >> nth=-1"


def send(page, text: str, steps: int):
    page.fill("#settings [name=steps]", str(steps))
    page.fill("#message", text)
    page.evaluate(CHAT_OBSERVER)
    page.press("#message", "Enter")


def conversation_dir(runs, page) -> Path:
    return runs["root"] / page.url.split("c=")[1].replace("%2F", "/")


def test_chat_streams_replies_through_the_pipeline(runs, server, page):
    page.goto(server + "/chat")
    page.check("#settings [name=ignore_eos]")
    send(page, "Hello there, who are you?", 24)
    page.wait_for_selector(".msg.assistant.done", timeout=90_000)
    lengths = [n for n in page.evaluate("window.lengths") if n]
    assert len(set(lengths)) >= 2, lengths  # the reply grew in several pieces: streamed, not sent at the end
    assert "stop: max_steps · 24 tokens" in page.inner_text(".msg.assistant .stats")
    run_dir = conversation_dir(runs, page)
    first = json.loads((run_dir / "summary.json").read_text())
    assert first["prompt"] == "Hello there, who are you?" and len(first["generated_token_ids"]) == 24
    assert page.inner_text(".msg.assistant .text") == first["text"]
    assert json.loads((run_dir / "run.json").read_text())["chat"]  # the chat template was applied
    # a second message continues the conversation over the same KV cache: only its reply streams
    send(page, "And what can you do?", 8)
    page.wait_for_selector(".msg.assistant.done >> nth=1", timeout=90_000)
    turns = json.loads((run_dir / "summary.json").read_text())["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[2]["text"] == "And what can you do?" and len(turns[3]["token_ids"]) == 8
    assert page.inner_text(LAST_REPLY + " >> .text") == turns[3]["text"]
    assert turns[3]["first_step"] > turns[1]["last_step"]
    shot(page, "chat")
    page.reload()  # the conversation reads back from its run folder
    page.wait_for_selector(".msg.assistant >> nth=1")
    assert page.locator(".msg").count() == 4 and page.inner_text(LAST_REPLY + " >> .text") == turns[3]["text"]
    page.click("#run-link")  # the conversation is a run like any other
    page.wait_for_selector("#steps-table")


def test_chat_stop_button(runs, server, page):
    page.goto(server + "/chat")
    page.check("#settings [name=ignore_eos]")
    send(page, "Tell me a long story.", 40)
    page.wait_for_function("(document.querySelector('.msg.assistant .text') || {textContent: ''}).textContent.length",
                           timeout=90_000)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant.done", timeout=60_000)
    assert "stop: stopped" in page.inner_text(".msg.assistant .stats")
    stopped = page.inner_text(".msg.assistant .text")
    # the next message follows the reply as it was cut short (it is not finished first)
    send(page, "Shorter, please.", 4)
    page.wait_for_selector(".msg.assistant.done >> nth=1", timeout=90_000)
    turns = json.loads((conversation_dir(runs, page) / "summary.json").read_text())["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert 1 <= len(turns[1]["token_ids"]) < 40 and turns[1]["text"] == stopped
    assert len(turns[3]["token_ids"]) == 4


def test_error_page_in_the_browser(server, page):
    page.goto(server + "/run?run=../../etc")
    assert "not a name under the runs folder" in page.inner_text("#error")
    shot(page, "error")
