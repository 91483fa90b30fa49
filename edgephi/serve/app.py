"""The ASGI app (Starlette): OpenAI's /v1 endpoints, /health, and the chat page at /.

Every request is checked before it reaches a session (edgephi/serve/params.py); anything wrong is answered with
OpenAI's error object and a 4xx status, anything unexpected with a 500 whose body holds no traceback (the
traceback goes to the server's log).  Prompts are rendered and tokenized in a worker thread, generation runs in the
pool's session threads (edgephi/serve/pool.py); the event loop only moves bytes.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ..constrain import json_schema_grammar
from . import params as P
from ..reasoning import OPEN, ReasoningSplitter
from .output import ChatOutput, CompletionOutput, TokenText
from .pool import Job, Pool, Step
from .tools import grammar as tool_grammar, parse_tools, render_messages, renders_tool_role, tool_format

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
SSE_PING_S = 15


@dataclass
class Limits:
    max_body: int = 4 << 20  # bytes of one request body
    max_tokens: int | None = None  # default and ceiling of a request's max_tokens (None: the rest of the context)


class Server:
    """The loaded model, its session pool and the request handlers."""

    def __init__(self, model, pool: Pool, *, model_id: str, api_key: str | None = None, limits: Limits = Limits()):
        self.model, self.pool, self.model_id, self.limits = model, pool, model_id, limits
        self.tokenizer = model.tokenizer
        self.n_ctx = pool.slots[0].session.n_ctx
        self.auth = ("Bearer " + api_key).encode() if api_key else None
        self.fmt = tool_format(self.tokenizer)
        self.tool_role = renders_tool_role(self.tokenizer)
        # a reasoning model (its template or vocabulary knows <think>): the thinking goes to reasoning_content
        self.reasons = OPEN in (self.tokenizer.chat_template or "") or self.tokenizer.token_to_id(OPEN) is not None
        self.texts = TokenText(self.tokenizer)
        self.created = int(time.time())

    # ---- plumbing ------------------------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.auth is None:
            return
        given = request.headers.get("authorization", "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, self.auth):
            raise P.APIError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(self, request: Request) -> dict:
        self.check_auth(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":  # a browser sends JSON cross-site only after a preflight, which fails here
            raise P.APIError(415, f"Content-Type must be application/json, got {kind or 'none'!r}",
                             code="unsupported_media_type")
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > self.limits.max_body):
            raise P.APIError(413, f"the request body is larger than {self.limits.max_body} bytes",
                             code="request_too_large")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self.limits.max_body:
                raise P.APIError(413, f"the request body is larger than {self.limits.max_body} bytes",
                                 code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise P.APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise P.APIError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def _settings(self, body: dict) -> P.Sampling:
        s = P.sampling(body, default_max_tokens=self.limits.max_tokens)
        if self.limits.max_tokens is not None and s.max_tokens is not None:
            s.max_tokens = min(s.max_tokens, self.limits.max_tokens)
        return s

    def _fit(self, ids: list[int], param: str) -> None:
        if len(ids) >= self.n_ctx:
            raise P.APIError(400, f"the prompt has {len(ids)} tokens; the context holds {self.n_ctx} (leave room "
                             "for at least one token of answer)", param=param, code="context_length_exceeded")

    def _constrain(self, s: P.Sampling, grammar: str | None, param: str) -> None:
        """s.grammar = grammar (None: unconstrained), refused with a 400 naming `param` where llguidance cannot
        compile it, or naming min_tokens where that is set (a grammar ends the answer on a stop token)."""
        if grammar is not None:
            try:
                self.model.constraint(grammar, start=0)  # compiles it: a schema llguidance refuses is a 400
            except ValueError as e:
                raise P.bad(param, str(e)) from None
            if s.min_tokens:
                raise P.bad("min_tokens", f"cannot be combined with {param}: its grammar ends the answer on a stop "
                                          "token")
        s.grammar = grammar

    # ---- request preparation (in a worker thread: templates and tokenizers are CPU work) ---------------------
    def prepare_chat(self, body: dict) -> tuple[Job, ChatOutput]:
        s = self._settings(body)
        s.logprobs = P.chat_logprobs(body)
        msgs = P.messages(body)
        tools = parse_tools(body)
        schema = P.response_format(body)
        if schema is not None and tools is not None and tools.forced:
            raise P.bad("response_format", "cannot be combined with a forced tool call (tool_choice)")
        try:
            g = json_schema_grammar(schema) if schema is not None else tool_grammar(tools, self.fmt)
        except ValueError as e:
            raise P.bad("response_format" if schema is not None else "tools", str(e)) from None
        self._constrain(s, g, "response_format" if schema is not None else "tools")
        try:
            text = self.tokenizer.apply_chat_template(render_messages(msgs, tools, self.fmt, self.tool_role),
                                                      add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer.encode(text)
        except ValueError as e:
            raise P.bad("messages", str(e)) from None
        self._fit(ids, "messages")
        out = ChatOutput(self.model_id, self.texts, tools=tools, fmt=self.fmt, logprobs=s.logprobs,
                         include_usage=s.include_usage,
                         reasoning=ReasoningSplitter.for_prompt(text) if self.reasons else None)
        return Job(ids, text, s, raw=out.state != "content"), out

    def prepare_completion(self, body: dict) -> tuple[Job, CompletionOutput]:
        s = self._settings(body)
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            s.max_tokens = min(16, s.max_tokens or 16)  # OpenAI's default for completions
        s.logprobs = P.completion_logprobs(body)
        if body.get("suffix") is not None:
            raise P.bad("suffix", "not supported")
        if P._integer(body, "best_of", 1, 1) != 1:
            raise P.bad("best_of", "only best_of=1 is supported")
        echo = P._bool(body, "echo", False)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        try:
            if isinstance(prompt, str):
                text, ids = prompt, self.model.encode(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool)
                                                             for i in prompt):
                if any(i < 0 or i >= self.model.manifest.spec.vocab_size for i in prompt):
                    raise P.bad("prompt", "a token id is outside the vocabulary")
                text, ids = None, list(prompt)
            else:
                raise P.bad("prompt", "expected a string, a list of token ids, or a list holding one of those")
        except ValueError as e:
            raise P.bad("prompt", str(e)) from None
        if not ids:
            raise P.bad("prompt", "is empty")
        self._fit(ids, "prompt")
        schema = P.response_format(body)
        if schema is not None:
            try:
                g = json_schema_grammar(schema)
            except ValueError as e:
                raise P.bad("response_format", str(e)) from None
            self._constrain(s, g, "response_format")
        shown = (text if text is not None else self.tokenizer.decode(ids)) if echo else ""
        return Job(ids, text, s), CompletionOutput(self.model_id, self.texts, logprobs=s.logprobs, echo=shown,
                                                   include_usage=s.include_usage)

    # ---- running a job ------------------------------------------------------------------------------------------
    async def respond(self, request: Request, job: Job, out) -> Response:
        queue: asyncio.Queue[Step] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(step: Step) -> None:  # called from a session's thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, step)
            except RuntimeError:  # the event loop has stopped (the server is shutting down): nobody listens
                pass

        job.emit = emit
        self.pool.submit(job)  # refuses with 503 when the queue is full
        if job.settings.stream:
            from sse_starlette.sse import EventSourceResponse

            return EventSourceResponse(self._events(job, queue, out), sep="\n", ping=SSE_PING_S)
        collect = asyncio.ensure_future(_collect(queue))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():
                collect.cancel()
                self.pool.cancel(job)
        if collect.cancelled():
            return Response(status_code=499)  # the client went away; nobody reads this
        steps = collect.result()
        if steps[-1].error is not None:
            raise steps[-1].error
        return JSONResponse(out.whole(steps))

    async def _events(self, job: Job, queue: asyncio.Queue, out):
        done = False
        try:
            while not done:
                steps = [await queue.get()]
                while not queue.empty():  # a client that reads slower than the model gets several tokens a chunk
                    steps.append(queue.get_nowait())
                done = steps[-1].last
                for chunk in out.chunks(steps):
                    yield {"data": json.dumps(chunk, ensure_ascii=False)}
                if steps[-1].error is not None:
                    yield {"data": json.dumps(steps[-1].error.body())}
            yield {"data": "[DONE]"}
        finally:
            if not done:  # the client went away (or the server stops): free the session
                self.pool.cancel(job)

    # ---- endpoints ----------------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        body = await self.read_json(request)
        job, out = await run_in_threadpool(self.prepare_chat, body)
        return await self.respond(request, job, out)

    async def completions(self, request: Request) -> Response:
        body = await self.read_json(request)
        job, out = await run_in_threadpool(self.prepare_completion, body)
        return await self.respond(request, job, out)

    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        return JSONResponse({"object": "list", "data": [self._model_entry()]})

    async def model(self, request: Request) -> Response:
        self.check_auth(request)
        if request.path_params["name"] != self.model_id:
            raise P.APIError(404, f"model {request.path_params['name']!r:.80} does not exist; this server has "
                             f"{self.model_id!r}", param="model", code="model_not_found")
        return JSONResponse(self._model_entry())

    def _model_entry(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edgephi",
                "context_length": self.n_ctx}

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_id, "backend": self.model.backend,
                             "device": self.model.device, **self.pool.status()})

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def _collect(queue: asyncio.Queue) -> list[Step]:
    steps = []
    while True:
        steps.append(await queue.get())
        if steps[-1].last:
            return steps


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---- the app --------------------------------------------------------------------------------------------------------
async def _api_error(request: Request, exc: P.APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = {404: f"no route {request.url.path!r:.100}", 405: f"{request.method} is not allowed here"}.get(
        exc.status_code, str(exc.detail))
    return JSONResponse(P.APIError(exc.status_code, message, code=code).body(), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _disconnect(request: Request, exc: ClientDisconnect) -> Response:
    return Response(status_code=499)


async def _internal(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse(P.APIError(500, "internal server error (see the server log)", type="server_error").body(),
                        status_code=500)


class LocalHostsOnly:
    """ASGI middleware for a server bound to a loopback address: a request whose Host header names another machine
    is refused (a web page that rebinds its own name to 127.0.0.1 cannot reach the model)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
            if not _loopback_name(name):
                error = P.APIError(403, f"Host {host!r:.80} is not this machine: the server listens on a loopback "
                                   "address only", code="forbidden_host")
                await JSONResponse(error.body(), status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _loopback_name(name: str) -> bool:
    from . import is_loopback

    return is_loopback(name) or name.endswith(".localhost")


def create_app(server: Server, loopback: bool = True) -> Starlette:
    """The app; `loopback` (bound to a loopback address) also refuses requests for other host names."""
    routes = [
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{name:path}", server.model, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/", server.page, methods=["GET"]),
        Route("/static/{name}", _static, methods=["GET"]),
    ]
    handlers = {P.APIError: _api_error, HTTPException: _http_error, ClientDisconnect: _disconnect,
                Exception: _internal}
    middleware = [Middleware(LocalHostsOnly)] if loopback else []
    return Starlette(routes=routes, exception_handlers=handlers, middleware=middleware)


async def _static(request: Request) -> Response:
    name = request.path_params["name"]
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise HTTPException(404)
    return FileResponse(path, headers={"Cache-Control": "no-cache"})
