"""``lare2 serve RUN``: the scoring service and its web page on one port (``lare2[serve]``: FastAPI + uvicorn).

The CLI only parses options, loads the ``Detector`` (a bad run or other weights: one ``error:`` line,
exit 2, before anything listens), binds the socket (a port in use: the same) and hands the app to
uvicorn, saying where it listens (the real port, so ``--port 0`` works). A server that does not start: one
``error:`` line, exit 2. SIGTERM or Ctrl-C: stop accepting, answer every request already in, finish the queue,
exit 0.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Optional

import typer

from lare2.shared.cli_errors import check_device, fail, run_commands, user_errors

SERVE_HELP = ("Serve a trained detector over HTTP: POST /v1/score (multipart files -> lare2 score's rows), a web "
              "page at /, /v1/info, /healthz, /readyz, /metrics, /docs. Binds to 127.0.0.1 unless --host says "
              "otherwise.")
DRAIN_SECONDS = 120
"""After SIGTERM, requests still unanswered this long are cancelled (a stuck client cannot hold the exit)."""
CONNECTION_HEADROOM = 32
"""Connections beyond the queue's images (health checks, metrics, page files) before uvicorn answers 503 itself."""


def serve(
    run_dir: Path = typer.Argument(..., help="A finished run (lare2 train --out)."),
    sd: Optional[str] = typer.Option(None, "--sd",
                                     help="Latent diffusion weights, if not where the run recorded them."),
    clip: Optional[str] = typer.Option(None, "--clip", "--backbone",
                                       help="CLIP weights, if not where the run recorded them."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface; put TLS in front)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on."),
    threshold: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                              help="Decision threshold on p(fake) (default: the run's calibrated "
                                                   "one)."),
    device: str = typer.Option("auto", help="auto (CUDA when present) | cpu | cuda."),
    workers: int = typer.Option(0, min=0, help="DataLoader workers decoding each batch's images (0: on the model "
                                               "thread; workers start anew for every batch, which costs more than "
                                               "they save on a batch of up to --max-batch images)."),
    max_batch: int = typer.Option(16, min=1, help="Images scored together in one model call, at most."),
    max_wait_ms: float = typer.Option(10.0, min=0.0,
                                      help="How long a batch waits for more images after its first, ms."),
    max_queue: int = typer.Option(256, min=1,
                                  help="Images waiting for a batch, at most; beyond: 503 with Retry-After."),
    max_upload_mb: float = typer.Option(20.0, help="Request body limit in MiB (> 0); beyond: 413, unread."),
    max_inflight_mb: Optional[float] = typer.Option(
        None, help="Uploads held at once, MiB, all requests together (default: 4 x --max-upload-mb); a request "
                   "that does not fit: 503 with Retry-After, unread."),
    token_file: Optional[Path] = typer.Option(None, help="File holding a bearer token that every route but /healthz "
                                                         "requires."),
) -> None:
    device = check_device(device)
    with user_errors():  # without lare2[serve]: "this command needs fastapi ...: pip install 'lare2[serve]'"
        from lare2.serve.app import ServeSettings, build_app, load_detector

        settings = ServeSettings(run=str(run_dir), sd=sd, clip=clip, device=device, threshold=threshold,
                                 workers=workers, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                 max_upload_mb=max_upload_mb, max_inflight_mb=max_inflight_mb,
                                 token=read_token(token_file) if token_file else None)
        listener = bind(host, port)  # before the models load: a port in use fails fast
        try:
            detector = load_detector(settings)
        except BaseException:
            listener.close()
            raise
    where = f"run {Path(settings.run).resolve().name}, threshold {detector.threshold:.4g}"
    run_server(build_app(settings, detector), listener, limit_concurrency=max_queue + CONNECTION_HEADROOM, what=where)


def read_token(path: Path) -> str:
    from lare2.shared.errors import InputError, MissingInputError

    if not path.is_file():
        raise MissingInputError(f"{path}: no such token file; write the token into it "
                                f"(e.g. openssl rand -hex 32 > {path})")
    token = path.read_text().strip()
    if not token or any(c.isspace() for c in token):
        raise InputError(f"{path}: the token file must hold one token, without spaces; write one into it")
    return token


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that an address in use is a one-line error, not a server log."""
    from lare2.shared.errors import InputError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as err:
        raise InputError(f"{host}:{port}: cannot listen there ({err.strerror or err}); "
                         "choose another --host/--port") from None
    return listener


def listening_url(listener: socket.socket) -> str:
    """``http://HOST:PORT/`` of the bound socket: its real port (``--port 0`` picks one), IPv6 hosts bracketed."""
    host, port = listener.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def run_server(app, listener: socket.socket, limit_concurrency: int, what: str) -> None:
    """Serve ``app`` on ``listener`` until SIGTERM/Ctrl-C, first printing ``listening on URL (what)``."""
    import uvicorn

    from lare2.shared.logs import output_console

    config = uvicorn.Config(app, limit_concurrency=limit_concurrency, timeout_graceful_shutdown=DRAIN_SECONDS,
                            log_level="info")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has drained; handled here, that ends in exit 0
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: None)
    url = listening_url(listener)
    # uvicorn says where it runs only when it binds the socket itself; it is bound here
    output_console().print(f"listening on {url} ({what})", soft_wrap=True, highlight=False, markup=False)
    server.run(sockets=[listener])
    if not server.started:
        fail(f"{url}: the server did not start (the log above says why); fix that, or choose another --host/--port")


def register(app: typer.Typer) -> None:
    app.command("serve", help=SERVE_HELP)(serve)


def main(argv: list[str] | None = None) -> int:
    """``lare2 serve`` with ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    return run_commands(register, argv, prog_name="lare2 serve")


if __name__ == "__main__":
    raise SystemExit(main())
