"""The server under hostile or careless clients: body and queue limits, cancellation, bad input,
OpenAI's error shape everywhere, one request's failure kept to itself, /health and /metrics."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
from conftest import live_server

httpx = pytest.importorskip("httpx")

SLOTS, QUEUE, MAX_BODY, MAX_PROMPTS = 2, 2, 4096, 3


@pytest.fixture(scope="module")
def small(tiny_chat_llama):  # (base URL, app, llm): 2 slots, 2 waiting, 4 KiB bodies
    import layercake
    from layercake.server.app import create_app

    llm = layercake.load(tiny_chat_llama)
    app = create_app(
        llm,
        slots=SLOTS,
        max_context=96,
        model_name="tiny",
        max_body=MAX_BODY,
        max_queue=QUEUE,
        max_prompts=MAX_PROMPTS,
    )
    with live_server(app) as url:
        yield url, app, llm


@pytest.fixture
def url(small):
    return small[0]


@pytest.fixture
def slow(small, monkeypatch):
    """Each engine forward takes >= 40 ms, so requests overlap."""
    runner = small[1].state.engine.engine.runner
    forward = runner.forward

    def slowed(*a, **kw):
        time.sleep(0.04)
        return forward(*a, **kw)

    monkeypatch.setattr(runner, "forward", slowed)


def _error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and (code is None or err["code"] == code), err
    return err


def _idle(app, timeout=5.0):
    """Wait until no slot is used and nothing is admitted."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if app.state.engine.slots_in_use == 0 and app.state.admission.used == 0:
            return True
        time.sleep(0.02)
    return False


def test_oversized_body_is_413_before_it_is_read(url):
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "w1 " * 2000, "max_tokens": 1})
    _error(r, 413, code="request_too_large")

    def chunks():  # no Content-Length: the cap applies while it streams in
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"w1 " * 100

    r = httpx.post(f"{url}/v1/completions", content=chunks())
    _error(r, 413, code="request_too_large")
    # a 50 MB body announced but never sent: answered at once from its Content-Length
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 50000000\r\n\r\n{")  # fmt: skip
        assert s.recv(4096).startswith(b"HTTP/1.1 413")


def test_hostile_json_is_400(url):
    deep = b"[" * 4000  # within --max-body
    try:  # Python 3.11's decoder gives up on this depth; 3.12's C limit is deeper than 4000
        json.loads(deep)
    except RecursionError:
        why = "nested too deeply"
    except ValueError:
        why = "not valid JSON"
    r = httpx.post(f"{url}/v1/completions", content=deep)
    assert why in _error(r, 400)["message"]
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "w1 \\ud800", "max_tokens": 1}')
    _error(r, 400, param="prompt")
    body = b'{"messages": [{"role": "user", "content": "\\udfff"}]}'
    _error(httpx.post(f"{url}/v1/chat/completions", content=body), 400, param="messages")
    _error(httpx.post(f"{url}/v1/completions", content=b"\xff\xfe"), 400)
    _error(httpx.post(f"{url}/v1/completions", content=b"[1]"), 400)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"n": 2}, "n"),
        ({"n": True}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "y"}}, "stream_options"),
        ({"stop": [f"w{i}" for i in range(17)]}, "stop"),
        ({"messages": [{"role": "wizard", "content": "w1"}]}, "messages"),
        ({"messages": [{"role": "tool", "content": "w1"}]}, "messages"),
    ],
)
def test_unsupported_or_invalid_fields_are_400(url, body, param):
    body = {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 2, **body}
    _error(httpx.post(f"{url}/v1/chat/completions", json=body), 400, param=param)


def test_neutral_values_of_unsupported_fields_are_accepted(url):
    body = {
        "model": "tiny",
        "messages": [{"role": "developer", "content": "w1"}, {"role": "user", "content": "w2"}],
        "max_tokens": 2,
        "n": 1,
        "logit_bias": {},
        "tools": [],
        "response_format": {"type": "text"},
        "stream": False,
        "stop": ["w5"] * 16,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


def test_unknown_model_is_404_and_served_names_work(url, small):
    body = {"prompt": "w1", "max_tokens": 1}
    r = httpx.post(f"{url}/v1/completions", json={**body, "model": "gpt-4o"})
    _error(r, 404, param="model", code="model_not_found")
    _error(httpx.post(f"{url}/v1/completions", json={**body, "model": {}}), 400, param="model")
    listed = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    for name in (listed, small[2].path.name):
        r = httpx.post(f"{url}/v1/completions", json={**body, "model": name})
        assert r.status_code == 200, r.text


def test_framework_errors_in_openai_shape(url):
    _error(httpx.get(f"{url}/v1/nowhere"), 404)
    _error(httpx.get(f"{url}/v1/completions"), 405)


def test_unexpected_exception_is_500_json_and_server_goes_on(url, monkeypatch):
    import layercake.server.app as app_module

    def boom(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(app_module, "parse_request", boom)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "w1", "max_tokens": 1})
    err = _error(r, 500)
    assert err["type"] == "server_error" and "RuntimeError: boom" in err["message"]
    monkeypatch.undo()
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "w1", "max_tokens": 1})
    assert r.status_code == 200


def test_stream_include_usage_ends_with_a_usage_chunk(url):
    body = {"prompt": "w1 w2", "max_tokens": 4, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


def test_prompt_list_limit(url):
    r = httpx.post(f"{url}/v1/completions", json={"prompt": ["w1"] * 4, "max_tokens": 1})
    _error(r, 400, param="prompt")
    r = httpx.post(f"{url}/v1/completions", json={"prompt": ["w1"] * 3, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_queue_full_is_429_with_retry_after(url, small, slow):
    app = small[1]
    body = {"prompt": "w1 w2", "max_tokens": 12, "temperature": 0}
    with ThreadPoolExecutor(SLOTS + QUEUE) as pool:
        futs = [
            pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=60)
            for _ in range(SLOTS + QUEUE)
        ]
        deadline = time.time() + 10
        while app.state.admission.used < SLOTS + QUEUE and time.time() < deadline:
            time.sleep(0.01)
        r = httpx.post(f"{url}/v1/completions", json=body)
        err = _error(r, 429, code="rate_limit_exceeded")
        assert r.headers["retry-after"] == "1" and "busy" in err["message"]
        assert [f.result().status_code for f in futs] == [200] * (SLOTS + QUEUE)
    assert _idle(app)
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200


def test_abandoned_requests_free_their_slots(url, small, slow):
    app = small[1]
    metrics = app.state.metrics
    before = metrics.generated_tokens
    body = {"prompt": "w1", "max_tokens": 80, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):  # non-streaming: the client gives up
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        next(r.iter_lines())  # streaming: one chunk, then the client leaves
    assert _idle(app, timeout=3)
    assert metrics.generated_tokens - before < 60  # neither ran to its 80 tokens
    assert metrics.requests[("/v1/completions", 499)] >= 1


def test_one_failing_request_does_not_poison_other_streams(url, small, slow, monkeypatch):
    from layercake.sampling import Sampler

    llm = small[2]
    sample = Sampler.sample

    def failing(self, logits):  # the request with seed 4242 fails on its third token
        if any(p.seed == 4242 for p in self.params) and self.n_out >= 2:
            raise RuntimeError("poisoned sampler")
        return sample(self, logits)

    monkeypatch.setattr(Sampler, "sample", failing)
    body = {"prompt": "w3 w4", "max_tokens": 20, "temperature": 0, "stream": True}
    solo = llm.generate("w3 w4", max_new_tokens=20)[0]
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(x for x in lines if x.startswith("data: "))
        bad = {"prompt": "w5", "max_tokens": 20, "temperature": 0.5, "seed": 4242}
        err = _error(httpx.post(f"{url}/v1/completions", json=bad, timeout=60), 500)
        assert "poisoned sampler" in err["message"]
        rest = [x for x in lines if x.startswith("data: ")]
    chunks = [json.loads(x[6:]) for x in [first, *rest[:-1]]]
    assert "error" not in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == solo.text
    assert _idle(small[1])


def test_parsing_runs_off_the_event_loop(url, monkeypatch):
    """While one request's body takes seconds to parse, the server still answers others: the
    answer arrives before the parse ends (an order, not a timing threshold, so a loaded machine
    does not fail it; parsed on the event loop, the answer could only come after)."""
    import layercake.server.app as app_module

    parse = app_module.parse_request
    started, parsed = threading.Event(), threading.Event()

    def slow_parse(*a, **kw):  # a body that takes three seconds to tokenize
        started.set()
        time.sleep(3.0)
        parsed.set()
        return parse(*a, **kw)

    monkeypatch.setattr(app_module, "parse_request", slow_parse)
    body = {"prompt": "w1", "max_tokens": 1}
    t = threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",), kwargs={"json": body})
    t.start()
    assert started.wait(10)
    assert httpx.get(f"{url}/v1/models").status_code == 200
    assert not parsed.is_set()
    t.join()


def test_health_and_metrics(url, small):
    httpx.post(f"{url}/v1/completions", json={"prompt": "w1", "max_tokens": 3})
    h = httpx.get(f"{url}/health")
    assert h.status_code == 200
    assert h.json() == {
        "status": "ok",
        "model": "tiny",
        "slots": SLOTS,
        "slots_in_use": 0,
        "queue_depth": 0,
        "max_queue": QUEUE,
    }
    text = httpx.get(f"{url}/metrics").text
    lines = dict(x.rsplit(" ", 1) for x in text.splitlines() if not x.startswith("#"))
    assert int(lines['layercake_requests_total{endpoint="/v1/completions",status="200"}']) >= 1
    assert int(lines["layercake_generated_tokens_total"]) >= 3
    assert float(lines["layercake_tokens_per_second"]) > 0
    assert lines["layercake_slots"] == str(SLOTS) and lines["layercake_up"] == "1"
    for name in ("layercake_queue_depth", "layercake_slots_in_use"):
        assert f"# TYPE {name} gauge" in text and name in lines
    httpx.get(f"{url}/no/such/{'x' * 50}")  # any path is counted as one label
    text = httpx.get(f"{url}/metrics").text
    assert 'endpoint="other",status="404"' in text and "xxxxx" not in text


def test_slow_body_is_408_and_frees_its_place(url, small, monkeypatch):
    from layercake.server import limits

    monkeypatch.setattr(limits, "BODY_TIMEOUT_S", 0.3)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert s.recv(4096).startswith(b"HTTP/1.1 408")
    assert _idle(small[1], timeout=1)
