"""`edgephi serve` driven through the official openai client and raw HTTP, on 127.0.0.1 only: answers equal to
`edgephi run`, structured output and forced tool calls that validate (trained and random models), concurrency,
prefix reuse, cancellation, limits, auth and malformed requests."""
from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from serve_helpers import client, phi4_tool_checkpoint, running  # noqa: E402

EDGEPHI = [sys.executable, "-m", "edgephi.cli"]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                     "b": {"type": "integer", "minimum": -99, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
QUESTION = "Write a function that returns the sum of a list."


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgephi.export.bundle import export_bundle

    out, _ = export_bundle("default", tmp_path_factory.mktemp("serve") / "default", formats=("onnx",), bits=4)
    return out


@pytest.fixture(scope="module")
def phi4_bundle(tiny_checkpoint, tmp_path_factory):
    """A random-weight Phi-4-mini with Phi-4-mini's tool tokens and chat template."""
    from edgephi.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("phi4tools")
    ckpt = phi4_tool_checkpoint(tiny_checkpoint("phi-4-mini"), root / "ckpt")
    out, _ = export_bundle(str(ckpt), root / "bundle", formats=("onnx",), bits=4)
    return out


@pytest.fixture(scope="module")
def server(bundle):
    with running(bundle, parallel=2) as (url, srv):
        yield url, srv


@pytest.fixture(scope="module")
def api(server):
    return client(server[0])


def _health(url: str) -> dict:
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=10)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def _post(url: str, path: str, body, headers=None) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    assert b"Traceback" not in raw
    return r.status, json.loads(raw) if raw else {}, dict(r.getheaders())


def _chat(api, content: str, **kw):
    return api.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], **kw)


def _streamed(api, **kw) -> tuple[str, str, object, list]:
    text, finish, usage, chunks = "", None, None, []
    for chunk in api.chat.completions.create(model="m", stream=True, **kw):
        chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish, usage, chunks


# ---- answers ------------------------------------------------------------------------------------------------------
def test_chat_plain_and_streamed_equal_edgephi_run(bundle, api):
    run = subprocess.run(EDGEPHI + ["run", str(bundle), "-p", QUESTION, "--max-tokens", "24"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    expected = run.stdout[:-1]  # run ends the answer with a newline
    r = _chat(api, QUESTION, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 24
    assert r.object == "chat.completion" and r.model == "default-model"
    text, finish, usage, chunks = _streamed(api, messages=[{"role": "user", "content": QUESTION}], max_tokens=24,
                                            temperature=0, stream_options={"include_usage": True})
    assert text == expected and finish == "length"
    assert usage.completion_tokens == 24 and usage.prompt_tokens == r.usage.prompt_tokens
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices == []


def test_completions_equal_the_python_api(bundle, api):
    import edgephi

    model = edgephi.load(bundle)
    expected = model.generate("def fibonacci(n):", max_tokens=20)
    model.close()
    r = api.completions.create(model="m", prompt="def fibonacci(n):", max_tokens=20, temperature=0)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 20
    parts = [c.choices[0].text for c in api.completions.create(model="m", prompt="def fibonacci(n):", max_tokens=20,
                                                                temperature=0, stream=True) if c.choices]
    assert "".join(parts) == expected
    ends = api.completions.create(model="m", prompt="import os\n", max_tokens=30, temperature=0)
    assert ends.choices[0].finish_reason == "stop" and ends.usage.completion_tokens < 30  # the premise
    held = api.completions.create(model="m", prompt="import os\n", max_tokens=30, temperature=0,
                                  extra_body={"min_tokens": 30})  # vLLM's field: the stop tokens are held back
    assert held.choices[0].finish_reason == "length" and held.usage.completion_tokens == 30
    assert held.choices[0].text.startswith(ends.choices[0].text)
    msgs = [{"role": "user", "content": "import os"}]  # chat too: min_tokens without a grammar is no conflict
    chat = api.chat.completions.create(model="m", messages=msgs, max_tokens=30, temperature=0,
                                       extra_body={"min_tokens": 30})
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 30


def test_follow_up_turn_evaluates_only_its_new_tokens(server, api):
    url, srv = server
    msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list of names."}]
    first = api.chat.completions.create(model="m", messages=msgs, max_tokens=20, temperature=0)
    _chat(api, "Something else entirely, to take the other session.", max_tokens=4, temperature=0)
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "Now in reverse."}]
    second = api.chat.completions.create(model="m", messages=msgs, max_tokens=5, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    tail = srv.tokenizer.encode("<|end|>\n<|user|>\nNow in reverse.<|end|>\n<|assistant|>\n")
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert second.usage.prompt_tokens - cached <= len(tail) + 1


def test_stop_seed_penalties_and_logprobs(api):
    free = _chat(api, QUESTION, max_tokens=40, temperature=0).choices[0].message.content
    # a stop string that begins inside a token the answer reaches after some text: nothing of it is sent
    word = next(w for w in free.split()[2:] if len(w) >= 4)[1:]
    stopped = _chat(api, QUESTION, max_tokens=40, temperature=0, stop=[word])
    assert stopped.choices[0].message.content == free[:free.index(word)]
    assert stopped.choices[0].finish_reason == "stop"
    a, b = (_chat(api, QUESTION, max_tokens=16, temperature=1.0, seed=7).choices[0].message.content for _ in "ab")
    assert a == b
    plain = _chat(api, QUESTION, max_tokens=30, temperature=0).choices[0].message.content
    penalised = _chat(api, QUESTION, max_tokens=30, temperature=0, presence_penalty=2.0,
                      frequency_penalty=1.0).choices[0].message.content
    common = max(set(plain.split()), key=lambda w: (plain.split().count(w), w))  # what plain decoding repeats
    assert penalised != plain and penalised.count(common) < plain.count(common)
    r = _chat(api, QUESTION, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 6 and "".join(e.token for e in entries) == r.choices[0].message.content
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy: the top
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert bytes(e.bytes).decode() == e.token
    c = api.completions.create(model="m", prompt="import os\n", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == 5 and all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


# ---- structured output and tools ----------------------------------------------------------------------------------
def _check_structured(api, content: str):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = _chat(api, content, max_tokens=120, temperature=0, response_format=fmt)
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    assert r.choices[0].finish_reason == "stop"
    text, finish, _, _ = _streamed(api, messages=[{"role": "user", "content": content}], max_tokens=120,
                                   temperature=0.9, seed=3, response_format=fmt)
    jsonschema.validate(json.loads(text), PERSON)
    obj = _chat(api, content, max_tokens=200, temperature=0, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":  # an open-ended object may run to max_tokens
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:
        assert obj.choices[0].message.content.startswith("{")


def _check_forced_tools(api, content: str, fmt_name: str):
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = _chat(api, content, max_tokens=300, temperature=0, tools=[WEATHER, ADD], tool_choice=choice)  # room
        # for MAX_PARALLEL_CALLS calls: a small model may repeat calls until the grammar's cap closes the list
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content is None and msg.tool_calls, fmt_name
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
        for call in msg.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        if choice != "required":
            assert [c.function.name for c in msg.tool_calls] == ["get_weather"]
    # streamed, then the result sent back (an assistant message with tool_calls and null content, a tool message)
    calls = {}
    for chunk in api.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], stream=True,
                                             max_tokens=300, temperature=0, tools=[ADD], tool_choice="required"):
        for c in chunk.choices:
            for tc in c.delta.tool_calls or ():
                calls[tc.index] = tc
            finish = c.finish_reason or None
    assert finish == "tool_calls" and calls
    call = calls[0]
    jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])
    follow = api.chat.completions.create(model="m", max_tokens=8, temperature=0, tools=[ADD], messages=[
        {"role": "user", "content": content},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "add", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "42"}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_json_schema_and_forced_tool_calls_on_the_built_in_model(api):
    _check_structured(api, "Describe a person as JSON.")
    _check_forced_tools(api, "What is the weather in Paris?", "generic")


def test_json_schema_and_phi4_tool_calls_on_a_random_model(phi4_bundle):
    from edgephi.serve.tools import PHI4, render_messages, tool_format

    with running(phi4_bundle) as (url, srv):
        assert tool_format(srv.tokenizer) is PHI4 and srv.tool_role
        api = client(url)
        _check_structured(api, "Describe a person as JSON.")
        _check_forced_tools(api, "What is the weather in Paris?", "phi-4-mini")
        tools = __import__("edgephi.serve.tools", fromlist=["parse_tools"]).parse_tools(
            {"tools": [ADD], "tool_choice": "auto"})
        text = srv.tokenizer.apply_chat_template(
            render_messages([{"role": "user", "content": "hi"}], tools, PHI4, True), add_generation_prompt=True,
            tokenize=False)
        assert text.startswith("<|system|>You are a helpful assistant with some tools.<|tool|>[{\"name\": \"add\"")
        assert "<|/tool|><|end|><|user|>hi<|end|><|assistant|>" in text


def test_python_api_and_run_take_a_json_schema(bundle, tmp_path):
    import edgephi

    model = edgephi.load(bundle)
    jsonschema.validate(json.loads(model.generate("{", max_tokens=80, json_schema=PERSON)), PERSON)
    jsonschema.validate(json.loads("".join(r.text for r in model.chat("A person:", json_schema=PERSON,
                                                                      max_tokens=80))), PERSON)
    with pytest.raises(ValueError, match="grammar"):
        model.generate("x", json_schema={"type": "nonsense"})
    model.close()
    (tmp_path / "s.json").write_text(json.dumps(PERSON))
    run = subprocess.run(EDGEPHI + ["run", str(bundle), "-p", "A person:", "--json-schema", str(tmp_path / "s.json"),
                                    "--max-tokens", "80"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    jsonschema.validate(json.loads(run.stdout), PERSON)


def test_tool_calls_are_parsed_from_free_answers():
    """tool_choice auto: an answer that starts with the call marker becomes tool_calls, streamed or whole; other
    answers stream as they come."""
    from edgephi.serve.output import ChatOutput
    from edgephi.serve.pool import Step
    from edgephi.serve.tools import GENERIC, parse_tools

    tools = parse_tools({"tools": [ADD]})
    pieces = [" <tool", "_call>[{\"name\": \"add\", ", "\"arguments\": {\"a\": 1, \"b\": 2}}]</tool_call>"]
    steps = [Step(text=p, raw=p, token=1) for p in pieces] + [Step(finish="stop", completion_tokens=3)]
    whole = ChatOutput("m", None, tools=tools, fmt=GENERIC).whole(steps)
    call = whole["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call == {"name": "add", "arguments": '{"a": 1, "b": 2}'} and whole["choices"][0]["finish_reason"] == \
        "tool_calls"
    out = ChatOutput("m", None, tools=tools, fmt=GENERIC)
    chunks = [c for st in steps for c in out.chunks([st])]
    assert not any(c["choices"][0]["delta"].get("content") for c in chunks)  # nothing leaks as content
    assert chunks[-2]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "add"
    plain = ChatOutput("m", None, tools=tools, fmt=GENERIC)
    got = [plain.chunks([Step(text=t, raw=t, token=1)]) for t in ("<to", "o much", "!")]
    assert got[0][1:] == [] and got[1][-1]["choices"][0]["delta"]["content"] == "<too much"


# ---- concurrency ---------------------------------------------------------------------------------------------------
def test_parallel_requests_equal_sequential_ones(api):
    prompts = [f"Write a function named f{k} that parses a date." for k in range(5)]
    alone = [_chat(api, p, max_tokens=24, temperature=0).choices[0].message.content for p in prompts]
    with cf.ThreadPoolExecutor(5) as pool:  # 2 sessions, 3 requests wait in the queue
        together = list(pool.map(lambda p: _chat(api, p, max_tokens=24, temperature=0).choices[0].message.content,
                                 prompts, timeout=120))
    assert together == alone


def _open_stream(url: str, body: dict) -> socket.socket:
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def _wait_idle(url: str, seconds: float = 10.0) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        h = _health(url)
        if h["busy"] == 0 and h["queued"] == 0:
            return h
        time.sleep(0.02)
    raise AssertionError(f"sessions still busy after {seconds} s: {h}")


def test_a_client_that_disconnects_frees_its_session(bundle):
    with running(bundle, parallel=1, max_queue=0) as (url, srv):
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1900, "temperature": 0}
        for stream in (True, False):
            before = _health(url)["cancelled"]
            sock = _open_stream(url, {**body, "stream": stream})
            if stream:
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the answer is under way
            else:
                time.sleep(0.05)
            busy = _post(url, "/v1/chat/completions", {**body, "max_tokens": 2})  # one session, no queue
            assert busy[0] == 503 and busy[1]["error"]["code"] == "server_busy" and busy[2]["retry-after"] == "1"
            sock.close()
            h = _wait_idle(url)
            assert h["cancelled"] == before + 1 and h["cached_tokens"][0] < 1000  # stopped long before the end
        r = _chat(client(url), QUESTION, max_tokens=3, temperature=0)  # and the session serves again
        assert r.usage.completion_tokens == 3


# ---- safety -------------------------------------------------------------------------------------------------------
def test_api_key_limits_and_malformed_requests(bundle):
    with running(bundle, api_key="s3cret", ctx=128, max_body=4096) as (url, srv):
        with pytest.raises(openai.AuthenticationError):
            _chat(client(url), "hi", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            _chat(client(url, "wrong"), "hi", max_tokens=2)
        status, body, headers = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert status == 401 and body["error"]["code"] == "invalid_api_key" and set(body["error"]) == {
            "message", "type", "param", "code"}
        api = client(url, "s3cret")
        assert [m.id for m in api.models.list().data] == ["default-model"]
        huge = _chat(api, QUESTION, max_tokens=10 ** 9, temperature=0)  # clamped to the context
        assert huge.choices[0].finish_reason == "length"
        assert huge.usage.prompt_tokens + huge.usage.completion_tokens <= 128
        auth = {"Authorization": "Bearer s3cret"}
        ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        bad = [
            (b"{not json", None), (b"[1, 2]", None), ({"messages": []}, "messages"),
            ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
            ({"messages": [{"role": "user"}]}, "messages[0].content"),
            ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
            ({**ok, "temperature": "hot"}, "temperature"), ({**ok, "temperature": 9}, "temperature"),
            ({**ok, "max_tokens": 0}, "max_tokens"), ({**ok, "n": 2}, "n"), ({**ok, "top_p": 0}, "top_p"),
            ({**ok, "logprobs": True, "top_logprobs": 9}, "top_logprobs"), ({**ok, "stop": ["a"] * 5}, "stop"),
            ({**ok, "presence_penalty": 3}, "presence_penalty"), ({**ok, "seed": 1.5}, "seed"),
            ({**ok, "max_tokens": 4, "min_tokens": 5}, "min_tokens"), ({**ok, "min_tokens": -1}, "min_tokens"),
            ({**ok, "min_tokens": 2, "response_format": {"type": "json_object"}}, "min_tokens"),
            ({**ok, "stream_options": {"include_usage": True}}, "stream_options"),
            ({**ok, "response_format": {"type": "xml"}}, "response_format.type"),
            ({**ok, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
             "response_format"),
            ({**ok, "tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
             "tool_choice"),
            ({**ok, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0]"),
            ({**ok, "tool_choice": "required"}, "tool_choice"),
            ({"messages": [{"role": "user", "content": "word " * 300}]}, "messages"),  # longer than the context
        ]
        for body, param in bad:
            status, answer, _ = _post(url, "/v1/chat/completions", body, auth)
            assert status == 400 and answer["error"]["type"] == "invalid_request_error", (body, answer)
            assert answer["error"]["param"] == param, (param, answer)
        assert _post(url, "/v1/completions", {"prompt": [10 ** 9]}, auth)[1]["error"]["param"] == "prompt"
        assert _post(url, "/v1/completions", b"x" * 5000, auth)[0] == 413
        assert _post(url, "/v1/nothing", {}, auth)[0] == 404
        conn = http.client.HTTPConnection(url.split("//")[1], timeout=10)
        conn.request("GET", "/v1/chat/completions", headers=auth)
        r = conn.getresponse()
        assert r.status == 405 and json.loads(r.read())["error"]["code"] == "method_not_allowed"
        assert _health(url)["status"] == "ok"  # open without the key, as is the page
        status, answer, _ = _post(url, "/v1/chat/completions", b"{}", {**auth, "Content-Type": "text/plain"})
        assert status == 415 and answer["error"]["code"] == "unsupported_media_type"
        status, answer, _ = _post(url, "/v1/chat/completions", ok, {**auth, "Host": "evil.example:80"})
        assert status == 403 and answer["error"]["code"] == "forbidden_host"  # DNS rebinding
        assert _post(url, "/v1/chat/completions", ok, {**auth, "Host": "localhost:1"})[0] == 200
        assert _chat(api, "still here?", max_tokens=2).usage.completion_tokens == 2  # and it kept serving


def test_serve_command_runs_warns_and_stops(bundle, tmp_path):
    from edgephi.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1") and not is_loopback("example.org")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EDGEPHI_API_KEY": "k", "EDGEPHI_HOME": str(tmp_path)}
    proc = subprocess.Popen(EDGEPHI + ["serve", str(bundle), "--port", str(port), "--parallel", "2"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # printed once the sessions are open
        assert f"http://127.0.0.1:{port}" in line and "2 session(s)" in line and "API key required" in line
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):  # uvicorn binds right after that line
            try:
                _health(url)
                break
            except OSError:
                time.sleep(0.05)
        r = _chat(client(url, "k"), "hi", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
    finally:
        proc.terminate()  # uvicorn shuts down, then re-raises SIGTERM: the usual status of a terminated server
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    assert "Traceback" not in proc.stderr.read()
    bad = subprocess.run(EDGEPHI + ["serve", str(bundle), "--parallel", "0"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and "--parallel 0: must be >= 1" in bad.stderr


def test_a_public_host_warns(monkeypatch, capsys):
    import edgephi.serve as serve_pkg
    from edgephi.cli import build_parser

    class Fake:
        model_id, n_ctx = "m", 8
        model = type("M", (), {"backend": "onnx", "device": "cpu"})

    monkeypatch.setattr(serve_pkg, "load_server", lambda *a, **k: Fake())
    monkeypatch.setattr(serve_pkg, "serve", lambda *a, **k: None)
    monkeypatch.delenv("EDGEPHI_API_KEY", raising=False)
    args = build_parser().parse_args(["serve", "b", "--host", "0.0.0.0"])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0 accepts connections from other machines" in err and "--api-key" in err


def test_an_unexpected_failure_is_a_500_without_a_traceback(server, monkeypatch):
    url, srv = server

    def boom(body):
        raise RuntimeError("internal detail")

    monkeypatch.setattr(srv, "prepare_chat", boom)
    status, body, _ = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert status == 500 and body["error"]["type"] == "server_error" and "internal detail" not in json.dumps(body)
    monkeypatch.undo()
    assert _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})[0] \
        == 200


def test_the_penalties_and_the_constraint_as_logits_processors(bundle):
    import numpy as np

    import edgephi
    from edgephi.constrain import json_schema_grammar
    from edgephi.sampling import presence_frequency_penalty

    pen = presence_frequency_penalty(presence=1.0, frequency=0.5, start=2)  # counts only after the 2 prompt tokens
    assert pen([7, 7, 3, 3, 3, 1], np.zeros(8, np.float32)).tolist() == [0, -1.5, 0, -2.5, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="presence_penalty"):
        presence_frequency_penalty(presence=2.5)
    model = edgephi.load(bundle)
    tok = model.tokenizer
    c = model.constraint(json_schema_grammar({"enum": ["yes", "no"]}), start=1)
    v = model.manifest.spec.vocab_size
    allowed = np.isfinite(c([0], np.zeros(v, np.float32)))
    text = {tok.decode([i]) for i in np.flatnonzero(allowed)}
    assert text and all(t.startswith('"') for t in text)  # only the opening quote fits
    quote = int(np.flatnonzero(allowed)[0])
    after = np.flatnonzero(np.isfinite(c([0, quote], np.zeros(v, np.float32))))
    assert after.size and c.consumed == [quote]
    c([0], np.zeros(v, np.float32))  # a rejected draft: the matcher rolls back
    assert c.consumed == []
    model.close()


def test_a_reasoning_models_thinking_is_reasoning_content(tiny_bundle, tmp_path):
    """A template that opens the <think> block in the prompt (as reasoning models' do): what the model writes
    before </think> is reasoning_content, the rest content, plain and streamed alike (edgephi.reasoning)."""
    import json
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("phi-4-mini-reasoning"), bundle)
    cfg = json.loads((bundle / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
                            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|><think>' }}{% endif %}")
    (bundle / "tokenizer_config.json").write_text(json.dumps(cfg))
    with running(bundle, format="onnx") as (url, _):
        api = client(url)
        msgs = [{"role": "user", "content": "2+2?"}]
        whole = api.chat.completions.create(model="x", messages=msgs, max_tokens=8, temperature=0).choices[0].message
        thought = (whole.model_extra or {}).get("reasoning_content")
        assert thought and not whole.content  # a random model does not close the block within 8 tokens
        parts = list(api.chat.completions.create(model="x", messages=msgs, max_tokens=8, temperature=0, stream=True))
        streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                           for c in parts if c.choices)
        assert streamed == thought
    with running(tiny_bundle("phi-4-mini-reasoning"), format="onnx") as (url, _):  # no <think> opened: content
        whole = client(url).chat.completions.create(model="x", messages=msgs, max_tokens=8, temperature=0)
        assert whole.choices[0].message.content and not (whole.choices[0].message.model_extra or {}).get(
            "reasoning_content")


def test_speculation_and_a_prompt_cache_in_the_server(bundle, tmp_path):
    """--speculate ngram answers exactly as plain greedy decoding and reports the drafts in usage; --prompt-cache
    starts every session from the saved prefix (counted as cached), and a cache of another bundle is refused."""
    import edgephi

    system = "You write short Python functions. " * 6
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
    with running(bundle) as (url, _):
        plain = client(url).chat.completions.create(model="m", messages=msgs, max_tokens=40, temperature=0)
    expected = plain.choices[0].message.content
    model = edgephi.load(bundle)
    prefix = model.tokenizer.apply_chat_template(msgs[:1])
    cache = tmp_path / "system.cache"
    n = model.save_prompt_cache(cache, prefix[:-1])
    model.close()
    with running(bundle, speculate="ngram", prompt_cache=cache) as (url, _):
        r = client(url).chat.completions.create(model="m", messages=msgs, max_tokens=40, temperature=0)
    assert r.choices[0].message.content == expected
    details = r.usage.completion_tokens_details
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens > 0
    assert r.usage.prompt_tokens_details.cached_tokens >= n
    with pytest.raises(ValueError, match="parallel 1 only"):
        running(bundle, speculate=str(bundle), parallel=2).__enter__()
    with pytest.raises(FileNotFoundError, match="no such file"):
        running(bundle, prompt_cache=tmp_path / "missing").__enter__()
