"""The OpenAI-compatible HTTP front of the serving engine (FastAPI on uvicorn).

`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (the model's chat template),
`stream: true` as server-sent events in OpenAI's chunk format, `GET /health`, `GET /metrics`
(Prometheus text). Errors come back as OpenAI error bodies: 400 for a request the server cannot run
(bad fields, over-long prompt), 429 when the queue is full, 503 while shutting down. The engine steps in
its own thread; each request waits on an asyncio queue the engine feeds, and a client that goes away
cancels its request, which frees its slot before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from pdx.errors import PdxError
from pdx.serve import metrics as serve_metrics
from pdx.serve.engine import FINISH_CANCELLED, Engine, QueueFull
from pdx.serve.engine import Request as EngineRequest

MAX_STOPS = 4  # OpenAI's limit on stop strings


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict | None = None  # the last chunk always carries usage
    user: str | None = None
    presence_penalty: Literal[0] = 0  # accepted at their neutral value only (clients send the defaults)
    frequency_penalty: Literal[0] = 0


class CompletionBody(_Body):
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The app serving `engine` under the model id `model_name`; the engine thread runs while the app does."""
    tokenizer = engine.model.tokenizer
    stats = serve_metrics.Metrics(engine)
    stop_engine = threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=engine.run, args=(stop_engine,), name="pdx-engine", daemon=True)
        thread.start()
        yield
        stop_engine.set()  # in-flight requests finish as cancelled; their streams end cleanly
        thread.join(timeout=30)

    app = FastAPI(title="pdx", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(_req, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error", where)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(stats.render(), media_type=serve_metrics.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "pdx"}]}

    def engine_request(body: _Body, prompt: list[int], feed) -> EngineRequest:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise PdxError(f"stop takes at most {MAX_STOPS} non-empty strings")
        limit = body.max_tokens or getattr(body, "max_completion_tokens", None)
        return EngineRequest(prompt=prompt, max_tokens=limit or max(1, engine.max_len - len(prompt)),
                             emit=feed, temperature=body.temperature, top_p=body.top_p,
                             seed=body.seed if body.seed is not None else int(uuid.uuid4().int % (1 << 31)),
                             stop_ids=frozenset(engine.model.cfg.eos_token_ids), stop_strings=tuple(stops))

    async def run(http: Request, body: _Body, prompt: list[int], chat: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def feed(text, tok, finish):  # engine thread -> this request's event loop
            loop.call_soon_threadsafe(queue.put_nowait, (text, finish))

        try:
            req = engine_request(body, prompt, feed)
            engine.submit(req)
        except QueueFull as e:
            stats.rejected.inc()
            return _error(429, str(e), "rate_limit_error")
        except PdxError as e:
            return _error(400, str(e), "invalid_request_error")
        if stop_engine.is_set():
            req.cancel()
            return _error(503, "the server is shutting down", "server_error")
        stats.requests.labels("chat" if chat else "completions").inc()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created, kind = int(time.time()), "chat.completion" if chat else "text_completion"

        def usage():
            return {"prompt_tokens": len(prompt), "completion_tokens": len(req.tokens),
                    "total_tokens": len(prompt) + len(req.tokens)}

        def choice(text, finish, delta: bool):
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            content = {"role": "assistant", "content": text}
            return {"index": 0, ("delta" if delta else "message"): content, "logprobs": None, "finish_reason": finish}

        def finish_reason(finish):
            return None if finish == FINISH_CANCELLED else finish

        if body.stream:
            async def events():
                try:
                    while True:
                        text, finish = await queue.get()
                        if text or finish:
                            chunk = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                                     "model": model_name, "choices": [choice(text, finish_reason(finish), True)]}
                            if finish:
                                chunk["usage"] = usage()
                            yield f"data: {json.dumps(chunk)}\n\n"
                        if finish:
                            break
                    yield "data: [DONE]\n\n"
                finally:
                    req.cancel()  # a client gone mid-stream frees its slot; a no-op once finished

            return StreamingResponse(events(), media_type="text/event-stream")

        parts = []
        try:
            while True:
                try:
                    text, finish = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await http.is_disconnected():
                        return _error(499, "client closed the request", "invalid_request_error")
                    continue
                parts.append(text)
                if finish:
                    break
        finally:
            req.cancel()
        if finish == FINISH_CANCELLED:
            return _error(503, "the server shut down before the request finished", "server_error")
        return {"id": rid, "object": kind, "created": created, "model": model_name,
                "choices": [choice("".join(parts), finish, False)], "usage": usage()}

    @app.post("/v1/completions")
    async def completions(http: Request, body: CompletionBody):
        if isinstance(body.prompt, str):
            if tokenizer is None:
                return _error(400, "this model has no tokenizer: send the prompt as token ids", "invalid_request_error",
                              "prompt")
            prompt = tokenizer.encode(body.prompt)
        else:
            prompt = list(body.prompt)
        return await run(http, body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(http: Request, body: ChatBody):
        if tokenizer is None:
            return _error(400, "this model has no tokenizer", "invalid_request_error")
        try:
            text = tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
        except PdxError as e:
            return _error(400, str(e), "invalid_request_error", "messages")
        return await run(http, body, tokenizer.encode(text, allow_special=True), chat=True)

    return app
