"""Shared helpers for the `numoe serve` tests (tests/test_serve*.py): start and
stop a server (`--port 0`: the OS picks a free port and the server's
"listening" line says which, so parallel tests never race for one), plain-HTTP
requests with timeouts, SSE / NDJSON readers, Prometheus text parsing, and the
tokenizer's token counts.

Every network call has a timeout, so a hung server fails a test instead of
hanging CI."""
import functools
import http.client
import json
import os
import re
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import ROOT, sanitizer_env

MODELS = ROOT / "tests" / "fixtures" / "models"
V3 = MODELS / "deepseek-v3-tiny-F32-mla.gguf"
V2 = MODELS / "deepseek-v2-tiny-F32-legacy.gguf"
V3_NAME = "deepseek-v3-tiny-F32-mla"
FIXTURE_CTX = 512  # context_length of the tiny fixtures (numoe's default -c)
BOS = "<｜begin▁of▁sentence｜>"
TIMEOUT = 60  # seconds, any single HTTP exchange
SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer",
                     "ThreadSanitizer")
# the ready line; an IPv6 address in brackets
LISTENING = re.compile(r"numoe serve: listening on http://(\[[0-9a-fA-F:.]+\]|[^:\s\[]+):(\d+) \(model (.*)\)")
LOADING = re.compile(r"numoe serve: loading .* \(http://(\[[0-9a-fA-F:.]+\]|[^:\s\[]+):(\d+)/health answers 503")


def exe_of(tree):
    """build/bin/numoe or build-asan/bin/numoe; fails (build) or skips (asan) when missing."""
    path = ROOT / tree / "bin" / "numoe"
    if not path.exists():
        if tree == "build":
            pytest.fail("build/bin/numoe is not built: run `make`")
        pytest.skip("no sanitizer build (make BUILD=build-asan SAN=1)")
    return path


def end_process(proc):
    """Stops a `numoe serve` that a test gives up on: SIGTERM first, so the
    launcher takes its coordinator and workers with it; SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def wait_listening(proc, read_log, timeout, what="server"):
    """The (host, port) of the "listening" line a `numoe serve` started with
    --port 0 prints once /health answers 200; fails when PROC exits first or
    the line does not come within TIMEOUT seconds."""
    end = time.time() + timeout
    while True:
        m = LISTENING.search(read_log())
        if m:
            return m.group(1).strip("[]"), int(m.group(2))
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} before listening:\n{read_log()[-3000:]}")
        if time.time() > end:
            end_process(proc)
            pytest.fail(f"{what}: no listening line after {timeout} s:\n{read_log()[-3000:]}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- tokenizer

def _tokenizer_exe():
    for tree in ("build", "build-asan"):
        p = ROOT / tree / "bin" / "numoe"
        if p.exists():
            return p
    pytest.fail("numoe is not built")


@functools.lru_cache(maxsize=None)
def token_ids(model, text, bos=True):
    """Token ids of TEXT under MODEL's tokenizer, special-token text matched
    (`numoe tokenize --special`); bos=False: --no-bos. Bytes that are not
    UTF-8 can be given as surrogate escapes ("\\udcff" is the byte 0xff)."""
    cmd = [str(_tokenizer_exe()), "tokenize", "-m", str(model), "--ids", "--special", "-q", "--file", "-"]
    if not bos:
        cmd.insert(-2, "--no-bos")
    p = subprocess.run(cmd, input=text.encode("utf-8", "surrogateescape"), capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    out = p.stdout.decode().strip()
    return tuple(int(x) for x in out.split(",")) if out else ()


def render_v3(messages, force_think=False):
    """deepseek3 chat template with the generation prompt (coordinator/text/chat_template.h)."""
    sys_txt = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = BOS + sys_txt
    for m in messages:
        if m["role"] == "user":
            out += "<｜User｜>" + m["content"] + "<｜Assistant｜>"
        elif m["role"] == "assistant":
            out += m["content"] + "<｜end▁of▁sentence｜>"
    if messages[-1]["role"] != "user":
        out += "<｜Assistant｜>"
    if force_think:
        out += "<think>\n"
    return out


def render_v2(messages):
    """deepseek2 chat template with the generation prompt."""
    out = BOS
    for m in messages:
        if m["role"] == "system":
            out += m["content"] + "\n\n"
        elif m["role"] == "user":
            out += "User: " + m["content"] + "\n\n"
        elif m["role"] == "assistant":
            out += "Assistant: " + m["content"] + "<｜end▁of▁sentence｜>"
    return out + "Assistant:"


def chat_prompt_tokens(model, messages, force_think=False):
    text = render_v2(messages) if "v2" in os.path.basename(str(model)) else render_v3(messages, force_think)
    return len(token_ids(model, text, bos=False))  # the template already starts with BOS


def completion_prompt_tokens(model, prompt):
    return len(token_ids(model, prompt, bos=True))


# --------------------------------------------------------------------------- the server

class Server:
    """One `numoe serve --port 0` process; stderr goes to a file (read with .stderr())."""

    def __init__(self, exe, model, args=(), tree="build", host="127.0.0.1"):
        self.exe, self.model, self.args, self.tree = exe, model, list(args), tree
        self.proc = None
        self.port = None
        self.host = host
        self.api_key = None
        if "--api-key" in self.args:
            self.api_key = self.args[self.args.index("--api-key") + 1]

    @property
    def url(self):
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

    @property
    def pid(self):
        return self.proc.pid

    def start(self, timeout=90):
        """Starts it and waits (up to TIMEOUT s) for its listening line; the
        line comes only once the model is loaded, so /health must then be 200."""
        self._err = tempfile.NamedTemporaryFile(prefix="numoe-serve-", suffix=".log", delete=False)
        self.started = time.time()
        self.cmd = [str(self.exe), "serve", "--model", str(self.model), "--host", self.host, "--port", "0"] + \
            [str(a) for a in self.args]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._err, env=sanitizer_env())
        try:
            host, self.port = wait_listening(self.proc, self.stderr, timeout, " ".join(self.cmd))
            assert host == self.host and self.port > 0, self.stderr()[-2000:]
            st, _, body = request(self, "GET", "/health", timeout=10)
            assert (st, json.loads(body)) == (200, {"status": "ok"}), (st, body[:200])
        except BaseException:  # pytest.fail too: no server left running behind a failed start
            end_process(self.proc)
            raise
        return self

    def stderr(self):
        try:
            with open(self._err.name, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def children(self):
        """Pids of the server's child processes (e.g. numoe-worker)."""
        kids = []
        try:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{tid}/children") as f:
                    kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
        return sorted(set(kids))

    def rss_kib(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Signals the server, waits; returns (exit code, stderr). Kills it on timeout."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
                raise AssertionError(f"server did not exit within {timeout} s of {sig!r}\n"
                                     f"{self.stderr()[-3000:]}")
        err = self.stderr()
        try:
            os.unlink(self._err.name)
        except OSError:
            pass
        return self.proc.returncode, err

    def stop_and_check(self, timeout=60):
        kids = self.children()
        rc, err = self.stop(timeout=timeout)
        check_clean_exit(rc, err, kids)
        return err


def check_clean_exit(rc, err, kids=()):
    for m in SANITIZER_MARKERS:
        assert m not in err, err[-4000:]
    assert rc == 0, f"exit code {rc}\n{err[-3000:]}"
    end = time.time() + 10
    left = list(kids)
    while left and time.time() < end:
        left = [k for k in left if _is_live(k)]
        time.sleep(0.05)
    assert not left, f"worker processes left after the server exited: {left}"


def _is_live(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- HTTP

def _headers(server, headers):
    h = {}
    if server is not None and server.api_key:
        h["Authorization"] = f"Bearer {server.api_key}"
    h.update(headers or {})
    return {k: v for k, v in h.items() if v is not None}  # None: leave the header out


def request(server, method, path, body=None, headers=None, timeout=TIMEOUT):
    """One exchange; returns (status, headers dict (lower-case names), body bytes)."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=_headers(server, headers))
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        conn.close()


def post_json(server, path, obj, timeout=TIMEOUT, headers=None):
    """POST obj; returns (status, parsed JSON or None, raw bytes)."""
    st, _, data = request(server, "POST", path, obj, headers=headers, timeout=timeout)
    try:
        js = json.loads(data)
    except ValueError:
        js = None
    return st, js, data


def get_json(server, path, timeout=TIMEOUT):
    st, _, data = request(server, "GET", path, timeout=timeout)
    return st, json.loads(data)


def stream_lines(server, path, obj, timeout=TIMEOUT):
    """POST obj and yield (status, content-type) then every response line (str, no newline)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(obj).encode(),
                     headers=_headers(server, {"Content-Type": "application/json"}))
        r = conn.getresponse()
        yield r.status, r.getheader("Content-Type", "")
        while True:
            line = r.readline()
            if not line:
                break
            yield line.decode("utf-8").rstrip("\r\n")
    finally:
        conn.close()


def sse(server, path, obj, timeout=TIMEOUT):
    """A whole SSE response: (status, content-type, [parsed JSON events], saw_done, events_after_done)."""
    it = stream_lines(server, path, obj, timeout)
    status, ctype = next(it)
    events, done, after = [], False, 0
    if status != 200:
        rest = "\n".join(it)
        return status, ctype, [rest], False, 0
    for line in it:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            continue
        if done:
            after += 1
        events.append(json.loads(payload))
    return status, ctype, events, done, after


def ndjson(server, path, obj, timeout=TIMEOUT):
    it = stream_lines(server, path, obj, timeout)
    status, ctype = next(it)
    lines = [l for l in it if l.strip()]
    if status != 200:
        return status, ctype, lines
    return status, ctype, [json.loads(l) for l in lines]


def chat_stream_text(events):
    """(reasoning, content, finish_reason, usage) of a chat-completion SSE stream."""
    reasoning, content, finish, usage = "", "", None, None
    for ev in events:
        for ch in ev.get("choices") or []:
            d = ch.get("delta") or {}
            reasoning += d.get("reasoning_content") or ""
            content += d.get("content") or ""
            if ch.get("finish_reason"):
                assert finish is None, "two finish_reasons in one stream"
                finish = ch["finish_reason"]
        if ev.get("usage"):
            usage = ev["usage"]
    return reasoning, content, finish, usage


def completion_stream_text(events):
    text, finish, usage = "", None, None
    for ev in events:
        for ch in ev.get("choices") or []:
            text += ch.get("text") or ""
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
        if ev.get("usage"):
            usage = ev["usage"]
    return text, finish, usage


# --------------------------------------------------------------------------- /metrics

_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)')


def parse_metrics(text):
    """({(name, frozenset(labels)): value}, {name: type})."""
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                types[parts[2]] = parts[3]
            continue
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"bad metrics line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples, types


def metrics(server):
    st, hdr, data = request(server, "GET", "/metrics", timeout=20)
    assert st == 200, data[:500]
    return parse_metrics(data.decode())


def metric_sum(samples, name, **labels):
    """Sum of NAME's series with LABELS (0 when there is none: a labelled
    counter's series appears with its first event)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def metric(samples, name, **labels):
    """The value of the one series NAME{LABELS}; fails when it is missing."""
    want = set(labels.items())
    got = [v for (n, ls), v in samples.items() if n == name and set(ls) == want]
    assert len(got) == 1, f"no series {name}{labels} in {sorted({n for n, _ in samples})}"
    return got[0]


def series(samples, name):
    """{frozenset(labels): value} of every series of NAME."""
    return {ls: v for (n, ls), v in samples.items() if n == name}


def check_prometheus(text):
    """The exposition format's rules a scraper relies on: every sample belongs to a
    family declared by a # TYPE line before it, no series twice, histogram buckets
    never decrease and +Inf equals _count, counters are >= 0."""
    types, seen, hist = {}, set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(maxsplit=3)
            assert name not in types, f"family {name} declared twice"
            types[name] = typ
            continue
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"bad metrics line: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        fam = name
        for suf in ("_bucket", "_sum", "_count"):
            if name.endswith(suf) and types.get(name[: -len(suf)]) == "histogram":
                fam = name[: -len(suf)]
        assert fam in types, f"{name}: no # TYPE before it"
        key = (name, labels)
        assert key not in seen, f"series twice: {line}"
        seen.add(key)
        if types[fam] == "counter":
            assert value >= 0, line
        if types[fam] == "histogram":
            ls = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
            le = ls.pop("le", None)
            h = hist.setdefault((fam, tuple(sorted(ls.items()))), {"buckets": [], "count": None})
            if name.endswith("_bucket"):
                h["buckets"].append((float(le), value))
            elif name.endswith("_count"):
                h["count"] = value
    for (fam, ls), h in hist.items():
        b = h["buckets"]
        assert b and b[-1][0] == float("inf"), f"{fam}{ls}: no +Inf bucket"
        assert all(b[i][0] < b[i + 1][0] and b[i][1] <= b[i + 1][1] for i in range(len(b) - 1)), f"{fam}{ls}: {b}"
        assert h["count"] == b[-1][1], f"{fam}{ls}: _count {h['count']} != +Inf bucket {b[-1][1]}"
    return types
