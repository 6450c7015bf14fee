"""URL -> handler. Pages are thin templates whose scripts draw from the /api/ JSON (the same data refreshes them
while a run generates). Plain `def` handlers run in Starlette's thread pool, so reading tensors never blocks
the streams."""
from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from pipeline.web import views
from pipeline.web.chat import history
from pipeline.web.folder import RequestError


def _page(request: Request, template: str, title: str, nav: str, **data):
    return request.app.state.render(template, title=title, nav=nav, data=data)


def _q(request: Request, name: str) -> str | None:
    return request.query_params.get(name)


# -- pages ------------------------------------------------------------------------------------------------------------
def index_page(request: Request):
    return _page(request, "index.html", "runs", "runs", root=str(request.app.state.folder.root))


def run_page(request: Request):
    folder = request.app.state.folder
    name = folder.name_of(folder.run(_q(request, "run")))
    return _page(request, "run.html", name, "runs", run=name)


def step_page(request: Request):
    folder = request.app.state.folder
    run_dir = folder.run(_q(request, "run"))
    step = folder.step(run_dir, _q(request, "step")).name
    return _page(request, "step.html", f"{folder.name_of(run_dir)} {step}", "runs", run=folder.name_of(run_dir),
                 step=step)


def compare_page(request: Request):
    folder = request.app.state.folder
    a, b = _q(request, "a"), _q(request, "b")
    tol = views.tolerance(request.query_params)  # a bad number is an error page, not an empty view
    if a and b:
        a, b = folder.name_of(folder.run(a)), folder.name_of(folder.run(b))
    return _page(request, "compare.html", "compare", "compare", a=a, b=b, runs=folder.run_names(),
                 query=str(request.query_params), tol=vars(tol))


def chat_page(request: Request):
    folder = request.app.state.folder
    name = _q(request, "c")
    if name and not folder.is_chat_folder(name):
        raise RequestError(404, f"{name}: not a conversation of this page (they live in chats/NAME)")
    chats = [r for r in folder.run_names() if folder.is_chat_folder(r)]
    onnx_dirs = sorted({e["onnx_dir"] for e in views.runs_list(folder)["runs"] if e["onnx_dir"]})
    return _page(request, "chat.html", "chat", "chat", conversation=name, chats=chats[::-1],
                 defaults=request.app.state.turns.defaults, onnx_dirs=onnx_dirs)


# -- JSON -------------------------------------------------------------------------------------------------------------
def api_runs(request: Request):
    return JSONResponse(views.runs_list(request.app.state.folder))


def api_run(request: Request):
    return JSONResponse(views.run_view(request.app.state.folder, _q(request, "run")))


def api_step(request: Request):
    return JSONResponse(views.step_view(request.app.state.folder, _q(request, "run"), _q(request, "step")))


def api_tensor(request: Request):
    return JSONResponse(views.tensor_view(request.app.state.folder, _q(request, "run"), _q(request, "step"),
                                          _q(request, "file")))


def api_kv(request: Request):
    return JSONResponse(views.kv_view(request.app.state.folder, _q(request, "run")))


def api_compare(request: Request):
    tol = views.tolerance(request.query_params)
    return JSONResponse(views.compare_runs(request.app.state.folder, _q(request, "a"), _q(request, "b"), tol))


def api_compare_cell(request: Request):
    q = request.query_params
    return JSONResponse(views.compare_cell(request.app.state.folder, q.get("a"), q.get("b"), q.get("step"),
                                           q.get("file")))


# -- chat -------------------------------------------------------------------------------------------------------------
def _conversation(request: Request, name: str | None):
    folder = request.app.state.folder
    if not name or not folder.is_chat_folder(name):
        raise RequestError(404, f"{name!r}: no such conversation (they live in chats/NAME)")
    return folder.path(name)


def api_chat(request: Request):
    name = _q(request, "c")
    run_dir = _conversation(request, name)
    turn = request.app.state.turns.get(name)
    messages = history(run_dir) if run_dir.is_dir() else []
    return JSONResponse({"conversation": name, "messages": messages, "running": bool(turn and turn.running)})


async def api_chat_send(request: Request):
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        # a form or text/plain POST from another site's page is refused (JSON needs a CORS preflight)
        raise RequestError(415, "send the message as JSON (Content-Type: application/json)")
    try:
        body = await request.json()
        message, settings = str(body.get("message", "")), dict(body.get("settings") or {})
    except (ValueError, AttributeError, TypeError):
        raise RequestError(400, 'expected JSON {"message": TEXT, "conversation": NAME or null, "settings": {...}}')
    name, _ = request.app.state.turns.start(body.get("conversation"), message, settings)
    return JSONResponse({"conversation": name})


async def api_chat_stop(request: Request):
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise RequestError(403, "stop requests come from the chat page itself")
    name = _q(request, "c")
    _conversation(request, name)
    turn = request.app.state.turns.get(name)
    if turn:
        turn.stop()
    return JSONResponse({"conversation": name, "stopping": bool(turn and turn.running)})


def api_chat_events(request: Request):
    """Server-sent events of the conversation's current turn: {"text"} deltas, then {"done"}."""
    name = _q(request, "c")
    _conversation(request, name)
    turn = request.app.state.turns.get(name)

    def stream():
        events = turn.events() if turn else iter([{"done": {"stop_reason": None, "idle": True}}])
        for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


ROUTES = [
    Route("/", index_page), Route("/run", run_page), Route("/step", step_page), Route("/compare", compare_page),
    Route("/chat", chat_page),
    Route("/api/runs", api_runs), Route("/api/run", api_run), Route("/api/step", api_step),
    Route("/api/tensor", api_tensor), Route("/api/kv", api_kv), Route("/api/compare", api_compare),
    Route("/api/compare/cell", api_compare_cell),
    Route("/api/chat", api_chat), Route("/api/chat/send", api_chat_send, methods=["POST"]),
    Route("/api/chat/stop", api_chat_stop, methods=["POST"]), Route("/api/chat/events", api_chat_events),
]
