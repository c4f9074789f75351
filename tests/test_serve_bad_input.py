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
import errno
import json
import re
import socket
import time

import openai
import pytest

from serve_util import (
    FIXTURE_CTX, V3, V3_NAME, Server, chat_prompt_tokens, completion_prompt_tokens, exe_of, get_json, metric,
    metrics, post_json, request,
)

CHAT, COMP, OCHAT, OGEN = "/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"
JSON = {"Content-Type": "application/json"}
LIMIT = 16 * 1024 * 1024  # the body limit at most (less when no prompt that fits the context needs so much)
LONG = "lorem ipsum dolor sit amet, " * 80  # far more tokens than the fixture's 512 positions


def user(text="hi"):
    return [{"role": "user", "content": text}]


def chat(**kw):
    return json.dumps({"messages": user(), "max_tokens": 4, **kw}).encode()


def comp(**kw):
    return json.dumps({"prompt": "hi", "max_tokens": 4, **kw}).encode()


def j(obj):
    return json.dumps(obj).encode()


# (id, method, path, body bytes, expected status, param (OpenAI-style answers; None: null), a piece of the
#  message). Ollama paths answer {"error": "message"} and have no param.
CASES = [
    ("invalid-json", "POST", CHAT, b"{not json", 400, None, "malformed JSON in the request body (near byte 2)"),
    ("truncated-json", "POST", CHAT, b'{"messages": [{"role": "user", "content": "hi"', 400, None,
     "malformed JSON in the request body (near byte 45)"),
    ("trailing-garbage", "POST", CHAT, chat() + b" }{", 400, None, "malformed JSON in the request body: extra text"),
    ("empty-body", "POST", CHAT, b"", 400, None, "the request body is empty"),
    ("body-array", "POST", CHAT, b"[]", 400, None, "must be a JSON object, got an array"),
    ("body-string", "POST", CHAT, b'"hello"', 400, None, "must be a JSON object, got a string"),
    ("body-null", "POST", CHAT, b"null", 400, None, "must be a JSON object, got null"),
    ("deep-nesting", "POST", CHAT, b"[" * 200000 + b"]" * 200000, 400, None, "malformed JSON in the request body"),
    ("messages-missing", "POST", CHAT, j({"max_tokens": 4}), 400, "messages", "'messages' is required"),
    ("messages-empty", "POST", CHAT, j({"messages": []}), 400, "messages", "must contain at least one message"),
    ("messages-string", "POST", CHAT, j({"messages": "hi"}), 400, "messages",
     "'messages' must be an array of messages, got a string"),
    ("messages-object", "POST", CHAT, j({"messages": {"role": "user", "content": "hi"}}), 400, "messages",
     "'messages' must be an array of messages, got an object"),
    ("message-not-object", "POST", CHAT, j({"messages": ["hi"]}), 400, "messages[0]",
     "'messages[0]' must be an object, got a string"),
    ("role-missing", "POST", CHAT, j({"messages": [{"content": "hi"}]}), 400, "messages[0].role",
     "'messages[0].role' is required"),
    ("role-unknown", "POST", CHAT, j({"messages": [{"role": "wizard", "content": "hi"}]}), 400, "messages[0].role",
     'unknown role "wizard" in messages[0]'),
    ("role-number", "POST", CHAT, j({"messages": [{"role": 5, "content": "hi"}]}), 400, "messages[0].role",
     "'messages[0].role' must be a string, got a number"),
    ("content-number", "POST", CHAT, j({"messages": [{"role": "user", "content": 5}]}), 400, "messages[0].content",
     "'messages[0].content' must be a string or an array of text parts, got a number"),
    ("content-object", "POST", CHAT, j({"messages": [{"role": "user", "content": {"a": 1}}]}), 400,
     "messages[0].content", "'messages[0].content' must be a string or an array of text parts, got an object"),
    ("content-bad-part", "POST", CHAT, j({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
     400, "messages[0].content[0].text", "'messages[0].content[0].text' must be a string"),
    ("temperature-string", "POST", CHAT, chat(temperature="hot"), 400, "temperature",
     "'temperature' must be a number, got a string"),
    ("temperature-negative", "POST", CHAT, chat(temperature=-1), 400, "temperature",
     "'temperature' must be a number between 0 and 2, got -1"),
    ("temperature-3", "POST", CHAT, chat(temperature=3), 400, "temperature",
     "'temperature' must be a number between 0 and 2, got 3"),
    ("top-p-2", "POST", CHAT, chat(top_p=2), 400, "top_p", "'top_p' must be a number between 0 and 1, got 2"),
    ("top-k-string", "POST", CHAT, chat(top_k="5"), 400, "top_k", "'top_k' must be an integer, got a string"),
    ("frequency-penalty-string", "POST", CHAT, chat(frequency_penalty="x"), 400, "frequency_penalty",
     "'frequency_penalty' must be a number, got a string"),
    ("max-tokens-0", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens",
     "'max_tokens' must be an integer between 1 and 2147483647, got 0"),
    ("max-tokens-negative", "POST", CHAT, chat(max_tokens=-5), 400, "max_tokens",
     "'max_tokens' must be an integer between 1 and 2147483647, got -5"),
    ("max-tokens-fraction", "POST", CHAT, chat(max_tokens=1.5), 400, "max_tokens",
     "'max_tokens' must be an integer, got 1.5"),
    ("max-tokens-string", "POST", CHAT, chat(max_tokens="10"), 400, "max_tokens",
     "'max_tokens' must be an integer, got a string"),
    ("max-tokens-1e30", "POST", CHAT, chat(max_tokens=1e30), 400, "max_tokens",
     "'max_tokens' must be an integer between 1 and 2147483647, got 1e+30"),
    ("max-tokens-beyond-context", "POST", CHAT, chat(max_tokens=FIXTURE_CTX + 1), 400, None,
     f"max_tokens {FIXTURE_CTX + 1} plus the prompt's 5 tokens exceed the context of {FIXTURE_CTX} tokens"),
    ("max-completion-tokens-0", "POST", CHAT, j({"messages": user(), "max_completion_tokens": 0}), 400,
     "max_completion_tokens", "'max_completion_tokens' must be an integer between 1 and 2147483647, got 0"),
    ("prompt-longer-than-context", "POST", CHAT, j({"messages": user(LONG), "max_tokens": 1}), 400, None,
     f"the prompt has 1843 tokens; the context holds {FIXTURE_CTX} (prompt + at least one new token)"),
    ("completion-prompt-longer-than-context", "POST", COMP, j({"prompt": LONG, "max_tokens": 1}), 400, None,
     f"the prompt has 1841 tokens; the context holds {FIXTURE_CTX} (prompt + at least one new token)"),
    # refused by its byte length, before it is tokenized: the fixture's longest token is 29 bytes
    ("one-mib-prompt", "POST", CHAT, j({"messages": user("x " * (1 << 19)), "max_tokens": 1}), 400, "messages",
     f"bytes; at most {29 * FIXTURE_CTX} bytes can fit the context of {FIXTURE_CTX} tokens (-c)"),
    ("n-2", "POST", CHAT, chat(n=2), 400, "n", "only n = 1 (one choice per request) is supported, got 2"),
    ("stop-17", "POST", CHAT, chat(stop=[f"s{i}" for i in range(17)]), 400, "stop",
     "'stop' has 17 strings; at most 16 are supported"),
    ("stop-number", "POST", CHAT, chat(stop=5), 400, "stop",
     "'stop' must be a string or an array of strings, got a number"),
    ("stop-list-of-numbers", "POST", CHAT, chat(stop=[1, 2]), 400, "stop", "'stop[0]' must be a string, got a number"),
    ("stream-string", "POST", CHAT, chat(stream="yes"), 400, "stream", "'stream' must be a boolean, got a string"),
    ("seed-string", "POST", CHAT, chat(seed="x"), 400, "seed", "'seed' must be an integer, got a string"),
    ("model-number", "POST", CHAT, chat(model=5), 400, "model", "'model' must be a string, got a number"),
    ("completion-no-prompt", "POST", COMP, j({"max_tokens": 4}), 400, "prompt", "'prompt' is required"),
    ("completion-prompt-number", "POST", COMP, j({"prompt": 5}), 400, "prompt", "'prompt' must be a string, got a number"),
    ("completion-prompt-two-strings", "POST", COMP, j({"prompt": ["a", "b"]}), 400, "prompt",
     "'prompt' must be a string or an array of exactly one string (got 2)"),
    ("completion-max-tokens-string", "POST", COMP, comp(max_tokens="4"), 400, "max_tokens",
     "'max_tokens' must be an integer, got a string"),
    ("completion-temperature-negative", "POST", COMP, comp(temperature=-0.5), 400, "temperature",
     "'temperature' must be a number between 0 and 2, got -0.5"),
    ("ollama-chat-no-model", "POST", OCHAT, j({"messages": user()}), 400, None, "model is required"),
    ("ollama-options-string", "POST", OCHAT, j({"model": V3_NAME, "messages": user(), "options": "x"}), 400, None,
     "'options' must be an object, got a string"),
    ("ollama-num-predict-string", "POST", OGEN,
     j({"model": V3_NAME, "prompt": "hi", "options": {"num_predict": "x"}}), 400, None,
     "'options.num_predict' must be an integer, got a string"),
    ("ollama-generate-invalid-json", "POST", OGEN, b"{", 400, None, "malformed JSON in the request body (near byte 0)"),
    ("ollama-generate-stream-string", "POST", OGEN, j({"model": V3_NAME, "prompt": "hi", "stream": "no"}), 400, None,
     "'stream' must be a boolean, got a string"),
    ("get-chat", "GET", CHAT, b"", 405, None, "/v1/chat/completions takes POST, not GET"),
    ("get-completions", "GET", COMP, b"", 405, None, "/v1/completions takes POST, not GET"),
    ("post-models", "POST", "/v1/models", b"{}", 405, None, "/v1/models takes GET, not POST"),
    ("delete-api-chat", "DELETE", OCHAT, b"", 405, None, "/api/chat takes POST, not DELETE"),
    ("unknown-path", "GET", "/nope", b"", 404, None, "no endpoint GET /nope"),
    ("unknown-v1-path", "POST", "/v1/nope", b"{}", 404, None, "no endpoint POST /v1/nope"),
    ("unknown-api-path", "GET", "/api/nope", b"", 404, None, "no endpoint GET /api/nope"),
]


@pytest.fixture(scope="module", params=["build", "build-asan"])
def server(request):
    s = Server(exe_of(request.param), V3, ["--max-batch-size", 2, "-t", "2"], request.param).start()
    yield s
    s.stop_and_check()


def check_error(path, status, data, param, msg):
    """DATA is the body of an error of STATUS: {"error": "..."} on /api/ paths (Ollama's
    shape, unknown ones too), else OpenAI's {"error": {message, type, param, code}}
    with PARAM (None: null) and the type of STATUS; the message contains MSG."""
    js = json.loads(data)
    assert set(js) == {"error"}, js
    if path.startswith("/api/"):
        assert param is None and isinstance(js["error"], str) and msg in js["error"], (js, msg)
        return
    err = js["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, js
    typ = "not_found_error" if status == 404 else "invalid_request_error"
    assert (err["type"], err["param"], err["code"]) == (typ, param, None), (err, param)
    assert isinstance(err["message"], str) and msg in err["message"], (err["message"], msg)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server, case):
    name, method, path, body, status, param, msg = case
    st, hdr, data = request(server, method, path, body or None, headers=dict(JSON), timeout=60)
    assert st == status, f"{name}: {method} {path} -> {st} {data[:300]!r}"
    # no API key: no Access-Control-Allow-Origin (no foreign origin may call; test_serve_hardening.py)
    assert hdr.get("content-type") == "application/json" and "access-control-allow-origin" not in hdr, hdr
    if status == 405:
        assert hdr.get("allow") == ("POST, OPTIONS" if method == "GET" or path == OCHAT else "GET, HEAD, OPTIONS"), hdr
    check_error(path, st, data, param, msg)
    assert server.alive()


def test_case_premises():
    """The long prompts really are longer than the context (the token counts the
    server's messages above name)."""
    assert completion_prompt_tokens(V3, LONG) == 1841 > FIXTURE_CTX
    assert chat_prompt_tokens(V3, user(LONG)) == 1843 > FIXTURE_CTX
    assert chat_prompt_tokens(V3, user()) == 5


def _read_responses(sock, n, timeout=60):
    """N whole HTTP/1.1 responses with a Content-Length, one after another, from SOCK:
    [(status line, {lower-case header: value}, body)]. Waits with a deadline; bytes
    past the N-th fail the test."""
    sock.settimeout(timeout)
    end = time.time() + timeout
    buf, out = b"", []

    def more():
        assert time.time() < end, buf[:300]
        d = sock.recv(65536)
        assert d, f"closed inside a response: {buf[:300]!r}"
        return d

    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            buf += more()
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        hdr = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
        size = int(hdr["content-length"])
        while len(buf) < size:
            buf += more()
        out.append((lines[0], hdr, buf[:size]))
        buf = buf[size:]
    assert buf == b"", buf[:300]
    return out


def _read_response(sock, timeout=60):
    return _read_responses(sock, 1, timeout)[0]


def _closed_by_server(sock, timeout=30):
    """The server closes SOCK with nothing more to say: EOF (b""); a reset
    raises ConnectionResetError and fails the test."""
    sock.settimeout(timeout)
    return sock.recv(65536) == b""


def body_limit(server):
    """The body limit the server announced: 16 MiB, or less when no prompt that
    fits its context can need that much (6 JSON bytes a prompt byte, 1 MiB more)."""
    m = re.search(r"numoe serve: request bodies up to (\d+) bytes, prompts up to (\d+) bytes", server.stderr())
    assert m, server.stderr()[-2000:]
    limit = int(m.group(1))
    assert limit == min(LIMIT, 6 * int(m.group(2)) + (1 << 20)) and int(m.group(2)) == 29 * FIXTURE_CTX, m.groups()
    return limit


def test_body_too_large_declared(server):
    """A Content-Length above the limit is refused before the body is read: the 413
    comes with nothing sent after the head, and the server then closes (it will not
    read megabytes it would throw away)."""
    limit = body_limit(server)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (limit + 1))
    with socket.create_connection((server.host, server.port), timeout=60) as s:
        s.sendall(head)
        status, hdr, body = _read_response(s)
        assert status.startswith("HTTP/1.1 413 ") and hdr.get("connection") == "close", (status, hdr)
        check_error(CHAT, 413, body, None, f"the request body ({limit + 1} bytes) exceeds the limit of {limit} bytes")
        assert _closed_by_server(s)
    assert get_json(server, "/health") == (200, {"status": "ok"})


def test_body_too_large_sent(server):
    """A chunked body (no Content-Length to refuse early) is read to its end and
    dropped past the limit, then refused with a 413; the connection is reusable."""
    limit = body_limit(server)
    with socket.create_connection((server.host, server.port), timeout=120) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"a" * (limit // 4)
        for _ in range(4):
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        s.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (limit % 4 + 1, b"a" * (limit % 4 + 1)))  # limit + 1
        status, hdr, body = _read_response(s, timeout=120)
        assert status.startswith("HTTP/1.1 413 "), (status, body[:300])
        check_error(CHAT, 413, body, None, f"the request body exceeds the limit of {limit} bytes")
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = _read_response(s)
        assert (status, body) == ("HTTP/1.1 200 OK", b'{"status":"ok"}')


def test_body_at_limit_is_read(server):
    """A body of exactly the limit is read, then refused as too long a prompt (400,
    not 413), by its byte length."""
    limit = body_limit(server)
    pad = limit - len(b'{"prompt":"","max_tokens":1}')
    body = b'{"prompt":"' + b"a" * pad + b'","max_tokens":1}'
    assert len(body) == limit
    st, _, data = request(server, "POST", COMP, body, headers=dict(JSON), timeout=120)
    assert st == 400, (st, data[:300])
    check_error(COMP, st, data, "prompt", f"the prompt is {pad} bytes; at most {29 * FIXTURE_CTX} bytes can fit")


def test_context_boundary(server):
    """prompt + max_tokens == ctx is taken, one more is a 400."""
    n = chat_prompt_tokens(V3, user())
    st, js, raw = post_json(server, CHAT, {"messages": user(), "max_tokens": FIXTURE_CTX - n, "temperature": 0,
                                           "ignore_eos": True})
    assert st == 200 and js["usage"] == {"prompt_tokens": n, "completion_tokens": FIXTURE_CTX - n,
                                         "total_tokens": FIXTURE_CTX}, raw[:300]
    st, js, raw = post_json(server, CHAT, {"messages": user(), "max_tokens": FIXTURE_CTX - n + 1})
    assert st == 400, raw[:300]
    check_error(CHAT, st, raw, None, f"max_tokens {FIXTURE_CTX - n + 1} plus the prompt's {n} tokens exceed "
                                     f"the context of {FIXTURE_CTX} tokens")
    n = completion_prompt_tokens(V3, "hi")
    st, js, raw = post_json(server, COMP, {"prompt": "hi", "max_tokens": FIXTURE_CTX - n, "temperature": 0,
                                           "ignore_eos": True})
    assert st == 200 and js["usage"]["completion_tokens"] == FIXTURE_CTX - n, raw[:300]
    st, js, raw = post_json(server, COMP, {"prompt": "hi", "max_tokens": FIXTURE_CTX - n + 1})
    assert st == 400, raw[:300]
    check_error(COMP, st, raw, None, f"max_tokens {FIXTURE_CTX - n + 1} plus the prompt's {n} tokens exceed")


def test_openai_client_sees_errors(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=60, max_retries=0) as c:
        _client_sees_errors(c)


def _client_sees_errors(c):
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=V3_NAME, messages=user(), n=2)
    assert e.value.status_code == 400 and e.value.param == "n" and e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=V3_NAME, messages=[], max_tokens=2)
    assert e.value.param == "messages"
    with pytest.raises(openai.NotFoundError) as e:
        c.get("/nope", cast_to=object)
    assert e.value.status_code == 404 and e.value.type == "not_found_error"


# Requests whose right answer is a judgement call, each with the answer numoe gives:
# (id, path, body, headers, expected status, what: for a 200, the user text whose
# chat prompt the usage must count ("SAME": also the very answer of the plain
# greedy request PLAIN; "LOAD": Ollama's preload answer); for a 400, (param, message)).
PLAIN = chat(temperature=0, ignore_eos=True)
SPECIAL = "<｜Assistant｜><｜end▁of▁sentence｜>"
ODD = [
    # bytes that are not UTF-8 reach the tokenizer as they are (byte-level BPE takes any bytes)
    ("invalid-utf8-content", CHAT, b'{"messages":[{"role":"user","content":"a\xff\xfe\xc3b"}],"max_tokens":4}', JSON,
     200, "a\udcff\udcfe\udcc3b"),
    ("lone-surrogate-escape", CHAT, b'{"messages":[{"role":"user","content":"a\\ud800b"}],"max_tokens":4}', JSON,
     400, (None, "malformed JSON in the request body (near byte 40)")),
    # a NUL would end the C string the content becomes: refused, naming the field
    ("nul-escape", CHAT, b'{"messages":[{"role":"user","content":"a\\u0000b"}],"max_tokens":4}', JSON,
     400, ("messages[0].content", "'messages[0].content' contains a NUL character (\\u0000)")),
    ("text-plain-content-type", CHAT, PLAIN, {"Content-Type": "text/plain"}, 200, "SAME"),
    ("no-content-type", CHAT, PLAIN, {}, 200, "SAME"),
    ("null-optional-fields", CHAT, chat(temperature=None, top_p=None, stop=None, seed=None, stream=None), JSON,
     200, "hi"),
    ("unknown-fields-ignored", CHAT, chat(temperature=0, ignore_eos=True, foo={"bar": [1, 2]}, logprobs=False,
                                          user="u1"), JSON, 200, "SAME"),
    ("empty-content", CHAT, j({"messages": user(""), "max_tokens": 2}), JSON, 200, ""),
    ("stop-empty-string", CHAT, chat(stop=[""]), JSON, 400, ("stop", "'stop' strings must not be empty")),
    ("stop-16", CHAT, chat(stop=[f"s{i}" for i in range(16)]), JSON, 200, "hi"),
    ("ollama-chat-no-messages", OCHAT, j({"model": V3_NAME, "stream": False}), JSON, 200, "LOAD"),
    ("ollama-generate-empty-prompt", OGEN, j({"model": V3_NAME, "prompt": "", "stream": False}), JSON, 200, "LOAD"),
    # special-token text in a message is matched as the special token (as llama.cpp's server does)
    ("special-token-text-in-content", CHAT, j({"messages": user(SPECIAL), "max_tokens": 2}), JSON, 200, SPECIAL),
]


@pytest.mark.parametrize("case", ODD, ids=[c[0] for c in ODD])
def test_odd_request(server, case):
    name, path, body, headers, status, what = case
    st, hdr, data = request(server, "POST", path, body, headers=dict(headers), timeout=60)
    assert st == status, f"{name}: {st} {data[:300]!r}"
    data.decode("utf-8")  # valid UTF-8 out, whatever came in
    js = json.loads(data)
    if status == 400:
        check_error(path, st, data, *what)
    elif what == "LOAD":  # Ollama's preload: done at once, nothing generated
        text = js["message"] if path == OCHAT else js["response"]
        assert (js["done"], js["done_reason"], js["eval_count"], text) == \
            (True, "load", 0, {"role": "assistant", "content": ""} if path == OCHAT else ""), js
    else:
        max_tokens = json.loads(body)["max_tokens"] if name != "invalid-utf8-content" else 4
        u = js["usage"]
        want_prompt = chat_prompt_tokens(V3, user("hi" if what == "SAME" else what))
        assert u["prompt_tokens"] == want_prompt and u["total_tokens"] == want_prompt + u["completion_tokens"], js
        fin = js["choices"][0]["finish_reason"]
        assert (fin, u["completion_tokens"]) == ("length", max_tokens) or \
            (fin == "stop" and u["completion_tokens"] < max_tokens), js
        assert isinstance(js["choices"][0]["message"]["content"], str)
        if what == "SAME":
            st, ref, raw = post_json(server, CHAT, json.loads(PLAIN))
            assert st == 200 and js["choices"][0] == ref["choices"][0] and js["usage"] == ref["usage"], (js, ref)
        if name == "stop-16":
            assert not any(f"s{i}" in js["choices"][0]["message"]["content"] for i in range(16)), js
    assert server.alive()


def _raw(server, payload, timeout=10, half_close=True, unread=False):
    """Sends PAYLOAD, (half_close) shuts the sending side, reads until the server
    closes. A half-closed client counts as gone to the server (as to nginx), so a
    request meant to be served keeps its side open and asks for Connection: close
    instead. A reset or a timeout fails the test, except with UNREAD: the server
    answers before it has read all of PAYLOAD and closes, TCP turns a close with
    bytes unread into a reset, and the reset can overtake the answer; then the
    bytes before it (maybe none) come back with "RESET" appended."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as s:
        out = b""
        try:
            s.sendall(payload)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            while True:
                d = s.recv(65536)
                if not d:
                    return out
                out += d
        except OSError as e:
            reset = isinstance(e, (ConnectionResetError, BrokenPipeError)) or e.errno == errno.ENOTCONN
            if not (unread and reset):
                raise
            return out + b"RESET"


def _mhd_error(out, status, words):
    """OUT is libmicrohttpd's own HTML error answer STATUS ("400 Bad Request"),
    with Connection: close and WORDS in its text."""
    assert out.startswith(b"HTTP/1.1 " + status + b"\r\n"), out[:300]
    head = out.partition(b"\r\n\r\n")[0]
    assert b"\r\nConnection: close\r\n" in head + b"\r\n" and words in out, out[:600]


def test_broken_http(server):
    """Garbage, half requests and vanished clients: each gets the answer below (or
    none) and a clean close, and the server goes on serving."""
    # no request line to answer: closed without a word
    assert _raw(server, b"GARBAGE\r\n\r\n") == b""
    assert _raw(server, b"\x00\xff\x16\x03\x01" * 100) == b""
    # the client went away inside the body: nothing to answer
    assert _raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                        b"{\"messages\"") == b""
    # (libmicrohttpd 0.9.75 sends this one's status line and headers twice; a client reads the first)
    _mhd_error(_raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}"),
               b"400 Bad Request", b"wrong value for <b>Content-Length</b> header")
    _mhd_error(_raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"zz\r\n"), b"400 Bad Request", b"chunked encoding was syntactically incorrect")
    # a head too large for the connection's memory: refused before the server has read it all, so the
    # close resets and the 431 may be lost to the reset; nothing else may come
    out = _raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Long: " + b"a" * 200000 + b"\r\n\r\n",
               unread=True)
    if out != b"RESET":
        _mhd_error(out, b"431 Request Header Fields Too Large", b"header was too big")
    # a chunked upload of a valid body is served
    body = PLAIN
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    out = _raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                       b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked, timeout=60,
               half_close=False)
    assert out.startswith(b"HTTP/1.1 200"), out[:300]
    js = json.loads(out.partition(b"\r\n\r\n")[2])
    assert js["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}, js
    # many connections opened and dropped at once: all seen closed (no client of this module keeps
    # one open: only the scrape's own is left), the server still answers
    socks = [socket.create_connection((server.host, server.port), timeout=10) for _ in range(64)]
    for s in socks:
        s.close()
    end = time.time() + 20
    while (n := metric(metrics(server)[0], "numoe_http_connections_open")) != 1:
        assert time.time() < end, f"{n - 1} connections still counted open"
        time.sleep(0.05)
    assert server.alive() and get_json(server, "/health") == (200, {"status": "ok"})


def test_still_serving_after_abuse(server):
    """Runs last in this module: health, a normal request, then a clean exit (fixture teardown)."""
    st, js = get_json(server, "/health")
    assert st == 200 and js == {"status": "ok"}
    st, js, raw = post_json(server, CHAT, {"messages": user(), "max_tokens": 5, "temperature": 0,
                                           "ignore_eos": True})
    assert st == 200 and js["usage"] == {"prompt_tokens": chat_prompt_tokens(V3, user()), "completion_tokens": 5,
                                         "total_tokens": chat_prompt_tokens(V3, user()) + 5}, raw[:300]
    assert server.alive()


def test_seed_range(server):
    """Any 64-bit seed is taken (coordinator/serve/api.h: [-2^63, 2^64)); beyond that, or a fraction, is a 400."""
    for seed in (0, -1, -(2 ** 63), 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1):
        body = b'{"prompt":"hi","max_tokens":2,"ignore_eos":true,"seed":%d}' % seed
        st, _, data = request(server, "POST", COMP, body, headers=dict(JSON))
        assert st == 200 and json.loads(data)["usage"]["completion_tokens"] == 2, (seed, st, data[:300])
    for seed, msg in ((b"1.5", "'seed' must be an integer, got 1.5"),
                      (b"1e300", "'seed' 1e+300 is out of the 64-bit range"),
                      (b"-1e19", "'seed' -1e+19 is out of the 64-bit range")):
        st, _, data = request(server, "POST", COMP, b'{"prompt":"hi","max_tokens":2,"seed":%s}' % seed,
                              headers=dict(JSON))
        assert st == 400, (seed, st, data[:300])
        check_error(COMP, st, data, "seed", msg)


def _read_all(sock, until, timeout=20):
    """What SOCK sends until UNTIL(bytes so far) holds; fails at EOF or the deadline first."""
    sock.settimeout(timeout)
    out = b""
    end = time.time() + timeout
    while not until(out):
        assert time.time() < end, out[:500]
        d = sock.recv(65536)
        assert d, f"closed early: {out[:500]!r}"
        out += d
    return out


def test_http_protocol_corners(server):
    """HTTP/1.0 streams (no chunked encoding, closed at the end), Expect:
    100-continue (and a 413 before the body for a too-large one), pipelining."""
    body = j({"messages": user(), "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True})
    with socket.create_connection((server.host, server.port), timeout=20) as k:
        k.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        out = _read_all(k, lambda b: b.rstrip().endswith(b"data: [DONE]"))
        assert _closed_by_server(k)  # no length, no chunks: the close ends the answer
    head, _, rest = out.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200" and b"chunked" not in head.lower(), head
    events = [json.loads(l[6:]) for l in rest.decode().split("\n\n") if l.startswith("data: {")]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}, events[0]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None] * (len(events) - 1) + ["length"], events
    st, whole, raw = post_json(server, CHAT, json.loads(PLAIN))
    assert st == 200 and "".join(e["choices"][0]["delta"].get("content", "") for e in events) == \
        whole["choices"][0]["message"]["content"], (events, raw[:300])

    body = j({"messages": user(), "max_tokens": 4})
    with socket.create_connection((server.host, server.port), timeout=20) as k:
        k.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert _read_all(k, lambda b: b"\r\n\r\n" in b) == b"HTTP/1.1 100 Continue\r\n\r\n"
        k.sendall(body)
        status, _, data = _read_response(k)
        assert status == "HTTP/1.1 200 OK" and json.loads(data)["object"] == "chat.completion", (status, data[:300])
    with socket.create_connection((server.host, server.port), timeout=20) as k:
        k.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1))
        status, _, data = _read_response(k)
        assert status.startswith("HTTP/1.1 413 "), status  # the reason phrase is libmicrohttpd's
        check_error(CHAT, 413, data, None, f"the request body ({LIMIT + 1} bytes) exceeds the limit")
        assert _closed_by_server(k)

    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    comp_body = b'{"prompt":"hi","max_tokens":3,"ignore_eos":true}'
    with socket.create_connection((server.host, server.port), timeout=20) as k:
        k.sendall(health + b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                  % len(comp_body) + comp_body + health)
        answers = _read_responses(k, 3)  # in the order asked
    assert [a[0] for a in answers] == ["HTTP/1.1 200 OK"] * 3
    assert answers[0][2] == answers[2][2] == b'{"status":"ok"}'
    assert json.loads(answers[1][2])["usage"]["completion_tokens"] == 3, answers[1]
