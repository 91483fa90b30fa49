"""`edgephi serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn, SSE through sse-starlette) on the
public API.  load_server() opens the bundle's sessions, create_app() is the ASGI app, serve() runs it, and
ServerThread runs it in a thread of this process (tests, benchmarks, embedding)."""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
THREADED_BACKENDS = ("onnx", "llamacpp", "qnn")  # backends whose sessions take a `threads` option


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_server(bundle=None, *, parallel: int = 1, device: str = "auto", format: str | None = None,
                ctx: int | None = None, threads: int | None = None, api_key: str | None = None,
                max_queue: int | None = None, max_body: int | None = None, max_tokens: int | None = None,
                speculate: str | None = None, prompt_cache=None):
    """The Server for a bundle: `parallel` sessions of the same model (threads split between them unless given);
    `speculate` ("ngram" or a draft bundle) for every request; `prompt_cache`: a file from save_prompt_cache loaded
    into every session (a shared system prompt or document is then never recomputed)."""
    import edgephi
    from ..speculate import check_speculate
    from ..devices import physical_cores
    from .app import Limits, Server
    from .pool import Pool

    if isinstance(parallel, bool) or not isinstance(parallel, int) or not 1 <= parallel <= 64:
        raise ValueError(f"parallel={parallel!r}: must be a whole number in 1..64")
    check_speculate(speculate)
    if speculate not in (None, "ngram") and parallel > 1:
        raise ValueError(f"--speculate {speculate} with --parallel {parallel}: a draft bundle runs one session, "
                         "so it serves --parallel 1 only (--speculate ngram works with any --parallel)")
    if prompt_cache is not None and not Path(prompt_cache).is_file():
        raise FileNotFoundError(f"--prompt-cache {prompt_cache}: no such file (save one with `edgephi run BUNDLE "
                                "--prompt-cache FILE --prompt ...` or Model.save_prompt_cache)")
    options = {"n_ctx": ctx} if ctx is not None else {}
    model = edgephi.load(bundle, device=device, format=format, **options, **({"threads": threads} if threads else {}))
    sessions = [model.session]
    try:
        if parallel > 1 and threads is None and model.backend in THREADED_BACKENDS:
            options["threads"] = max(1, physical_cores() // parallel)  # the cores shared out, not oversubscribed
            model.session.close()
            model.session = sessions[0] = model.choice.backend.open(model.path, model.manifest, model.device,
                                                                    **options)
        elif threads:
            options["threads"] = threads
        for _ in range(parallel - 1):
            sessions.append(model.choice.backend.open(model.path, model.manifest, model.device, **options))
        prefix = None
        if prompt_cache is not None:
            from ..prompt_cache import load as load_cache

            for session in sessions:  # the same file into each session (load checks it against each)
                prefix = load_cache(_SessionView(model, session), prompt_cache)
        pool = Pool(model, sessions, max_queue=4 * parallel if max_queue is None else max_queue,
                    speculate=speculate, prefix=prefix)
    except BaseException:
        for s in sessions:
            s.close()
        raise
    limits = Limits(max_tokens=max_tokens, **({"max_body": max_body} if max_body else {}))
    name = model.manifest.spec.name or Path(model.path).name
    return Server(model, pool, model_id=name, api_key=api_key, limits=limits)


class _SessionView:
    """What edgephi.prompt_cache needs of a Model, for one of the server's sessions."""

    def __init__(self, model, session):
        self.session, self.path, self.format, self.backend = session, model.path, model.format, model.backend


def _uvicorn(server, host: str, port: int):
    import uvicorn

    from .app import create_app

    config = uvicorn.Config(create_app(server, loopback=is_loopback(host)), host=host, port=port,
                            log_level="warning", access_log=False, timeout_graceful_shutdown=3, lifespan="off")
    return uvicorn.Server(config)


def serve(server, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM), then stop every session."""
    try:
        _uvicorn(server, host, port).run()
    finally:
        server.pool.close()


class ServerThread:
    """Run a Server on host:port in a background thread: ``with ServerThread(server, port=0) as url: ...``."""

    def __init__(self, server, host: str = "127.0.0.1", port: int = 0):
        self.server, self.host = server, host
        self.uv = _uvicorn(server, host, port)
        self.thread = threading.Thread(target=self.uv.run, name="edgephi-serve", daemon=True)

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.uv.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host} within {timeout:.0f} s")
            time.sleep(0.02)
        port = self.uv.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self.url

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=15)
        self.server.pool.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
