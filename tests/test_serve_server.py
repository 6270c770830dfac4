"""The HTTP server: OpenAI-style completions, SSE streaming, bad input, disconnects, metrics.

The server runs in a thread on a free loopback port over the tiny engine of serve_tiny.py;
httpx drives it; the last test runs `python -m jaxcourse.serve --model DIR`'s main.
"""
import io
import json
import threading
import time

import httpx
import pytest
from absl import logging as absl_logging
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from serve_tiny import CFG, TOK, tiny_engine, tiny_params

from jaxcourse.lm import save_model
from jaxcourse.serve.metrics import ServeMetrics
from jaxcourse.serve.server import ServerThread, make_app

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def served():
    engine = tiny_engine(tiny_params(), ServeMetrics())
    engine.start()
    server = ServerThread(make_app(engine, TOK, "tiny"))
    port = server.start()
    yield engine, f"http://127.0.0.1:{port}"
    server.stop()
    engine.stop()


def _complete(base, **body):
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(base, **body):
    """(concatenated text, finish_reason, raw data lines) of a streamed completion."""
    lines = []
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True},
                      timeout=TIMEOUT) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    return text, chunks[-1]["choices"][0]["finish_reason"], lines


def _metrics(base) -> dict:
    text = httpx.get(f"{base}/metrics", timeout=TIMEOUT).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def test_health_and_metrics(served):
    _, base = served
    assert httpx.get(f"{base}/health").json() == {"status": "ok", "model": "tiny",
                                                  "context": CFG.context, "slots": 3}
    _complete(base, prompt="ab", max_tokens=3)
    m = _metrics(base)
    assert m["jaxcourse_kv_blocks_total"] == 16 and m["jaxcourse_queue_length"] == 0
    assert m["jaxcourse_time_to_first_token_seconds_count"] >= 1
    assert m["jaxcourse_inter_token_latency_seconds_count"] >= 2
    assert m["jaxcourse_generation_tokens_total"] >= 3


def test_stream_equals_the_greedy_completion(served):
    _, base = served
    body = {"prompt": "the cat sat", "max_tokens": 15, "temperature": 0}
    whole = _complete(base, **body)
    assert whole["object"] == "text_completion" and whole["model"] == "tiny"
    assert whole["usage"] == {"prompt_tokens": 11, "completion_tokens": 15, "total_tokens": 26}
    assert whole["choices"][0]["finish_reason"] == "length"
    text, reason, _ = _stream(base, **body)
    assert text == whole["choices"][0]["text"] and len(text) == 15 and reason == "length"
    # A stop string cuts both the same way.
    stop = text[4:6]
    cut = _complete(base, **body, stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[:text.find(stop)]
    assert _stream(base, **body, stop=stop)[:2] == (cut["text"], "stop")


def test_concurrent_clients_get_their_own_completions(served):
    _, base = served
    prompts = ["a", "hello world", "x y z 1 2 3", "one, two.", "q" * 20, "zebra"]
    want = [_complete(base, prompt=p, max_tokens=8, temperature=0)["choices"][0]["text"]
            for p in prompts]
    got = [None] * len(prompts)

    def client(i):
        if i % 2:
            got[i] = _stream(base, prompt=prompts[i], max_tokens=8, temperature=0)[0]
        else:
            got[i] = _complete(base, prompt=prompts[i], max_tokens=8,
                               temperature=0)["choices"][0]["text"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert got == want


@pytest.mark.parametrize("body,status,reason", [
    (b"{not json", 400, "not JSON"),
    (b'{"prompt": "ab", "bogus": 1}', 400, "unknown field 'bogus'"),
    (b'{"max_tokens": 3}', 400, "missing field 'prompt'"),
    (b'{"prompt": "ab", "max_tokens": 0}', 400, "max_tokens must be >= 1"),
    (b'{"prompt": "ab", "max_tokens": -2}', 400, "max_tokens must be >= 1"),
    (b'{"prompt": "ab", "max_tokens": "3"}', 400, "field 'max_tokens'"),
    (('{"prompt": "%s"}' % ("a" * 40)).encode(), 400, "leaves no room"),
    (b'{"prompt": "ABC"}', 400, "not in the tokenizer"),
    (b'{"prompt": "ab", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "ab", "model": "gpt-4"}', 404, "not served here"),
])
def test_bad_input_is_a_4xx_and_harms_no_one(served, body, status, reason):
    _, base = served
    result = {}
    other = threading.Thread(target=lambda: result.update(
        t=_stream(base, prompt="abc", max_tokens=20, temperature=0)[0]))
    other.start()
    r = httpx.post(f"{base}/v1/completions", content=body, timeout=TIMEOUT,
                   headers={"content-type": "application/json"})
    other.join(TIMEOUT)
    assert r.status_code == status
    message = r.json()["error"]["message"]
    assert reason in message and "\n" not in message
    assert len(result["t"]) == 20  # the request beside it finished whole


def test_a_client_that_leaves_frees_its_slot(served, monkeypatch):
    engine, base = served
    fast = engine.step_fn

    def slow_step(*args):  # long enough that the request is still running when it leaves
        time.sleep(0.05)
        return fast(*args)

    monkeypatch.setattr(engine, "step_fn", slow_step)
    before = _metrics(base).get("jaxcourse_requests_total{status=cancelled}", 0)
    with httpx.stream("POST", f"{base}/v1/completions", timeout=TIMEOUT,
                      json={"prompt": "abc", "max_tokens": 25, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = _metrics(base)
        if m.get("jaxcourse_requests_total{status=cancelled}", 0) > before:
            break
        time.sleep(0.05)
    assert m["jaxcourse_requests_total{status=cancelled}"] == before + 1
    assert m["jaxcourse_kv_blocks_in_use"] == 0 and m["jaxcourse_running_requests"] == 0
    assert engine.allocator.in_use == 0
    assert _complete(base, prompt="ab", max_tokens=2)["usage"]["completion_tokens"] == 2


def test_a_server_thread_leaves_the_process_logging_alone():
    """uvicorn's default log config (logging.config.dictConfig) closes every handler, and
    absl's handler then closes its stream: under pytest that was the capture's file, and
    every later test in the worker failed with "I/O operation on closed file"."""
    stream = io.StringIO()
    handler = absl_logging.PythonHandler(stream)  # noqa: F841 (alive while the server runs)
    server = ServerThread(FastAPI())
    server.start()
    server.stop()
    assert not stream.closed


def test_python_m_jaxcourse_serve_main_serves_a_saved_model(tmp_path, monkeypatch, capsys):
    """`python -m jaxcourse.serve --model DIR` in this process: argument parsing, loading the
    saved model, warm-up; uvicorn.run is swapped for a server thread that answers one
    request (a real subprocess costs a second jax start and compile, ~10 s of CPU)."""
    from jaxcourse.serve import __main__ as serve_main
    from jaxcourse.serve import server

    (tmp_path / "model").mkdir()
    save_model(tmp_path / "model", CFG, tiny_params(), TOK)
    seen = {}

    def run_server(engine, tokenizer, name, host, port):
        assert (host, port) == ("127.0.0.1", 8123)
        engine.start()
        thread = ServerThread(make_app(engine, tokenizer, name))
        base = f"http://127.0.0.1:{thread.start()}"
        try:
            seen.update(_complete(base, prompt="hi", max_tokens=5, temperature=0))
        finally:
            thread.stop()
            engine.stop()

    monkeypatch.setattr(server, "run_server", run_server)
    serve_main.main(["--model", str(tmp_path / "model"), "--port", "8123", "--slots", "3",
                     "--block-size", "4", "--num-blocks", "17", "--buckets", "8,32", "--no-cache"])
    assert len(seen["choices"][0]["text"]) == 5 and seen["model"] == "model"
    assert "on http://127.0.0.1:8123" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # a missing model: one line, exit 1
        serve_main.main(["--model", str(tmp_path / "nothing"), "--no-cache"])
    assert e.value.code == 1 and "model.json missing" in capsys.readouterr().err


def test_jaxcourse_serve_is_the_console_command(capsys):
    from jaxcourse import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0 and "python -m jaxcourse.serve" in capsys.readouterr().out
