"""ServeOptions: `stagepipe serve` and `doit serve` take the same options (imports nothing of the web stack, so
`doit list` stays instant)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.options import option


@dataclass(frozen=True)
class ServeOptions:
    runs: str = option("runs", "the runs folder the pages show; the chat writes its conversations to RUNS/chats/")
    port: int = option(8000, "port to listen on (0: any free port)")
    host: str = option("127.0.0.1", "address to listen on (127.0.0.1: this machine only)")
    onnx_dir: str = option("", "the chat's model folder (default: the demo model, converted on first use)")
