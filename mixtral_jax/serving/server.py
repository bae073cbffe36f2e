"""`mixtral-jax serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on the engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events when
`stream` is true), GET /v1/models and /v1/models/{name}, GET /health (503 until every program is
compiled, then 200), GET /metrics (Prometheus text). Each HTTP request becomes `n` engine requests
(a completion request with a batch of prompts, `n` per prompt, its choices indexed prompt by prompt
as OpenAI's are); their events reach the asyncio loop through `loop.call_soon_threadsafe` (no
polling). A streaming client that goes away has its requests cancelled, which frees their slots
before the engine's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Event, QueueFull
from .protocol import (APIError, Parsed, chat_logprobs, completion_logprobs, invalid, new_id, now, parse,
                       unknown_model, usage)

log = logging.getLogger(__name__)

# Histogram buckets (seconds) for token latencies and whole requests.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
DISCONNECT_POLL_S = 0.25


class Metrics:
    """vLLM's serving metrics under mixtral_jax_* names, in a registry of this server's own."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        counts = engine.counts
        Gauge("mixtral_jax_requests_running", "Requests in a slot (prefilling or decoding)", registry=r) \
            .set_function(lambda: counts()["running"])
        Gauge("mixtral_jax_requests_waiting", "Requests waiting for a slot", registry=r) \
            .set_function(lambda: counts()["waiting"])
        Gauge("mixtral_jax_slots_used", "Decode slots in use", registry=r).set_function(lambda: counts()["slots_used"])
        self.ttft = Histogram("mixtral_jax_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mixtral_jax_inter_token_latency_seconds", "Time between tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("mixtral_jax_e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("mixtral_jax_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter("mixtral_jax_generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("mixtral_jax_requests", "Finished requests", ["finish_reason"], registry=r)
        self.compilations = Counter("mixtral_jax_compilations", "XLA compilations since start", registry=r)

    def count_compilations(self) -> None:
        """Count every XLA backend compile from now on (jax.monitoring)."""
        import jax.monitoring

        def on_event(name, *_args, **_kwargs):
            if name == "/jax/core/compile/backend_compile_duration":
                self.compilations.inc()
        jax.monitoring.register_event_duration_secs_listener(on_event)


class Choice:
    """One engine request's results as events arrive (asyncio side)."""

    def __init__(self, index: int, prompt: list[int]):
        self.index, self.prompt = index, prompt
        self.request = None
        self.text, self.tokens, self.logprobs, self.tops, self.offsets, self.routing = "", [], [], [], [], []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.last_token_at: float | None = None


class Run:
    """The n engine requests of one HTTP request, and their events in arrival order."""

    def __init__(self, server: "Server", parsed: Parsed):
        self.server, self.parsed = server, parsed
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice(i, prompt) for i, prompt in enumerate(parsed.choice_prompts())]
        self.started = time.perf_counter()

    def submit(self) -> None:
        """Submit every choice; on a full queue cancel those already in and raise 429. A request
        with more choices than the queue holds could never be admitted: 400, not a 429 that
        clients would retry."""
        limit = self.server.engine.max_queue
        if len(self.choices) > limit:
            raise invalid(f"n x prompts = {len(self.choices)} completions exceed what the server queues at once "
                          f"(--max-queue {limit})", "n")
        try:
            for c, opts in zip(self.choices, self.parsed.options):
                c.request = self.server.engine.submit(c.prompt, opts, self._on_event(c))
        except QueueFull as e:
            self.cancel()
            raise APIError(429, str(e), code="queue_full", kind="rate_limit_error") from None
        except ValueError as e:
            self.cancel()
            raise invalid(str(e)) from None
        self.server.metrics.prompt_tokens.inc(sum(len(c.prompt) for c in self.choices))

    def _on_event(self, c: Choice):
        return lambda event: self.loop.call_soon_threadsafe(self.queue.put_nowait, (c, event))

    def cancel(self) -> None:
        for c in self.choices:
            if c.request is not None and c.finish_reason is None:
                self.server.engine.cancel(c.request)

    def record(self, c: Choice, e: Event) -> None:
        """Fold one event into its choice and the metrics."""
        m, t = self.server.metrics, time.perf_counter()
        if e.token is not None:
            m.generation_tokens.inc()
            if c.last_token_at is None:
                m.ttft.observe(t - self.started)
            else:
                m.itl.observe(t - c.last_token_at)
            c.last_token_at = t
            c.offsets.append(len(c.text))
            c.tokens.append(e.token)
            c.logprobs.append(e.logprob)
            c.tops.append(e.top_logprobs)
            c.routing.append(e.routing)
        c.text += e.text
        if e.finish_reason is not None:
            c.finish_reason, c.error = e.finish_reason, e.error
            m.e2e.observe(t - self.started)
            m.requests.labels(finish_reason=e.finish_reason).inc()

    def pending(self) -> bool:
        return any(c.finish_reason is None for c in self.choices)

    def usage(self) -> dict:
        """OpenAI's usage: each prompt counted once, whatever its n."""
        return usage(sum(len(p) for p in self.parsed.prompts), sum(len(c.tokens) for c in self.choices))


class ApiKey:
    """ASGI middleware: /v1/ requests without `Authorization: <expected>` get OpenAI's 401. Plain
    ASGI, not Starlette's BaseHTTPMiddleware, which would pass every streamed chunk through a
    memory stream of its own."""

    def __init__(self, app, expected: bytes):
        self.app, self.expected = app, expected

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                e = APIError(401, "missing or incorrect API key (send `Authorization: Bearer <key>`)",
                             code="invalid_api_key")
                return await JSONResponse(e.body(), status_code=e.status)(scope, receive, send)
        return await self.app(scope, receive, send)


class Server:
    """The FastAPI app over an engine (`app`), with its metrics.

    Args:
      engine: an Engine, started or not (`/health` says 503 until `engine.ready`).
      model_name: the name clients must send as `model`.
      api_key: when given, every /v1/ request must carry `Authorization: Bearer <api_key>` (the
        openai client's `api_key`), else 401; /health and /metrics stay open, for probes and scrapers.
    """

    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None):
        self.engine, self.model_name = engine, model_name
        self.metrics = Metrics(engine)
        self.defaults = engine.model.generation_config_kwargs()
        tok = engine.model.tokenizer
        app = self.app = FastAPI(title="mixtral_jax", docs_url=None, redoc_url=None)

        if api_key:
            app.add_middleware(ApiKey, expected=f"Bearer {api_key}".encode())

        @app.exception_handler(APIError)
        async def api_error(_request, e: APIError):
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(RequestValidationError)
        async def validation_error(_request, e):
            return JSONResponse(invalid(str(e)).body(), status_code=400)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_request, e: StarletteHTTPException):  # an unknown route or method
            return JSONResponse(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404
                                         else None).body(), status_code=e.status_code)

        @app.get("/health")
        async def health():
            return Response(status_code=200 if engine.ready else 503)

        @app.get("/metrics")
        async def metrics():
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return PlainTextResponse(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        def model_card() -> dict:
            return {"id": model_name, "object": "model", "created": now(), "owned_by": "mixtral_jax"}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [model_card()]}

        @app.get("/v1/models/{model:path}")
        async def model(model: str):
            if model != model_name:
                raise unknown_model(model, model_name)
            return model_card()

        async def handle(request: Request, kind: str):
            if not engine.ready:
                raise APIError(503, "the server is warming up (compiling); retry when /health says 200",
                               code="warming_up", kind="service_unavailable")
            if tok is None:
                raise APIError(400, "this checkpoint has no tokenizer", code="no_tokenizer")
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise invalid(f"the request body is not valid JSON ({e})") from None
            parsed = parse(body, kind, model_name=model_name, tokenizer=tok, max_seq_len=engine.max_seq_len,
                           defaults=self.defaults)
            run = Run(self, parsed)
            run.submit()
            if parsed.stream:
                return StreamingResponse(self._stream(run), media_type="text/event-stream")
            return JSONResponse(await self._complete(run, request))

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await handle(request, "completion")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await handle(request, "chat")

    # ---- non-streamed ----

    async def _complete(self, run: Run, request) -> dict:
        try:
            while run.pending():
                try:
                    c, e = await asyncio.wait_for(run.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        run.cancel()
                        return {}
                    continue
                run.record(c, e)
        finally:
            run.cancel()
        failed = next((c for c in run.choices if c.finish_reason == "error"), None)
        if failed is not None:
            raise APIError(500, f"generation failed: {failed.error}", code="engine_error", kind="server_error")
        p = run.parsed
        out = {"id": new_id(p.kind), "created": now(), "model": p.model,
               "choices": [self._choice(p, c) for c in run.choices],
               "usage": run.usage()}
        out["object"] = "text_completion" if p.kind == "completion" else "chat.completion"
        return out

    def _choice(self, p: Parsed, c: Choice) -> dict:
        tok = self.engine.model.tokenizer
        if p.kind == "completion":
            lp = None if p.logprobs is None else completion_logprobs(tok, c.tokens, c.logprobs, c.tops, c.offsets,
                                                                     p.logprobs)
            text = (tok.decode(c.prompt) if p.echo else "") + c.text
            choice = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}
        else:
            lp = None if p.logprobs is None else chat_logprobs(tok, c.tokens, c.logprobs, c.tops, p.logprobs)
            choice = {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                      "finish_reason": c.finish_reason}
        if p.return_routing:
            choice["routing"] = c.routing
        return choice

    # ---- streamed ----

    async def _stream(self, run: Run):
        p = run.parsed
        rid, created = new_id(p.kind), now()
        obj = "text_completion" if p.kind == "completion" else "chat.completion.chunk"
        tok = self.engine.model.tokenizer

        def chunk(choices: list, **extra) -> str:
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": p.model,
                                          "choices": choices, **extra}) + "\n\n"

        def piece(c: Choice, text: str, new_tokens: int, finish: str | None) -> dict:
            start = len(c.tokens) - new_tokens
            if p.kind == "completion":
                lp = None if p.logprobs is None else completion_logprobs(
                    tok, c.tokens[start:], c.logprobs[start:], c.tops[start:], c.offsets[start:], p.logprobs)
                out = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}
            else:
                lp = None if p.logprobs is None else chat_logprobs(tok, c.tokens[start:], c.logprobs[start:],
                                                                   c.tops[start:], p.logprobs)
                out = {"index": c.index, "delta": {"content": text} if text or finish is None else {},
                       "logprobs": lp, "finish_reason": finish}
            if p.return_routing:
                out["routing"] = c.routing[start:]
            return out

        try:
            if p.kind == "chat":
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for c in run.choices])
            elif p.echo:
                yield chunk([{"index": c.index, "text": tok.decode(c.prompt), "logprobs": None, "finish_reason": None}
                             for c in run.choices])
            while run.pending():
                c, e = await run.queue.get()
                run.record(c, e)
                if e.finish_reason == "error":
                    yield "data: " + json.dumps(APIError(500, f"generation failed: {e.error}", code="engine_error",
                                                         kind="server_error").body()) + "\n\n"
                    break
                new_tokens = 0 if e.token is None else 1
                if e.finish_reason is not None or e.text or (new_tokens and (p.logprobs is not None or p.return_routing)):
                    yield chunk([piece(c, e.text, new_tokens, e.finish_reason)])
            if p.include_usage:
                yield chunk([], usage=run.usage())
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away: free the slots
            run.cancel()


def serve(engine: Engine, model_name: str, host: str, port: int, api_key: str | None = None) -> None:
    """Start the engine (compiling in the background; /health is 503 meanwhile) and serve until
    SIGTERM or SIGINT; then stop the engine (and, multi-host, its followers) and return."""
    import contextlib
    import signal

    import uvicorn

    server = Server(engine, model_name, api_key)
    server.metrics.count_compilations()
    threading.Thread(target=engine.start, name="mixtral-jax-warm-up", daemon=True).start()
    log.info("serving %s on http://%s:%d", model_name, host, port)
    http = uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level="warning"))
    # uvicorn re-raises the signal that stopped it once it is done, which would end this process
    # before the engine (and a multi-host run's other processes) are told to stop.
    http.capture_signals = contextlib.nullcontext

    def stop(*_):
        http.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    http.run()
    engine.shutdown()
