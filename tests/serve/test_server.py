"""`pdx serve` as a real process on loopback, driven by the official `openai` client: completions and chat
(plain and streamed), greedy text equal to `ar.generate`'s, stop strings, 429 on overload, a client gone
mid-stream frees its slot, OpenAI error bodies for bad requests, and the server keeps serving."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import openai
import pytest

import pdx
from pdx.decoding import ar

pytestmark = pytest.mark.slow  # a server process and ~30 s: the default suite is at its 15-minute budget

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "checkpoints", "transformer_tiny")
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPT = "def add(a, b):\n    return"


def _http(base: str, method: str, path: str, body: str | None = None) -> tuple[int, str]:
    """(status, body text) of one plain HTTP request (stdlib, so raw and malformed bodies go as written)."""
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The shipped tiny byte-level model with a chat template added."""
    path = tmp_path_factory.mktemp("model") / "tiny"
    shutil.copytree(TINY, path)
    conf = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(conf | {"chat_template": TEMPLATE}))
    return str(path)


@pytest.fixture(scope="module")
def process(model_dir):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdx.cli", "serve", "--model", model_dir, "--model-name", "tiny",
                             "--port", str(port), "--max-batch", "2", "--max-len", "256", "--chunk", "16",
                             "--queue-size", "2", "--no-cache"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if _http(base, "GET", "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
    yield proc, base
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def server(process):
    return process[1]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(model_dir):
    return pdx.load_model(model_dir)


def _greedy_text(model, ids, n):
    row = ar.generate(model, [ids], max_new_tokens=n).row(0)
    return model.tokenizer.decode([t for t in row if t not in model.cfg.eos_token_ids])


def test_completions_equal_pdx_generate_and_streams_concatenate(client, local):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    assert out.choices[0].text == _greedy_text(local, local.tokenizer.encode(PROMPT), 24)
    assert out.usage.completion_tokens == 24 and out.usage.prompt_tokens == len(local.tokenizer.encode(PROMPT))
    assert out.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text and len(chunks) > 2


def test_chat_uses_the_template(client, local):
    messages = [{"role": "user", "content": "def f(x):"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    ids = local.tokenizer.encode(local.tokenizer.apply_chat_template(messages), allow_special=True)
    assert out.choices[0].message.content == _greedy_text(local, ids, 16)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == out.choices[0].message.content


def test_stop_strings_and_sampling_seed(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    stop = full[10:13]
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=1.0, seed=5)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_bad_requests_get_openai_errors(client, server):
    with pytest.raises(openai.BadRequestError, match="exceeds the server's context of 256"):
        client.completions.create(model="tiny", prompt="x" * 300, max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="n"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, n=2)
    for body in ('{"prompt": "x", "bogus": 1}', "{not json", '{"prompt": "x", "max_tokens": 0}',
                 '{"prompt": "x", "temperature": -1}', '{"prompt": "x", "presence_penalty": 0.5}'):
        status, text = _http(server, "POST", "/v1/completions", body)
        assert status == 400 and json.loads(text)["error"]["type"] == "invalid_request_error", (body, text)
    status, text = _http(server, "POST", "/v1/chat/completions", '{"messages": [{"role": "robot", "content": "x"}]}')
    assert status == 400 and "messages" in json.loads(text)["error"]["message"]
    status, text = _http(server, "POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3, "presence_penalty": 0,
         "frequency_penalty": 0, "stream_options": {"include_usage": True}}))
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] <= 3


def test_overload_is_429_and_a_dropped_stream_frees_its_slot(client, server):
    results = []

    def call():
        try:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, temperature=0)
            results.append("ok")
        except openai.RateLimitError:
            results.append(429)

    threads = [threading.Thread(target=call) for _ in range(8)]  # 2 slots + 2 queued: the rest are refused
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(429) >= 1 and results.count("ok") >= 2
    url = urllib.parse.urlparse(server)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/completions", headers={"content-type": "application/json"},
                 body=json.dumps({"prompt": PROMPT, "max_tokens": 220, "temperature": 0, "stream": True}))
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")  # one chunk, then the client goes away
    conn.close()
    for _ in range(100):
        metrics = _http(server, "GET", "/metrics")[1]
        if "pdx_batch_occupancy 0.0" in metrics:
            break
        time.sleep(0.1)
    assert "pdx_batch_occupancy 0.0" in metrics and 'pdx_requests_finished_total{reason="cancelled"}' in metrics
    assert "pdx_time_to_first_token_seconds_count" in metrics
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text


def test_sigterm_finishes_the_stream_in_flight_then_exits(process):
    proc, base = process
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/completions", headers={"content-type": "application/json"},
                 body=json.dumps({"prompt": PROMPT, "max_tokens": 100, "temperature": 0, "stream": True}))
    r = conn.getresponse()
    assert r.readline().startswith(b"data: ")
    proc.terminate()
    rest = r.read().decode()
    assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
