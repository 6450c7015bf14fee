"""stagepipe serve / doit serve: the web app on 127.0.0.1 (run browser, compare view, chat).

    stagepipe serve [--runs runs] [--port 8000] [--host 127.0.0.1] [--onnx_dir O]

Starlette (the ASGI toolkit under FastAPI) served by uvicorn; both come with `pip install -e '.[web]'`.
"""
from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from pathlib import Path

from pipeline.core.errors import StagepipeError, cli_entry
from pipeline.web.options import ServeOptions

WEB_EXTRA = "pip install -e '.[web]' (starlette, uvicorn)"


def require_web_stack():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise StagepipeError(f"stagepipe serve needs {e.name}, which is not installed: {WEB_EXTRA}") from None


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, made here so a port in use is one clear error and port 0 picks a free one."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise StagepipeError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); pick another "
                             "--port (0: any free one)") from None
    sock.listen(64)
    return sock


def make_server(options: ServeOptions, cwd: Path | None = None):
    """(uvicorn server, its bound socket, the URL) for these options; server.run(sockets=[sock]) serves."""
    require_web_stack()
    import uvicorn

    from pipeline.web.app import LOOPBACK_NAMES, make_app

    runs = Path(options.runs)
    if runs.exists() and not runs.is_dir():
        raise StagepipeError(f"--runs {runs}: is a file; give the folder that holds the run folders")
    defaults = {"onnx_dir": options.onnx_dir} if options.onnx_dir else {}
    loopback = options.host in ("127.0.0.1", "localhost")
    app = make_app(runs, defaults, cwd, allowed_hosts=LOOPBACK_NAMES if loopback else ["*"])
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    return uvicorn.Server(config), sock, url


@contextlib.contextmanager
def serving(options: ServeOptions, cwd: Path | None = None):
    """The app served from a thread of this process (tests, screenshots): yields its URL, stops on exit."""
    server, sock, url = make_server(options, cwd)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the web server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def serve(options: ServeOptions) -> int:
    server, sock, url = make_server(options)
    where = "this machine only" if options.host in ("127.0.0.1", "localhost", "::1") else \
        f"reachable at {options.host}: anyone who can reach it can read the runs and start chats"
    print(f"stagepipe serve: {url}  (runs folder {Path(options.runs).resolve()}; {where}; Ctrl-C stops)", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C it caught
        pass
    print("stagepipe serve: stopped", flush=True)
    return 0


@cli_entry
def main(argv=None):
    from pipeline.core.cli_args import ArgumentParser
    from pipeline.core.options import add_arguments, from_values

    p = ArgumentParser(prog="stagepipe serve", description=__doc__.split("\n")[0])
    add_arguments(p, ServeOptions)
    return serve(from_values(ServeOptions, vars(p.parse_args(argv))))


def serve_action(**params):
    """doit action for `doit serve`: the process exits with serve's code."""
    from pipeline.core.options import from_values

    try:
        code = serve(from_values(ServeOptions, params))
    except StagepipeError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    if code:
        sys.exit(code)


if __name__ == "__main__":
    sys.exit(main())
