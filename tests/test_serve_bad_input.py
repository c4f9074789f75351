"""`numoe serve` under malformed and hostile requests: every one of the ~60
table cases gets a 4xx with an OpenAI-style error body ({"error": {"message",
"type", "param", "code"}}, param naming the field; Ollama paths {"error":
"..."}), nothing is a 5xx, the process neither crashes nor reports a sanitizer
error, and afterwards /health is 200 and a normal request is still served.
Also: 413 above 16 MiB (declared or sent), exactly 16 MiB read, the context
boundary (prompt + max_tokens == ctx taken, +1 refused), judgement-call
requests (invalid UTF-8, NUL, null fields, wrong Content-Type) never 5xx,
garbage / half / vanished HTTP, HTTP/1.0, Expect: 100-continue, pipelining,
the 64-bit seed range. Runs against build/ and build-asan/."""
import json
import socket
import time

import openai
import pytest

from serve_util import (
    FIXTURE_CTX, V3, V3_NAME, Server, chat_prompt_tokens, completion_prompt_tokens, exe_of, get_json,
    post_json, request, token_ids,
)

CHAT, COMP, OCHAT, OGEN = "/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"
JSON = {"Content-Type": "application/json"}
OLLAMA_PATHS = (OCHAT, OGEN, "/api/tags", "/api/version")  # {"error": "..."}; other /api/ paths either style
LIMIT = 16 * 1024 * 1024  # the largest body the server takes
LONG = "lorem ipsum dolor sit amet, " * 80  # far more tokens than the fixture's 512 positions


def user(text="hi"):
    return [{"role": "user", "content": text}]


def chat(**kw):
    return json.dumps({"messages": user(), "max_tokens": 4, **kw}).encode()


def comp(**kw):
    return json.dumps({"prompt": "hi", "max_tokens": 4, **kw}).encode()


def j(obj):
    return json.dumps(obj).encode()


# (id, method, path, body bytes, expected status, expected param (OpenAI paths; None: any) or
#  message substring prefixed with "~")
CASES = [
    ("invalid-json", "POST", CHAT, b"{not json", 400, None),
    ("truncated-json", "POST", CHAT, b'{"messages": [{"role": "user", "content": "hi"', 400, None),
    ("trailing-garbage", "POST", CHAT, chat() + b" }{", 400, None),
    ("empty-body", "POST", CHAT, b"", 400, None),
    ("body-array", "POST", CHAT, b"[]", 400, None),
    ("body-string", "POST", CHAT, b'"hello"', 400, None),
    ("body-null", "POST", CHAT, b"null", 400, None),
    ("deep-nesting", "POST", CHAT, b"[" * 200000 + b"]" * 200000, 400, None),
    ("messages-missing", "POST", CHAT, j({"max_tokens": 4}), 400, "messages"),
    ("messages-empty", "POST", CHAT, j({"messages": []}), 400, "messages"),
    ("messages-string", "POST", CHAT, j({"messages": "hi"}), 400, "messages"),
    ("messages-object", "POST", CHAT, j({"messages": {"role": "user", "content": "hi"}}), 400, "messages"),
    ("message-not-object", "POST", CHAT, j({"messages": ["hi"]}), 400, "messages"),
    ("role-missing", "POST", CHAT, j({"messages": [{"content": "hi"}]}), 400, "messages"),
    ("role-unknown", "POST", CHAT, j({"messages": [{"role": "wizard", "content": "hi"}]}), 400, "messages"),
    ("role-number", "POST", CHAT, j({"messages": [{"role": 5, "content": "hi"}]}), 400, "messages"),
    ("content-number", "POST", CHAT, j({"messages": [{"role": "user", "content": 5}]}), 400, "messages"),
    ("content-object", "POST", CHAT, j({"messages": [{"role": "user", "content": {"a": 1}}]}), 400, "messages"),
    ("content-bad-part", "POST", CHAT, j({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
     400, "messages"),
    ("temperature-string", "POST", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("temperature-negative", "POST", CHAT, chat(temperature=-1), 400, "temperature"),
    ("temperature-3", "POST", CHAT, chat(temperature=3), 400, "temperature"),
    ("top-p-2", "POST", CHAT, chat(top_p=2), 400, "top_p"),
    ("top-k-string", "POST", CHAT, chat(top_k="5"), 400, "top_k"),
    ("frequency-penalty-string", "POST", CHAT, chat(frequency_penalty="x"), 400, "frequency_penalty"),
    ("max-tokens-0", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", "POST", CHAT, chat(max_tokens=-5), 400, "max_tokens"),
    ("max-tokens-fraction", "POST", CHAT, chat(max_tokens=1.5), 400, "max_tokens"),
    ("max-tokens-string", "POST", CHAT, chat(max_tokens="10"), 400, "max_tokens"),
    ("max-tokens-1e30", "POST", CHAT, chat(max_tokens=1e30), 400, "max_tokens"),
    ("max-tokens-beyond-context", "POST", CHAT, chat(max_tokens=FIXTURE_CTX + 1), 400, None),
    ("max-completion-tokens-0", "POST", CHAT, j({"messages": user(), "max_completion_tokens": 0}), 400,
     "max_completion_tokens"),
    ("prompt-longer-than-context", "POST", CHAT, j({"messages": user(LONG), "max_tokens": 1}), 400, None),
    ("completion-prompt-longer-than-context", "POST", COMP, j({"prompt": LONG, "max_tokens": 1}), 400, None),
    ("one-mib-prompt", "POST", CHAT, j({"messages": user("x " * (1 << 19)), "max_tokens": 1}), 400, None),
    ("n-2", "POST", CHAT, chat(n=2), 400, "n"),
    ("stop-17", "POST", CHAT, chat(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    ("stop-number", "POST", CHAT, chat(stop=5), 400, "stop"),
    ("stop-list-of-numbers", "POST", CHAT, chat(stop=[1, 2]), 400, "stop"),
    ("stream-string", "POST", CHAT, chat(stream="yes"), 400, "stream"),
    ("seed-string", "POST", CHAT, chat(seed="x"), 400, "seed"),
    ("model-number", "POST", CHAT, chat(model=5), 400, "model"),
    ("completion-no-prompt", "POST", COMP, j({"max_tokens": 4}), 400, "prompt"),
    ("completion-prompt-number", "POST", COMP, j({"prompt": 5}), 400, "prompt"),
    ("completion-prompt-two-strings", "POST", COMP, j({"prompt": ["a", "b"]}), 400, "prompt"),
    ("completion-max-tokens-string", "POST", COMP, comp(max_tokens="4"), 400, "max_tokens"),
    ("completion-temperature-negative", "POST", COMP, comp(temperature=-0.5), 400, "temperature"),
    ("ollama-chat-no-model", "POST", OCHAT, j({"messages": user()}), 400, "~model"),
    ("ollama-options-string", "POST", OCHAT, j({"model": V3_NAME, "messages": user(), "options": "x"}), 400,
     "~options"),
    ("ollama-num-predict-string", "POST", OGEN,
     j({"model": V3_NAME, "prompt": "hi", "options": {"num_predict": "x"}}), 400, None),
    ("ollama-generate-invalid-json", "POST", OGEN, b"{", 400, None),
    ("ollama-generate-stream-string", "POST", OGEN, j({"model": V3_NAME, "prompt": "hi", "stream": "no"}), 400,
     None),
    ("get-chat", "GET", CHAT, b"", 405, None),
    ("get-completions", "GET", COMP, b"", 405, None),
    ("post-models", "POST", "/v1/models", b"{}", 405, None),
    ("delete-api-chat", "DELETE", OCHAT, b"", 405, None),
    ("unknown-path", "GET", "/nope", b"", 404, None),
    ("unknown-v1-path", "POST", "/v1/nope", b"{}", 404, None),
    ("unknown-api-path", "GET", "/api/nope", b"", 404, None),
]


@pytest.fixture(scope="module", params=["build", "build-asan"])
def server(request):
    s = Server(exe_of(request.param), V3, ["--max-batch-size", 2, "-t", "2"], request.param).start()
    yield s
    s.stop_and_check()


def check_error(path, status, data, want):
    """DATA is the body of an error of STATUS; WANT: the param or "~substring"."""
    assert 400 <= status < 500, (status, data[:300])
    js = json.loads(data)
    if path.startswith("/api/") and not (path not in OLLAMA_PATHS and isinstance(js.get("error"), dict)):
        assert isinstance(js.get("error"), str) and js["error"], js
        msg, param = js["error"], None
    else:
        err = js.get("error")
        assert isinstance(err, dict) and set(err) >= {"message", "type", "param", "code"}, js
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        msg, param = err["message"], err["param"]
    if want is None:
        return
    if want.startswith("~"):
        assert want[1:].lower() in msg.lower(), msg
    elif param is not None or not path.startswith("/api/"):
        assert isinstance(param, str) and (param == want or param.startswith((want + "[", want + "."))), \
            f"param {param!r}, want {want!r} ({msg})"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server, case):
    name, method, path, body, status, want = case
    st, hdr, data = request(server, method, path, body or None, headers=dict(JSON), timeout=60)
    assert st == status, f"{name}: {method} {path} -> {st} {data[:300]!r}"
    check_error(path, st, data, want)
    assert server.alive()


def test_case_premises():
    """The long prompts really are longer than the context."""
    assert completion_prompt_tokens(V3, LONG) > FIXTURE_CTX
    assert chat_prompt_tokens(V3, user(LONG)) > FIXTURE_CTX


def _exchange_raw(server, head, body, timeout=60):
    """Sends HEAD, waits briefly for an early answer, then BODY; returns the response bytes."""
    s = socket.create_connection((server.host, server.port), timeout=timeout)
    try:
        s.sendall(head)
        s.settimeout(1.0)
        resp = b""
        try:
            resp = s.recv(65536)  # a server may answer a too-large Content-Length at once
        except socket.timeout:
            pass
        s.settimeout(timeout)
        if not resp:
            try:
                view = memoryview(body)
                for i in range(0, len(body), 1 << 20):
                    s.sendall(view[i:i + (1 << 20)])
            except (BrokenPipeError, ConnectionResetError):
                pass
        try:
            while True:
                d = s.recv(65536)
                if not d:
                    break
                resp += d
                if b"\r\n\r\n" in resp:
                    h, _, rest = resp.partition(b"\r\n\r\n")
                    cl = [l for l in h.split(b"\r\n") if l.lower().startswith(b"content-length:")]
                    if cl and len(rest) >= int(cl[0].split(b":")[1]):
                        break
        except (ConnectionResetError, socket.timeout):
            pass
        return resp
    finally:
        s.close()


def test_body_too_large(server):
    pad = LIMIT + 1 - len(b'{"messages":[{"role":"user","content":""}]}')
    body = b'{"messages":[{"role":"user","content":"' + b"a" * pad + b'"}]}'
    assert len(body) == LIMIT + 1
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    resp = _exchange_raw(server, head, body)
    assert resp.startswith(b"HTTP/1.1 413") or resp.startswith(b"HTTP/1.0 413"), resp[:300]
    h, _, rest = resp.partition(b"\r\n\r\n")
    check_error("/v1/chat/completions", 413, rest, None)
    assert get_json(server, "/health")[0] == 200


def test_body_at_limit_is_read(server):
    """Exactly 16 MiB is within the limit: read, then refused as too long a prompt (400, not 413)."""
    pad = LIMIT - len(b'{"prompt":"","max_tokens":1}')
    body = b'{"prompt":"' + b"a" * pad + b'","max_tokens":1}'
    assert len(body) == LIMIT
    st, _, data = request(server, "POST", COMP, body, headers=dict(JSON), timeout=120)
    assert st == 400, (st, data[:300])
    check_error(COMP, st, data, None)


def test_context_boundary(server):
    """prompt + max_tokens == ctx is taken, one more is a 400."""
    n = chat_prompt_tokens(V3, user())
    st, js, raw = post_json(server, CHAT, {"messages": user(), "max_tokens": FIXTURE_CTX - n, "temperature": 0})
    assert st == 200, raw[:300]
    st, js, raw = post_json(server, CHAT, {"messages": user(), "max_tokens": FIXTURE_CTX - n + 1})
    assert st == 400, raw[:300]
    check_error(CHAT, st, raw, None)
    n = completion_prompt_tokens(V3, "hi")
    st, js, raw = post_json(server, COMP, {"prompt": "hi", "max_tokens": FIXTURE_CTX - n, "temperature": 0})
    assert st == 200, raw[:300]
    st, js, raw = post_json(server, COMP, {"prompt": "hi", "max_tokens": FIXTURE_CTX - n + 1})
    assert st == 400, raw[:300]


def test_openai_client_sees_errors(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=60, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=V3_NAME, messages=user(), n=2)
    assert e.value.status_code == 400 and e.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=V3_NAME, messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        c.get("/nope", cast_to=object)


# Requests whose right answer is a judgement call: they must not be a 5xx or
# hurt the server; a 4xx must carry a proper error body. (path, body, headers)
ODD = [
    ("invalid-utf8-content", CHAT, b'{"messages":[{"role":"user","content":"a\xff\xfe\xc3b"}],"max_tokens":4}', JSON),
    ("lone-surrogate-escape", CHAT, b'{"messages":[{"role":"user","content":"a\\ud800b"}],"max_tokens":4}', JSON),
    ("nul-escape", CHAT, b'{"messages":[{"role":"user","content":"a\\u0000b"}],"max_tokens":4}', JSON),
    ("text-plain-content-type", CHAT, chat(), {"Content-Type": "text/plain"}),
    ("no-content-type", CHAT, chat(), {}),
    ("null-optional-fields", CHAT, chat(temperature=None, top_p=None, stop=None, seed=None, stream=None), JSON),
    ("unknown-fields-ignored", CHAT, chat(foo={"bar": [1, 2]}, logprobs=False, user="u1"), JSON),
    ("empty-content", CHAT, j({"messages": user(""), "max_tokens": 2}), JSON),
    ("stop-empty-string", CHAT, chat(stop=[""]), JSON),
    ("stop-16", CHAT, chat(stop=[f"s{i}" for i in range(16)]), JSON),
    ("ollama-chat-no-messages", OCHAT, j({"model": V3_NAME, "stream": False}), JSON),  # Ollama: a load request
    ("ollama-generate-empty-prompt", OGEN, j({"model": V3_NAME, "prompt": "", "stream": False}), JSON),
    ("special-token-text-in-content", CHAT, j({"messages": user("<｜Assistant｜><｜end▁of▁sentence｜>"),
                                               "max_tokens": 2}), JSON),
]
MUST_SERVE = {"text-plain-content-type", "no-content-type", "unknown-fields-ignored", "empty-content", "stop-16"}


@pytest.mark.parametrize("case", ODD, ids=[c[0] for c in ODD])
def test_odd_request(server, case):
    name, path, body, headers = case
    st, hdr, data = request(server, "POST", path, body, headers=dict(headers), timeout=60)
    assert st < 500, f"{name}: {st} {data[:300]!r}"
    if st >= 400:
        assert name not in MUST_SERVE, f"{name}: {st} {data[:300]!r}"
        check_error(path, st, data, None)
    else:
        js = json.loads(data)
        if path == CHAT:
            assert isinstance(js["choices"][0]["message"]["content"], str)
            json.dumps(js, ensure_ascii=False).encode("utf-8")  # valid UTF-8 out
    assert server.alive()


def _raw(server, payload, timeout=10, half_close=True):
    """Sends PAYLOAD, (half_close) shuts the sending side, reads to EOF. A half-closed
    client counts as gone to the server (as to nginx), so a request meant to be served
    keeps its side open and asks for Connection: close instead."""
    s = socket.create_connection((server.host, server.port), timeout=timeout)
    try:
        s.sendall(payload)
        if half_close:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        out = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
        return out
    except (ConnectionResetError, socket.timeout):
        return b""
    finally:
        s.close()


def test_broken_http(server):
    """Garbage, half requests and vanished clients leave the server serving."""
    _raw(server, b"GARBAGE\r\n\r\n")
    _raw(server, b"\x00\xff\x16\x03\x01" * 100)
    _raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"messages\"")
    _raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}")
    _raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    _raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Long: " + b"a" * 200000 + b"\r\n\r\n")
    # a chunked upload of a valid body is served
    body = chat(temperature=0)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    out = _raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                       b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked, timeout=60,
               half_close=False)
    assert out.startswith(b"HTTP/1.1 200"), out[:300]
    # many connections opened and dropped at once
    socks = [socket.create_connection((server.host, server.port), timeout=10) for _ in range(64)]
    for s in socks:
        s.close()
    time.sleep(0.2)
    assert server.alive()


def test_still_serving_after_abuse(server):
    """Runs last in this module: health, a normal request, then a clean exit (fixture teardown)."""
    st, js = get_json(server, "/health")
    assert st == 200 and js == {"status": "ok"}
    st, js, raw = post_json(server, CHAT, {"messages": user(), "max_tokens": 5, "temperature": 0,
                                           "ignore_eos": True})
    assert st == 200 and js["usage"]["completion_tokens"] == 5, raw[:300]
    assert js["usage"]["prompt_tokens"] == chat_prompt_tokens(V3, user())
    assert token_ids(V3, "hi")  # tokenizer helper sanity
    assert server.alive()


def test_seed_range(server):
    """Any 64-bit seed is taken (coordinator/serve/api.h: [-2^63, 2^64)); beyond that, or a fraction, is a 400."""
    for seed in (0, -1, -(2 ** 63), 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1):
        body = b'{"prompt":"hi","max_tokens":2,"seed":%d}' % seed
        st, _, data = request(server, "POST", COMP, body, headers=dict(JSON))
        assert st == 200, (seed, st, data[:300])
    for seed in (b"1.5", b"1e300", b"-1e19"):
        st, _, data = request(server, "POST", COMP, b'{"prompt":"hi","max_tokens":2,"seed":%s}' % seed,
                              headers=dict(JSON))
        assert st == 400, (seed, st, data[:300])
        check_error(COMP, st, data, "seed")


def _read_all(sock, until=None, timeout=20):
    sock.settimeout(timeout)
    out = b""
    end = time.time() + timeout
    while time.time() < end and (until is None or not until(out)):
        d = sock.recv(65536)
        if not d:
            break
        out += d
    return out


def test_http_protocol_corners(server):
    """HTTP/1.0 streams (no chunked encoding, closed at the end), Expect:
    100-continue (and a 413 before the body for a too-large one), pipelining."""
    body = j({"messages": user(), "max_tokens": 4, "stream": True})
    with socket.create_connection((server.host, server.port), timeout=20) as k:
        k.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        out = _read_all(k)
    head, _, rest = out.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200" and b"chunked" not in head.lower(), head
    assert rest.rstrip().endswith(b"data: [DONE]"), rest[-200:]

    body = j({"messages": user(), "max_tokens": 4})
    with socket.create_connection((server.host, server.port), timeout=20) as k:
        k.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert _read_all(k, lambda b: b"\r\n\r\n" in b).startswith(b"HTTP/1.1 100")
        k.sendall(body)
        assert _read_all(k, lambda b: b"\r\n\r\n" in b).startswith(b"HTTP/1.1 200")
    with socket.create_connection((server.host, server.port), timeout=20) as k:
        k.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1))
        assert _read_all(k, lambda b: b"\r\n\r\n" in b).startswith(b"HTTP/1.1 413")

    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    comp_body = b'{"prompt":"hi","max_tokens":3}'
    with socket.create_connection((server.host, server.port), timeout=20) as k:
        k.sendall(health + b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                  % len(comp_body) + comp_body + health)
        out = _read_all(k, lambda b: b.count(b"HTTP/1.1 200") == 3 and b.endswith(b'{"status":"ok"}'))
    assert out.count(b"HTTP/1.1 200") == 3 and b"text_completion" in out, out[:500]
