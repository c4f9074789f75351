"""`numoe serve` against hostile clients and failing workers (issue 17), one test (or
more) per defect the probe found:

1. connection exhaustion: idle and slow connections are closed by deadline, a full
   server answers 503 at once (in all and per client), unsupported Transfer-Encodings
   get 501 and a closed connection;
2. memory amplification: a prompt that cannot fit the context is refused by its byte
   length, before it is tokenized, and the body limit follows the context;
3. health that lies: while the launcher has given a worker up, /health is 503 with
   the reason, numoe_up 0, requests 503; the worker comes back by itself and the
   server serves again, with restarts and give-ups counted;
4. framing: Content-Length with Transfer-Encoding, and conflicting Content-Lengths,
   are 400 and close the connection (nothing after them is answered);
5. input: NUL in JSON strings is a 400 naming the field, log lines escape what
   clients send, paths match exactly, out-of-range penalties name the field;
6. secrets and defaults: --api-key-file (refused when others can read it),
   NUMOE_API_KEY, --api-key warned about; no foreign browser origin without a key
   unless --cors-origin allows it.

Waits are for states (tests/waits.py), never fixed sleeps."""
import json
import re
import socket
import subprocess
import threading

import pytest

from serve_util import (V3, Server, exe_of, metric, metrics, parse_metrics, post_json, request)
from waits import wait_until

COMP = "/v1/completions"
CHAT = "/v1/chat/completions"


def raw_exchange(server, data, timeout=30):
    """Sends DATA on a fresh connection and reads until the server closes it (or
    TIMEOUT: then b"<open>" is appended)."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    return out
                out += b
        except socket.timeout:
            return out + b"<open>"


def closed_by_server(sock, timeout=30):
    sock.settimeout(timeout)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


@pytest.fixture(scope="module")
def tight():
    """A server with small limits and short deadlines, in-process experts (one pid)."""
    s = Server(exe_of("build"), V3, ["--workers", 0, "-t", 1, "--max-connections", 8, "--max-connections-per-client",
                                     6, "--idle-timeout", 1, "--request-timeout", 2]).start()
    yield s
    s.stop_and_check()


# --------------------------------------------------------------------------- 1. connections

def open_connections(server):
    """numoe_http_connections_open, or None while the server still counts this client's sockets that the
    client has closed (it answers 503 for the per-client limit until it has seen the closes: measured on a
    loaded VM, so the wait must not fail on it)."""
    st, _, data = request(server, "GET", "/metrics", timeout=20)
    if st == 503 and b"--max-connections-per-client" in data:
        return None
    assert st == 200, data[:500]
    return metric(parse_metrics(data.decode())[0], "numoe_http_connections_open")


def test_idle_connections_are_closed_and_do_not_lock_others_out(tight):
    m0, _ = metrics(tight)
    socks = [socket.create_connection((tight.host, tight.port), timeout=30) for _ in range(6)]
    try:
        # the client's cap is taken: another connection is answered 503 at once, and closed
        out = raw_exchange(tight, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503 ") and b"Connection: close" in out, out[:300]
        assert b"--max-connections-per-client" in out, out[:400]
        # the idle ones are closed by the server after --idle-timeout
        for s in socks:
            assert closed_by_server(s), "an idle connection stayed open"
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: open_connections(tight) == 1, 30, "the idle ones gone")
    assert request(tight, "GET", "/health")[0] == 200
    m1, _ = metrics(tight)
    assert metric(m1, "numoe_http_connection_timeouts_total", phase="idle") - \
        metric(m0, "numoe_http_connection_timeouts_total", phase="idle") >= 6
    assert metric(m1, "numoe_http_connections_refused_total", limit="per_client") >= 1


def test_slow_request_is_cut(tight):
    """A request line, then nothing: closed after --request-timeout, counted."""
    m0, _ = metrics(tight)
    assert raw_exchange(tight, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{") == b""
    m1, _ = metrics(tight)
    assert metric(m1, "numoe_http_connection_timeouts_total", phase="request") == \
        metric(m0, "numoe_http_connection_timeouts_total", phase="request") + 1


def test_total_limit_answers_503():
    s = Server(exe_of("build"), V3, ["--workers", 0, "-t", 1, "--max-connections", 3,
                                     "--idle-timeout", 30]).start()
    try:
        socks = [socket.create_connection((s.host, s.port), timeout=30) for _ in range(3)]
        # the accept happens in the daemon's thread: wait until all three are counted
        wait_until(lambda: b"503" in raw_exchange(s, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[:20], 30,
                   "a 503 for the fourth connection")
        out = raw_exchange(s, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503 ") and b"--max-connections)" in out, out[:400]
        for c in socks:
            c.close()
        wait_until(lambda: request(s, "GET", "/health")[0] == 200, 30, "served again")
    finally:
        s.stop_and_check()


@pytest.mark.parametrize("te", [b"gzip", b"gzip, chunked", b"identity", b"chunked, chunked", b"x"])
def test_unsupported_transfer_encoding_is_501(tight, te):
    out = raw_exchange(tight, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + te + b"\r\n\r\nabc")
    assert out.startswith(b"HTTP/1.1 501 ") and b"Connection: close" in out and not out.endswith(b"<open>"), out
    assert b"is not supported (only \\\"chunked\\\")" in out, out


# --------------------------------------------------------------------------- 2. memory

def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))


def test_long_prompts_refused_before_tokenizing(tight):
    """Six 1 MB prompts at once: each refused by its byte length (400 naming the
    field), and the server's peak memory hardly moves (tokenizing each cost ~20 MB)."""
    prompt = "ab " * 340_000
    before = peak_rss_kib(tight.pid)
    res = []

    def one():
        res.append(post_json(tight, COMP, {"prompt": prompt, "max_tokens": 1}, timeout=120))

    th = [threading.Thread(target=one) for _ in range(6)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    for st, js, raw in res:
        assert st == 400 and js["error"]["param"] == "prompt", raw[:300]
        assert re.match(r"the prompt is 1020000 bytes; at most \d+ bytes can fit the context of 512 tokens",
                        js["error"]["message"]), js
    grown = peak_rss_kib(tight.pid) - before
    assert grown < 40 * 1024, f"peak RSS grew {grown} KiB for six refused prompts"
    # a chat with too long a message the same
    st, js, raw = post_json(tight, CHAT, {"messages": [{"role": "user", "content": prompt}]})
    assert st == 400 and js["error"]["param"] == "messages", raw[:300]


def test_body_limit_follows_context(tight):
    m = re.search(r"request bodies up to (\d+) bytes, prompts up to (\d+) bytes", tight.stderr())
    limit = int(m.group(1))
    assert limit < 16 << 20
    with socket.create_connection((tight.host, tight.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (limit + 1))
        out = s.recv(65536)
        assert out.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in out, out[:300]
        assert closed_by_server(s)


# --------------------------------------------------------------------------- 3. health

def test_health_reports_lost_workers_and_recovers(monkeypatch):
    """Worker 1 dies at layer 2 in its first three starts; after two restarts the
    launcher gives it up for now: the request fails, /health is 503 with the reason,
    numoe_up 0, a new request is 503. Its next start (attempt 3) lives: the server
    serves again by itself, and the metrics count restarts and the give-up."""
    monkeypatch.setenv("NUMOE_TEST_FAULT", "1:2:die-until-3")
    monkeypatch.setenv("NUMOE_WORKER_RESTARTS", "2")
    s = Server(exe_of("build"), V3, ["--workers", 2, "-t", 1]).start()
    try:
        body = {"prompt": "hello", "max_tokens": 2, "temperature": 0}
        st, js, raw = post_json(s, COMP, body)
        assert st == 500 and "gave up after 2 restart attempts for now" in js["error"]["message"], raw[:400]
        # until the launcher's next start has registered, the server says it cannot serve
        st, _, hb = request(s, "GET", "/health")
        if st == 503:
            h = json.loads(hb)
            assert h["status"] == "unavailable" and "worker 1" in h["reason"], h
            m, _ = metrics(s)
            assert metric(m, "numoe_up") == 0 and metric(m, "numoe_engine_healthy") == 0, m
        wait_until(lambda: request(s, "GET", "/health")[0] == 200, 60, "/health 200 again")
        st, js, raw = post_json(s, COMP, body)
        assert st == 200 and js["usage"]["completion_tokens"] == 2, raw[:300]
        m, _ = metrics(s)
        assert metric(m, "numoe_up") == 1 and metric(m, "numoe_engine_healthy") == 1
        assert metric(m, "numoe_expert_worker_give_ups_total") == 1
        assert metric(m, "numoe_expert_worker_restarts_total") == 3
        err = s.stderr()
        assert "every expert worker is back; serving again" in err, err[-3000:]
    finally:
        s.stop_and_check()


def test_requests_while_unhealthy_are_503(monkeypatch):
    """The give-up is for good here (the worker keeps dying, restarts every 2 s):
    while it is down, /health and new requests are 503 and name the worker."""
    monkeypatch.setenv("NUMOE_TEST_FAULT", "1:2:die")
    monkeypatch.setenv("NUMOE_WORKER_RESTARTS", "1")
    s = Server(exe_of("build"), V3, ["--workers", 2, "-t", 1]).start()
    try:
        assert post_json(s, COMP, {"prompt": "hello", "max_tokens": 2})[0] == 500
        # the worker is restarted every 2 s and registers (it dies only computing),
        # so the server may be healthy for a moment; the next request kills it again
        def refused():
            st, js, _ = post_json(s, COMP, {"prompt": "hello", "max_tokens": 2})
            return st == 503 and "worker 1" in js["error"]["message"]
        wait_until(refused, 60, "a 503 naming the worker")
        assert metric(metrics(s)[0], "numoe_expert_worker_give_ups_total") >= 1
    finally:
        s.stop_and_check()


# --------------------------------------------------------------------------- 4. framing

def test_content_length_with_chunked_is_refused_and_closed(tight):
    """The bytes after the chunked body would have been answered as a second
    request (smuggling): now the first is a 400 and the connection ends there."""
    out = raw_exchange(tight, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and out.count(b"HTTP/1.1 ") == 1, out
    assert b"both Content-Length and Transfer-Encoding" in out and not out.endswith(b"<open>"), out


@pytest.mark.parametrize("cls,ok", [((b"2", b"3"), False), ((b"2", b"2"), True), ((b"+2",), False),
                                    ((b"2, 2",), False)])
def test_content_length_headers(tight, cls, ok):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + \
        b"".join(b"Content-Length: " + c + b"\r\n" for c in cls) + b"\r\n{}"
    out = raw_exchange(tight, head)
    if ok:  # identical values are one length (RFC 9112 6.3): the body is read and judged
        assert out.startswith(b"HTTP/1.1 400 ") and b"'prompt' is required" in out, out
    else:
        assert out.startswith(b"HTTP/1.1 400 ") and b"Content-Length" in out and not out.endswith(b"<open>"), out


# --------------------------------------------------------------------------- 5. input

@pytest.mark.parametrize("path,body,param", [
    (CHAT, {"messages": [{"role": "user", "content": "a\u0000b"}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "us\u0000er", "content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "x\u0000"}]}]},
     "messages[0].content[0].text"),
    (COMP, {"prompt": "hello\u0000 world"}, "prompt"),
    (COMP, {"prompt": ["\u0000"]}, "prompt[0]"),
    (COMP, {"prompt": "hi", "stop": ["a", "\u0000"]}, "stop[1]"),
])
def test_nul_in_strings_is_400(tight, path, body, param):
    st, js, raw = post_json(tight, path, body)
    assert st == 400 and js["error"]["param"] == param and "NUL" in js["error"]["message"], raw[:300]


def test_nul_in_ollama_strings(tight):
    st, js, raw = post_json(tight, "/api/generate", {"model": "m", "prompt": "a\u0000", "stream": False})
    assert st == 400 and "'prompt' contains a NUL character" in js["error"], raw[:300]
    # an escaped backslash followed by "u0000" is text, not a NUL
    st, js, raw = post_json(tight, COMP, {"prompt": "\\u0000", "max_tokens": 1})
    assert st == 200, raw[:300]


def test_log_lines_escape_client_bytes(tight):
    forged = "numoe serve: GET /forged 200"
    raw_exchange(tight, b"GET /a\x1b[31m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    post_json(tight, CHAT, {"messages": [{"role": "x\n" + forged, "content": "hi"}]})
    err = tight.stderr()
    assert not re.search(r"^numoe serve: GET /forged", err, re.M), err[-2000:]
    assert "\x1b" not in err
    assert "unknown role \\x22x\\x0anumoe serve: GET /forged 200" in err.replace('"', "\\x22"), err[-2000:]


@pytest.mark.parametrize("path", ["/v1/completions%00", "/health%00", "/v1/models/", "/v1/%63ompletions",
                                  "/v1/models%2f"])
def test_paths_match_exactly(tight, path):
    method = "POST" if "ompletions" in path else "GET"
    st, _, data = request(tight, method, path, b"{}" if method == "POST" else None)
    assert st == 404, (path, st, data[:200])


@pytest.mark.parametrize("field,value,msg", [
    ("repeat_penalty", 1e-50, "'repeat_penalty' must be a number > 0, got 1e-50"),
    ("repeat_last_n", 1_000_000_000, "'repeat_last_n' must be an integer between 0 and 65536"),
    ("presence_penalty", 3, "'presence_penalty' must be a number between -2 and 2"),
])
def test_penalty_errors_name_field_and_range(tight, field, value, msg):
    st, js, raw = post_json(tight, COMP, {"prompt": "hi", "max_tokens": 1, field: value})
    assert st == 400 and js["error"]["param"] == field and msg in js["error"]["message"], raw[:300]
    assert "sampler" not in js["error"]["message"], js


# --------------------------------------------------------------------------- 6. secrets, CORS

def test_api_key_file(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret-from-file\n")
    key.chmod(0o644)
    p = subprocess.run([str(exe_of("build")), "serve", "--model", str(V3), "--workers", "0", "--port", "0",
                        "--api-key-file", str(key)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "can be read or written by group or others (mode 644)" in p.stderr, p.stderr
    key.chmod(0o600)
    s = Server(exe_of("build"), V3, ["--workers", 0, "-t", 1, "--api-key-file", key]).start()
    try:
        assert "s3cret" not in open(f"/proc/{s.pid}/cmdline", "rb").read().decode(errors="replace")
        assert request(s, "GET", "/v1/models")[0] == 401
        s.api_key = "s3cret-from-file"
        assert request(s, "GET", "/v1/models")[0] == 200
        assert "warning: --api-key" not in s.stderr()
    finally:
        s.stop_and_check()


def test_api_key_from_environment_and_warning(monkeypatch):
    monkeypatch.setenv("NUMOE_API_KEY", "env-key")
    s = Server(exe_of("build"), V3, ["--workers", 0, "-t", 1]).start()
    try:
        assert request(s, "GET", "/v1/models")[0] == 401
        s.api_key = "env-key"
        assert request(s, "GET", "/v1/models")[0] == 200
    finally:
        s.stop_and_check()
    monkeypatch.delenv("NUMOE_API_KEY")
    s = Server(exe_of("build"), V3, ["--workers", 0, "-t", 1, "--api-key", "k"]).start()
    try:
        assert "warning: --api-key puts the key on the command line" in s.stderr()
    finally:
        s.stop_and_check()


def test_no_foreign_origin_without_key(tight):
    st, hdr, body = request(tight, "POST", COMP, {"prompt": "hi", "max_tokens": 1},
                            headers={"Origin": "http://evil.example"})
    assert st == 403 and "access-control-allow-origin" not in hdr, (st, hdr)
    assert b"--cors-origin http://evil.example" in body, body
    st, hdr, _ = request(tight, "OPTIONS", COMP, headers={"Origin": "http://evil.example",
                                                          "Access-Control-Request-Method": "POST"})
    assert st == 403 and "access-control-allow-origin" not in hdr
    st, hdr, _ = request(tight, "GET", "/v1/models")  # no Origin: not a browser, served
    assert st == 200 and "access-control-allow-origin" not in hdr


def test_cors_origin_option():
    s = Server(exe_of("build"), V3, ["--workers", 0, "-t", 1, "--cors-origin", "http://localhost:3000",
                                     "--cors-origin", "http://ui.example"]).start()
    try:
        for origin in ("http://localhost:3000", "http://ui.example"):
            st, hdr, _ = request(s, "GET", "/v1/models", headers={"Origin": origin})
            assert st == 200 and hdr.get("access-control-allow-origin") == origin and hdr.get("vary") == "Origin"
        assert request(s, "GET", "/v1/models", headers={"Origin": "http://localhost:3001"})[0] == 403
    finally:
        s.stop_and_check()


def test_help_names_every_new_option():
    p = subprocess.run([str(exe_of("build")), "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0
    for opt in ("--api-key-file FILE", "--api-key KEY", "--cors-origin ORIGIN", "--max-connections N",
                "--max-connections-per-client N", "--idle-timeout S", "--request-timeout S", "NUMOE_API_KEY"):
        assert opt in p.stdout, opt
