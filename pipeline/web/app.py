"""The Starlette application: routes, templates, static files, and errors as pages (JSON under /api/), never a
traceback."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from pipeline.core.errors import StagepipeError
from pipeline.tools.compare_view import ASSETS
from pipeline.web import routes
from pipeline.web.chat import ChatTurns
from pipeline.web.folder import RequestError, RunsFolder

HERE = Path(__file__).parent
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)


def render(name: str, status_code: int = 200, **context) -> HTMLResponse:
    return HTMLResponse(TEMPLATES.get_template(name).render(**context), status_code=status_code)


def error_response(request: Request, status: int, message: str):
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    return render("error.html", status_code=status, title=f"error {status}", nav=None, status=status, message=message,
                  data={})


async def _request_error(request, exc: RequestError):
    return error_response(request, exc.status, str(exc))


async def _input_error(request, exc: StagepipeError):  # a damaged file in a run, two runs with no step in common
    return error_response(request, 422, str(exc))


async def _http_error(request, exc: HTTPException):
    return error_response(request, exc.status_code, exc.detail if exc.status_code != 404 else
                          f"{request.url.path}: no such page")


async def _bug(request, exc: Exception):
    print(f"stagepipe serve: {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return error_response(request, 500, f"internal error ({type(exc).__name__}); the server's console has the details")


def make_app(runs: Path, chat_defaults: dict | None = None, cwd: Path | None = None,
             allowed_hosts=LOOPBACK_NAMES) -> Starlette:
    """The app for a runs folder; chat_defaults are RunOptions values the chat starts from (e.g. onnx_dir).
    Requests naming another host are refused (a web page elsewhere cannot reach it by DNS rebinding)."""
    folder = RunsFolder(runs)
    turns = ChatTurns(folder, chat_defaults or {}, cwd)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        turns.stop_all()  # Ctrl-C the chat's child processes: their finished steps stay

    app = Starlette(routes=[*routes.ROUTES, Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
                            Mount("/assets", StaticFiles(directory=ASSETS), name="assets")],
                    exception_handlers={RequestError: _request_error, StagepipeError: _input_error,
                                        HTTPException: _http_error, Exception: _bug},
                    middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))],
                    lifespan=lifespan)
    app.state.folder, app.state.turns, app.state.render = folder, turns, render
    return app

