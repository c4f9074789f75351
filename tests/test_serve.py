"""`numoe serve`: the OpenAI- and Ollama-compatible HTTP server with continuous
batching (coordinator/cli/serve.c, coordinator/serve/), driven over real
sockets with the official `openai` client and plain HTTP, against the tiny
V3 fixture (and the V2 one for a served name / API key / deepseek2 template).

* OpenAI chat and completions, whole and streamed (SSE framing, [DONE], the
  first chunk's role, include_usage): usage.prompt_tokens equals
  `numoe tokenize` on the chat template's rendering (chat) or on the prompt
  with BOS (completions); completion_tokens / finish_reason "length" at
  max_tokens (and at the context without max_tokens); stop strings cut the
  text before them (streamed too, held-back text released); a seed gives the
  same sampled text, alone or batched; /v1/models has the GGUF name (split
  suffix dropped, --served-model-name); --api-key; --force-think reasoning.
* Greedy completions equal `numoe generate --prompt`, alone and batched, also
  for a prompt whose prefill spans two --chunk-size steps.
* Ollama /api/chat, /api/generate (NDJSON stream and stream:false, raw,
  options.stop, thinking), /api/tags, /api/version; the greedy answers equal
  the OpenAI ones.
* /health, CORS preflight and /metrics (the request counters grow; scheduler
  gauges go back to 0).
* Continuous batching: 8 greedy prompts sent together give the texts they give
  alone; 32 streaming clients against --max-batch-size 4 all finish with the
  texts they give alone (never more than 4 running), and a second round of 32
  does not grow the RSS.
* A client that goes away (streamed or not, running or queued) has its
  request cancelled (the gauges go back to 0, the cancelled counter grows) and
  the server goes on; --cache-lens holds requests in the queue until their
  prompt + max_tokens fit.
* SIGTERM with a stream running, a request queued, idle and half-sent
  connections, and SIGINT: exit 0, no worker left, no sanitizer report.
Every server runs from build/ and, when it exists, build-asan/."""
import concurrent.futures as cf
import json
import re
import signal
import socket
import threading
import time

import openai
import pytest

from conftest import run
from serve_util import (
    FIXTURE_CTX, V2, V3, V3_NAME, Server, chat_prompt_tokens, chat_stream_text, check_clean_exit, check_prometheus,
    completion_prompt_tokens, completion_stream_text, exe_of, gauges_named, get_json, metric_sum, metrics,
    ndjson, post_json, request, sse, stream_lines,
)

TEXT = "The engine reads the weights of the model."
PROMPTS = [
    "hi",
    "What is the capital of France?",
    "Write a haiku about memory bandwidth.",
    "1, 2, 3, 4,",
    "Explain mixture of experts in one sentence.",
    "The quick brown fox",
    "def fib(n):",
    "Zwei Wörter auf Deutsch, bitte.",
]
MAX_BATCH = 4


@pytest.fixture(scope="module", params=["build", "build-asan"])
def tree(request):
    exe_of(request.param)  # skips a missing asan tree
    return request.param


@pytest.fixture(scope="module")
def server(tree):
    s = Server(exe_of(tree), V3, ["--max-batch-size", MAX_BATCH, "-t", "2"], tree).start()
    yield s
    s.stop_and_check()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=60, max_retries=0)


def msgs(text):
    return [{"role": "user", "content": text}]


def chat(client, text, max_tokens=24, **kw):
    kw.setdefault("temperature", 0)
    extra = kw.pop("extra_body", {})
    if kw.pop("ignore_eos", True):
        extra["ignore_eos"] = True
    return client.chat.completions.create(model=V3_NAME, messages=msgs(text), max_tokens=max_tokens,
                                          extra_body=extra, **kw)


def answer(message):
    """(reasoning, content) of a chat message (reasoning_content is an extra field)."""
    return (getattr(message, "reasoning_content", None) or "", message.content or "")


def stream_chat(client, text, max_tokens=24, model=V3_NAME, **kw):
    """(reasoning, content, finish_reason, usage, chunks) of a streamed chat via the openai client."""
    kw.setdefault("temperature", 0)
    extra = kw.pop("extra_body", {})
    if kw.pop("ignore_eos", True):
        extra["ignore_eos"] = True
    chunks = list(client.chat.completions.create(
        model=model, messages=msgs(text), max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body=extra, **kw))
    reasoning = content = ""
    finish, usage = None, None
    for c in chunks:
        for ch in c.choices:
            reasoning += getattr(ch.delta, "reasoning_content", None) or ""
            content += ch.delta.content or ""
            if ch.finish_reason:
                assert finish is None
                finish = ch.finish_reason
        if c.usage:
            usage = c.usage
    return reasoning, content, finish, usage, chunks


def greedy_chat_raw(server, text, max_tokens=24, stream=False, **extra):
    """Plain-HTTP greedy chat, ignore_eos; returns (reasoning, content, finish, usage)."""
    body = {"model": V3_NAME, "messages": msgs(text), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
        st, ctype, events, done, after = sse(server, "/v1/chat/completions", body)
        assert st == 200 and done and after == 0, (st, events[:3])
        return chat_stream_text(events)
    st, js, raw = post_json(server, "/v1/chat/completions", body)
    assert st == 200, raw[:500]
    m = js["choices"][0]["message"]
    return m.get("reasoning_content") or "", m["content"], js["choices"][0]["finish_reason"], js["usage"]


def clean_piece(text, at, n=2):
    """A stop string of N characters of TEXT, from AT on (else before it): printable,
    not only whitespace, no replacement character, and not at the very start."""
    for i in list(range(at, len(text) - n)) + list(range(at - 1, 0, -1)):
        s = text[i:i + n]
        if s.strip() and "\ufffd" not in s and s.isprintable() and text.index(s) > 0:
            return s
    pytest.skip(f"no usable stop string in {text!r}")


# ---------------------------------------------------------------------------- basics

def test_listening_line_and_health(server):
    m = re.search(r"numoe serve: listening on http://([^:\s]+):(\d+) \(model (.*)\)", server.stderr())
    assert m, server.stderr()[-2000:]
    assert m.group(1) == "127.0.0.1" and int(m.group(2)) == server.port and m.group(3) == V3_NAME
    st, js = get_json(server, "/health")
    assert st == 200 and js == {"status": "ok"}


def test_models_and_version(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [V3_NAME]
    st, js = get_json(server, "/v1/models")
    assert st == 200 and js["object"] == "list" and js["data"][0]["object"] == "model"
    st, tags = get_json(server, "/api/tags")
    assert st == 200 and len(tags["models"]) == 1
    assert tags["models"][0]["name"].split(":")[0] == V3_NAME, tags
    st, ver = get_json(server, "/api/version")
    assert st == 200 and isinstance(ver.get("version"), str) and ver["version"]


def test_chat_completion(client):
    r = chat(client, "hi", max_tokens=16)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl") and r.model == V3_NAME
    assert len(r.choices) == 1 and r.choices[0].index == 0
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert "".join(answer(msg)), "empty answer"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == chat_prompt_tokens(V3, msgs("hi"))
    assert r.usage.completion_tokens == 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + 16


def test_chat_stream_equals_whole(client):
    whole = chat(client, TEXT, max_tokens=20)
    reasoning, content, finish, usage, chunks = stream_chat(client, TEXT, max_tokens=20)
    assert (reasoning, content) == answer(whole.choices[0].message)
    assert finish == "length"
    assert usage.prompt_tokens == whole.usage.prompt_tokens == chat_prompt_tokens(V3, msgs(TEXT))
    assert usage.completion_tokens == 20
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the include_usage chunk
    assert all(c.id == chunks[0].id for c in chunks) and chunks[0].object == "chat.completion.chunk"


def test_multi_turn_and_system_prompt_tokens(client):
    conv = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}]
    r = client.chat.completions.create(model=V3_NAME, messages=conv, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == chat_prompt_tokens(V3, conv)
    # a conversation that ends with an assistant turn gets the generation prompt after it
    r = client.chat.completions.create(model=V3_NAME, messages=conv[:3], max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == chat_prompt_tokens(V3, conv[:3])
    # content as an array of text parts is the parts joined with "\n" (as llama.cpp's server and vLLM do)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    a = client.chat.completions.create(model=V3_NAME, messages=parts, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    b = chat(client, "Hi\nthere", max_tokens=8)
    assert answer(a.choices[0].message) == answer(b.choices[0].message)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_completion(client):
    r = client.completions.create(model=V3_NAME, prompt=TEXT, max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl") and r.model == V3_NAME
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.prompt_tokens == completion_prompt_tokens(V3, TEXT)
    assert r.usage.completion_tokens == 16
    text = ""
    usage = None
    for c in client.completions.create(model=V3_NAME, prompt=TEXT, max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        for ch in c.choices:
            text += ch.text or ""
        usage = c.usage or usage
    assert text == r.choices[0].text
    assert usage.prompt_tokens == r.usage.prompt_tokens and usage.completion_tokens == 16
    # a prompt given as an array of one string
    a = client.completions.create(model=V3_NAME, prompt=[TEXT], max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert a.choices[0].text == r.choices[0].text


def _norm(text):
    return re.sub("\ufffd+", "\ufffd", text)  # invalid UTF-8 may be replaced per byte or per sequence


def test_matches_numoe_generate(server):
    """Greedy completions equal `numoe generate --prompt` (one prompt longer than a
    --chunk-size step, so its prefill is split), alone and sent together."""
    long_prompt = " ".join(f"{w}{i % 7}" for i, w in enumerate(("alpha beta gamma delta epsilon " * 12).split()))
    prompts = [TEXT, "hi", long_prompt]
    assert 256 < completion_prompt_tokens(V3, long_prompt) < FIXTURE_CTX - 24
    want = []
    for p in prompts:
        g = run([server.exe, "generate", "-m", V3, "--prompt", p, "-n", 24, "--ignore-eos", "-t", 2], timeout=120)
        assert g.returncode == 0, g.stderr[-2000:]
        want.append(_norm(g.stdout.rstrip("\n")))

    def one(p):
        st, js, raw = post_json(server, "/v1/completions", {"prompt": p, "max_tokens": 24, "temperature": 0,
                                                            "ignore_eos": True})
        assert st == 200, raw[:300]
        return _norm(js["choices"][0]["text"])

    assert [one(p) for p in prompts] == want
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        assert list(ex.map(one, prompts * 2)) == want * 2


def test_default_max_tokens_fills_context(client):
    """Without max_tokens a request may run to the end of its context."""
    n = completion_prompt_tokens(V3, TEXT)
    r = client.completions.create(model=V3_NAME, prompt=TEXT, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == FIXTURE_CTX - n


def test_cors_preflight(server):
    st, hdr, _ = request(server, "OPTIONS", "/v1/chat/completions",
                         headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST",
                                  "Access-Control-Request-Headers": "authorization, content-type"})
    assert st in (200, 204) and hdr.get("access-control-allow-origin") == "*"
    assert "POST" in hdr.get("access-control-allow-methods", "")


def test_sse_framing(server):
    body = {"messages": msgs("hi"), "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True}
    lines = list(stream_lines(server, "/v1/chat/completions", body))
    st, ctype = lines[0]
    assert st == 200 and ctype.startswith("text/event-stream"), lines[:3]
    data = [l for l in lines[1:] if l.strip()]
    assert all(l.startswith("data: ") for l in data), data
    assert data[-1] == "data: [DONE]" and data.count("data: [DONE]") == 1
    events = [json.loads(l[6:]) for l in data[:-1]]
    assert all(ev.get("usage") is None for ev in events)  # no include_usage: no usage chunk
    reasoning, content, finish, _ = chat_stream_text(events)
    assert finish == "length"
    assert greedy_chat_raw(server, "hi", 6)[:3] == (reasoning, content, "length")
    # the completion endpoint's stream ends the same way
    body = {"prompt": TEXT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    st, ctype, events, done, after = sse(server, "/v1/completions", body)
    assert st == 200 and done and after == 0
    text, finish, usage = completion_stream_text(events)
    assert finish == "length" and usage["completion_tokens"] == 6
    assert usage["prompt_tokens"] == completion_prompt_tokens(V3, TEXT)


def test_finish_length_counts(client):
    for n in (1, 2, 5):
        r = client.completions.create(model=V3_NAME, prompt=TEXT, max_tokens=n, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == n
    # max_completion_tokens is max_tokens' newer name
    r = client.chat.completions.create(model=V3_NAME, messages=msgs("hi"), max_completion_tokens=3,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    # without ignore_eos: "stop" only before the limit
    r = chat(client, TEXT, max_tokens=40, ignore_eos=False)
    fr = r.choices[0].finish_reason
    assert fr in ("stop", "length")
    assert (r.usage.completion_tokens < 40) if fr == "stop" else (r.usage.completion_tokens == 40)


def test_stop_strings(server, client):
    full = client.completions.create(model=V3_NAME, prompt=TEXT, max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = clean_piece(full, len(full) // 2)
    want = full[: full.index(stop)]
    r = client.completions.create(model=V3_NAME, prompt=TEXT, max_tokens=40, temperature=0, stop=stop,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40
    # a list: the earliest match wins, strings that never occur do not matter
    stop2 = clean_piece(full, len(full) // 4)
    first = min(full.index(stop), full.index(stop2))
    r = client.completions.create(model=V3_NAME, prompt=TEXT, max_tokens=40, temperature=0,
                                  stop=["\u2603never\u2603", stop, stop2], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:first] and r.choices[0].finish_reason == "stop"
    # streamed: no delta leaks any part of the stop string
    text = ""
    finish = None
    for c in client.completions.create(model=V3_NAME, prompt=TEXT, max_tokens=40, temperature=0, stop=stop,
                                       stream=True, extra_body={"ignore_eos": True}):
        for ch in c.choices:
            text += ch.text or ""
            finish = ch.finish_reason or finish
    assert text == want and finish == "stop"
    # text held back because it might start a stop string is released when the stop never completes,
    # a stop at the very start leaves nothing, and one that is only in the prompt does not count
    for st_ in ([full[-1] + "\u2603"], [full[-3:] + "\u2603\u2603"]):
        for stream in (False, True):
            body = {"prompt": TEXT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stop": st_}
            if stream:
                _, _, events, done, _ = sse(server, "/v1/completions", {**body, "stream": True})
                got, fin, _ = completion_stream_text(events)
            else:
                js = post_json(server, "/v1/completions", body)[1]
                got, fin = js["choices"][0]["text"], js["choices"][0]["finish_reason"]
            assert (got, fin) == (full, "length"), (st_, stream)
    # a multi-byte character (its bytes may come in separate tokens)
    hi = client.completions.create(model=V3_NAME, prompt="hi", max_tokens=40, temperature=0,
                                   extra_body={"ignore_eos": True}).choices[0].text
    wide = [ch for ch in hi if ord(ch) > 127 and ch != "\ufffd"]
    if wide:
        for stream in (False, True):
            body = {"prompt": "hi", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stop": wide[0]}
            if stream:
                got, fin, _ = completion_stream_text(sse(server, "/v1/completions", {**body, "stream": True})[2])
            else:
                js = post_json(server, "/v1/completions", body)[1]
                got, fin = js["choices"][0]["text"], js["choices"][0]["finish_reason"]
            assert (got, fin) == (hi[: hi.index(wide[0])], "stop"), (wide[0], stream)
    r = client.completions.create(model=V3_NAME, prompt=TEXT, max_tokens=40, temperature=0, stop=full[:2],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=V3_NAME, prompt=TEXT, max_tokens=40, temperature=0, stop="engine",
                                  extra_body={"ignore_eos": True})
    assert "engine" in full or r.choices[0].text == full
    # chat: the stop string cuts the answer
    reasoning, content, _, _ = greedy_chat_raw(server, TEXT, 40)
    if reasoning:
        pytest.skip("the greedy chat answer has a reasoning block; chat stop check needs plain content")
    cstop = clean_piece(content, len(content) // 2)
    reasoning2, content2, finish, _ = greedy_chat_raw(server, TEXT, 40, stop=[cstop])
    assert content2 == content[: content.index(cstop)] and finish == "stop"
    r2, c2, f2, _ = greedy_chat_raw(server, TEXT, 40, stream=True, stop=[cstop])
    assert c2 == content2 and f2 == "stop"


def test_seed_reproducible(client):
    def sample(seed, **kw):
        r = chat(client, TEXT, max_tokens=24, temperature=1.0, seed=seed, **kw)
        return answer(r.choices[0].message)

    a, b = sample(1234), sample(1234)
    assert a == b
    assert len({sample(s) for s in (1, 2, 3)}) >= 2, "different seeds gave the same sampled text"
    # sampled with the other knobs too
    kw = dict(top_p=0.9, extra_body={"top_k": 40, "min_p": 0.01, "repeat_penalty": 1.1},
              presence_penalty=0.5, frequency_penalty=0.2)
    assert sample(99, **kw) == sample(99, **kw)
    # seeded requests sent together give what they give alone
    alone = [sample(s) for s in (11, 12, 13, 14)]
    with cf.ThreadPoolExecutor(4) as ex:
        together = list(ex.map(sample, (11, 12, 13, 14)))
    assert together == alone


# ---------------------------------------------------------------------------- Ollama

def test_ollama_chat(server, client):
    body = {"model": V3_NAME, "messages": msgs(TEXT), "options": {"num_predict": 12, "temperature": 0}}
    st, ctype, lines = ndjson(server, "/api/chat", body)
    assert st == 200 and "ndjson" in ctype, (st, ctype, lines[:2])
    assert all(l["done"] is False for l in lines[:-1]) and lines[-1]["done"] is True
    streamed = "".join(l.get("message", {}).get("content", "") for l in lines)
    final = lines[-1]
    assert final["model"].split(":")[0] == V3_NAME
    assert final["prompt_eval_count"] == chat_prompt_tokens(V3, msgs(TEXT))
    assert 1 <= final["eval_count"] <= 12
    st, one, raw = post_json(server, "/api/chat", {**body, "stream": False})
    assert st == 200 and one["done"] is True, raw[:300]
    assert one["message"]["role"] == "assistant" and one["message"]["content"] == streamed
    assert one["prompt_eval_count"] == final["prompt_eval_count"] and one["eval_count"] == final["eval_count"]
    # the same greedy answer as the OpenAI endpoint
    r = chat(client, TEXT, max_tokens=12, ignore_eos=False)
    if not answer(r.choices[0].message)[0]:
        assert r.choices[0].message.content == streamed
        assert r.usage.completion_tokens == final["eval_count"]


def test_ollama_generate(server, client):
    body = {"model": V3_NAME, "prompt": TEXT, "options": {"num_predict": 10, "temperature": 0, "seed": 3}}
    st, ctype, lines = ndjson(server, "/api/generate", body)
    assert st == 200 and "ndjson" in ctype and lines[-1]["done"] is True, (st, lines[:2])
    streamed = "".join(l.get("response", "") for l in lines)
    assert lines[-1]["prompt_eval_count"] == chat_prompt_tokens(V3, msgs(TEXT))  # templated as a user turn
    assert 1 <= lines[-1]["eval_count"] <= 10
    st, one, raw = post_json(server, "/api/generate", {**body, "stream": False})
    assert st == 200 and one["done"] is True and one["response"] == streamed, raw[:300]
    # raw: the prompt untemplated, like /v1/completions
    st, rawgen, data = post_json(server, "/api/generate", {**body, "raw": True, "stream": False})
    assert st == 200, data[:300]
    assert rawgen["prompt_eval_count"] == completion_prompt_tokens(V3, TEXT)
    c = client.completions.create(model=V3_NAME, prompt=TEXT, max_tokens=10, temperature=0)
    assert rawgen["response"] == c.choices[0].text
    # options.stop
    full = rawgen["response"]
    if len(full) > 4:
        stop = clean_piece(full, len(full) // 2)
        st, cut, _ = post_json(server, "/api/generate",
                               {**body, "raw": True, "stream": False,
                                "options": {**body["options"], "stop": [stop]}})
        assert st == 200 and cut["response"] == full[: full.index(stop)]


# ---------------------------------------------------------------------------- /metrics

def test_metrics(server, client):
    st, hdr, data = request(server, "GET", "/metrics")
    assert st == 200 and hdr.get("content-type", "").startswith("text/plain")
    check_prometheus(data.decode())
    samples, types = metrics(server)
    assert types.get("numoe_http_requests_total") == "counter"
    assert any(n.startswith("numoe_") and "http" not in n and n != "numoe_up" for n, _ in samples), \
        "no scheduler metrics"
    assert gauges_named(types, "queue"), f"no queue gauge in {sorted(types)}"
    assert gauges_named(types, *ACTIVE), f"no active gauge in {sorted(types)}"
    before_models = metric_sum(samples, "numoe_http_requests_total", path="/v1/models", status="200")
    before_chat = metric_sum(samples, "numoe_http_requests_total", path="/v1/chat/completions", status="200")
    before_404 = metric_sum(samples, "numoe_http_requests_total", status="404")
    before_tok = {n: v for (n, ls), v in samples.items() if types.get(n) == "counter" and "token" in n}
    assert before_tok, "no token counters"

    client.models.list()
    client.models.list()
    chat(client, "hi", max_tokens=5)
    assert request(server, "GET", "/no/such/path")[0] == 404

    # requests are counted when their connection lets go, a moment after the client has the answer
    def grown(sm, ty):
        return (metric_sum(sm, "numoe_http_requests_total", path="/v1/models", status="200") >= before_models + 2
                and metric_sum(sm, "numoe_http_requests_total", path="/v1/chat/completions",
                               status="200") >= before_chat + 1
                and metric_sum(sm, "numoe_http_requests_total", status="404") >= before_404 + 1
                and any(metric_sum(sm, n) > v for n, v in before_tok.items()))

    _wait_metrics(server, grown, "the request and token counters to grow", timeout=10)
    # idle again
    _wait_metrics(server, lambda sm, ty: _gauge(sm, ty, "queue", *ACTIVE) == 0, "idle gauges", timeout=5)


# ---------------------------------------------------------------------------- continuous batching

def test_batched_equals_alone(server):
    alone = [greedy_chat_raw(server, p, 24)[:3] for p in PROMPTS]
    assert all(f == "length" for _, _, f in alone)
    go = threading.Barrier(len(PROMPTS))

    def together(p, stream):
        go.wait(timeout=30)
        return greedy_chat_raw(server, p, 24, stream=stream)[:3]

    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        batched = list(ex.map(lambda p: together(p, False), PROMPTS))
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        streamed = list(ex.map(lambda p: together(p, True), PROMPTS))
    for p, a, b, s in zip(PROMPTS, alone, batched, streamed):
        assert b == a, f"batched != alone for {p!r}"
        assert s == a, f"streamed batched != alone for {p!r}"


def _stream_round(server, prompts, max_tokens):
    """All PROMPTS streamed at once; returns {prompt: (reasoning, content, finish, usage)}."""
    go = threading.Barrier(len(prompts))

    def one(p):
        go.wait(timeout=30)
        return greedy_chat_raw(server, p, max_tokens, stream=True)

    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        return dict(zip(prompts, ex.map(one, prompts)))


def test_32_streaming_clients(server):
    n_tok = 32
    prompts = [f"Client {i}: {PROMPTS[i % len(PROMPTS)]}" for i in range(32)]
    ref = {p: greedy_chat_raw(server, p, n_tok)[:2] for p in prompts}
    assert len(set(ref.values())) > 16, "the prompts should give different answers"

    seen = {"active": 0, "queued": 0}
    stop_watch = threading.Event()
    _, types = metrics(server)
    g_active = gauges_named(types, *ACTIVE)
    g_queue = gauges_named(types, "queue")

    def watch():
        while not stop_watch.is_set():
            s, _ = metrics(server)
            seen["active"] = max(seen["active"], max((metric_sum(s, g) for g in g_active), default=0))
            seen["queued"] = max(seen["queued"], max((metric_sum(s, g) for g in g_queue), default=0))
            time.sleep(0.01)

    rss = []
    for _round in range(2):
        w = threading.Thread(target=watch, daemon=True)
        w.start()
        try:
            got = _stream_round(server, prompts, n_tok)
        finally:
            stop_watch.set()
            w.join(timeout=30)
            stop_watch.clear()
        for p in prompts:
            reasoning, content, finish, usage = got[p]
            assert (reasoning, content) == ref[p], f"stream of {p!r} differs from its text alone"
            assert finish == "length" and usage["completion_tokens"] == n_tok
            assert usage["prompt_tokens"] == chat_prompt_tokens(V3, msgs(p))
        time.sleep(0.2)
        rss.append(server.rss_kib())
    assert seen["active"] <= MAX_BATCH, seen
    check_prometheus(request(server, "GET", "/metrics")[2].decode())
    if server.tree == "build":  # ASan's quarantine and shadow memory make RSS meaningless
        assert rss[1] <= max(rss[0] * 1.10, rss[0] + 4096), f"RSS grew from {rss[0]} KiB to {rss[1]} KiB"
    st, js = get_json(server, "/health")
    assert st == 200


# ---------------------------------------------------------------------------- other servers

@pytest.fixture(scope="module")
def v2_server(tree):
    s = Server(exe_of(tree), V2, ["--served-model-name", "tiny-v2", "--api-key", "sekrit", "--chunk-size", 16,
                                  "-t", "2"], tree).start()
    yield s
    kids = s.children()
    rc, err = s.stop(sig=signal.SIGINT)  # SIGINT too ends it cleanly
    check_clean_exit(rc, err, kids)


def test_v2_served_name_and_api_key(v2_server):
    assert "(model tiny-v2)" in v2_server.stderr()
    for path, method in (("/v1/models", "GET"), ("/v1/chat/completions", "POST"), ("/api/tags", "GET")):
        st, hdr, data = request(v2_server, method, path, b'{"messages":[{"role":"user","content":"x"}]}',
                                headers={"Authorization": None})
        assert st == 401, (path, st, data[:200])
        if path.startswith("/v1"):
            err = json.loads(data)["error"]
            assert set(err) >= {"message", "type", "param", "code"}
    bad = openai.OpenAI(base_url=v2_server.url + "/v1", api_key="wrong", timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    c = openai.OpenAI(base_url=v2_server.url + "/v1", api_key="sekrit", timeout=30, max_retries=0)
    assert [m.id for m in c.models.list().data] == ["tiny-v2"]
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = c.chat.completions.create(model="tiny-v2", messages=conv, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.model == "tiny-v2" and r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == chat_prompt_tokens(V2, conv)  # the deepseek2 template
    rc = c.completions.create(model="tiny-v2", prompt=TEXT, max_tokens=4, temperature=0)
    assert rc.usage.prompt_tokens == completion_prompt_tokens(V2, TEXT)


def test_force_think_reasoning(tree, tmp_path):
    """--force-think: answers start inside <think>, reasoning_content carries it. Also:
    the default name of a split-style file name, and --port 0 (the port is printed)."""
    model = tmp_path / "Tiny-R1-Q4_K-00001-of-00003.gguf"
    model.symlink_to(V3)
    s = Server(exe_of(tree), model, ["--force-think", "-t", "2"], tree, any_port=True).start()
    try:
        assert s.port and "(model Tiny-R1-Q4_K)" in s.stderr()
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", timeout=60, max_retries=0)
        assert [m.id for m in c.models.list().data] == ["Tiny-R1-Q4_K"]
        r = c.chat.completions.create(model="Tiny-R1-Q4_K", messages=msgs("hi"), max_tokens=48, temperature=0,
                                      extra_body={"ignore_eos": True})
        reasoning, content = answer(r.choices[0].message)
        assert r.usage.prompt_tokens == chat_prompt_tokens(V3, msgs("hi"), force_think=True)
        assert reasoning, "with --force-think the reply starts inside the reasoning block"
        sr, sc, finish, usage, _ = stream_chat(c, "hi", max_tokens=48, model="Tiny-R1-Q4_K")
        assert (sr, sc) == (reasoning, content) and finish == "length"
        assert usage.prompt_tokens == r.usage.prompt_tokens
        # Ollama: the reasoning as message.thinking, streamed and whole, the same split
        r = c.chat.completions.create(model="Tiny-R1-Q4_K", messages=msgs("hi"), max_tokens=48, temperature=0)
        want = answer(r.choices[0].message)
        body = {"model": "Tiny-R1-Q4_K", "messages": msgs("hi"), "options": {"num_predict": 48, "temperature": 0}}
        st, _, lines = ndjson(s, "/api/chat", body)
        assert st == 200 and lines[-1]["done"] is True
        assert ("".join(l["message"].get("thinking", "") for l in lines),
                "".join(l["message"].get("content", "") for l in lines)) == want
        st, one, raw = post_json(s, "/api/chat", {**body, "stream": False})
        assert st == 200 and (one["message"].get("thinking", ""), one["message"]["content"]) == want, raw[:300]
    finally:
        s.stop_and_check()


def _open_stream(server, text, max_tokens):
    """A raw streaming chat request on its own socket (so the test can drop it)."""
    body = json.dumps({"messages": msgs(text), "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    s = socket.create_connection((server.host, server.port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return s


def _read_events(sock, n, timeout=30):
    buf = b""
    end = time.time() + timeout
    while buf.count(b"\ndata: {") < n:
        assert time.time() < end, f"no {n} events in {timeout} s: {buf[:500]!r}"
        data = sock.recv(65536)
        assert data, f"connection closed early: {buf[:500]!r}"
        buf += data
    assert buf.startswith(b"HTTP/1.1 200"), buf[:300]
    return buf


def _wait_metrics(server, pred, what, timeout=20):
    end = time.time() + timeout
    while True:
        samples, types = metrics(server)
        if pred(samples, types):
            return samples, types
        if time.time() > end:
            pytest.fail(f"timed out waiting for {what}; metrics:\n" +
                        "\n".join(f"{n}{dict(l)} {v}" for (n, l), v in sorted(samples.items(), key=str)
                                  if "bucket" not in n))
        time.sleep(0.05)


def _gauge(samples, types, *words):
    return sum(metric_sum(samples, g) for g in gauges_named(types, *words))


def _cancelled(samples, types):
    return sum(v for (n, _), v in samples.items() if "cancel" in n and types.get(n) == "counter")


ACTIVE = ("active", "running")
LONG_CTX = 16384  # a 16000-token greedy request takes many seconds even on the tiny model


def test_disconnect_cancels(tree):
    """A running request and a queued one whose clients go away are cancelled."""
    s = Server(exe_of(tree), V3, ["--max-batch-size", 1, "-c", LONG_CTX, "-t", "2"], tree).start()
    try:
        samples, types = metrics(s)
        assert gauges_named(types, "queue") and gauges_named(types, *ACTIVE)
        assert any("cancel" in n for n in types), f"no cancelled counter in {sorted(types)}"
        c0 = _cancelled(samples, types)

        a = _open_stream(s, "long one", LONG_CTX - 100)
        _read_events(a, 2)
        b = _open_stream(s, "queued one", LONG_CTX - 100)
        _wait_metrics(s, lambda sm, ty: _gauge(sm, ty, "queue") == 1 and _gauge(sm, ty, *ACTIVE) == 1,
                      "one active and one queued request")
        b.close()  # the queued client goes away
        _wait_metrics(s, lambda sm, ty: _gauge(sm, ty, "queue") == 0 and _cancelled(sm, ty) >= c0 + 1,
                      "the queued request cancelled")
        samples, types = metrics(s)
        assert _gauge(samples, types, *ACTIVE) == 1, "the running request should still run"
        a.close()  # the running client goes away
        _wait_metrics(s, lambda sm, ty: _gauge(sm, ty, "queue") == 0 and _gauge(sm, ty, *ACTIVE) == 0
                      and _cancelled(sm, ty) >= c0 + 2, "the running request cancelled")
        samples, types = metrics(s)
        gone = [n for n, t in types.items() if t == "counter" and "gone" in n]
        if gone:  # the HTTP layer's count of clients that left early
            _wait_metrics(s, lambda sm, ty: sum(metric_sum(sm, n) for n in gone) >= 2, "client-gone count 2")
        for g in gauges_named(types, "cache"):
            if "used" in g:
                assert metric_sum(samples, g) == 0, f"{g}: KV cache not given back"
        # and it still serves
        st, js, raw = post_json(s, "/v1/chat/completions",
                                {"messages": msgs("hi"), "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert st == 200 and js["usage"]["completion_tokens"] == 4, raw[:300]
    finally:
        s.stop_and_check()


def test_sigterm_during_stream(tree):
    """SIGTERM with a stream running (expert workers on), a non-streamed request
    queued behind it, an idle keep-alive connection and a half-sent request: exit 0
    promptly, the waiting client gets a 503 error body, no worker is left."""
    s = Server(exe_of(tree), V3, ["--workers", 1, "--max-batch-size", 1, "-c", LONG_CTX, "-t", "2"], tree).start()
    socks = []
    try:
        a = _open_stream(s, "long one", LONG_CTX - 100)
        socks.append(a)
        _read_events(a, 2)
        keep = socket.create_connection((s.host, s.port), timeout=30)
        socks.append(keep)
        keep.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert keep.recv(65536).startswith(b"HTTP/1.1 200")
        half = socket.create_connection((s.host, s.port), timeout=30)
        socks.append(half)
        half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        with cf.ThreadPoolExecutor(1) as ex:
            queued = ex.submit(post_json, s, "/v1/chat/completions",
                               {"messages": msgs("queued"), "max_tokens": 50, "ignore_eos": True})
            _wait_metrics(s, lambda sm, ty: _gauge(sm, ty, "queue") == 1, "the second request queued")
            kids = s.children()
            assert kids, "--workers 1 should have started a numoe-worker"
            t0 = time.time()
            rc, err = s.stop(sig=signal.SIGTERM, timeout=60)
            check_clean_exit(rc, err, kids)
            assert time.time() - t0 < 30
            st, js, raw = queued.result(timeout=30)
        assert st == 503 and js["error"]["type"] == "server_error", raw[:300]
        # the streaming client sees its stream end (EOF or reset), not a hang
        a.settimeout(10)
        try:
            while a.recv(65536):
                pass
        except ConnectionResetError:
            pass
    finally:
        for k in socks:
            k.close()
        if s.alive():
            s.proc.kill()
            s.proc.wait(timeout=30)

def _open_whole(server, text, max_tokens):
    """A raw non-streamed chat request on its own socket."""
    body = json.dumps({"messages": msgs(text), "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    s = socket.create_connection((server.host, server.port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return s


def test_kv_budget(tree):
    """--cache-lens: a request waits while the cache cannot hold its prompt + max_tokens
    (even with batch slots free), one that can never fit is a 400, and a non-streamed
    request whose client goes away while it waits is cancelled."""
    s = Server(exe_of(tree), V3, ["--max-batch-size", 4, "-c", LONG_CTX, "--cache-lens", 12000, "-t", "2"],
               tree).start()
    try:
        st, js, raw = post_json(s, "/v1/chat/completions", {"messages": msgs("hi"), "max_tokens": 13000})
        assert st == 400 and js["error"]["type"] == "invalid_request_error", raw[:300]
        samples, types = metrics(s)
        c0 = _cancelled(samples, types)

        a = _open_stream(s, "long one", 11900)  # leaves < 100 positions of the 12000
        _read_events(a, 2)
        b = _open_whole(s, "waits for cache", 200)
        _wait_metrics(s, lambda sm, ty: _gauge(sm, ty, "queue") == 1 and _gauge(sm, ty, *ACTIVE) == 1,
                      "the second request queued for KV cache")
        b.close()
        _wait_metrics(s, lambda sm, ty: _gauge(sm, ty, "queue") == 0 and _cancelled(sm, ty) >= c0 + 1,
                      "the waiting non-streamed request cancelled")
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(post_json, s, "/v1/chat/completions",
                            {"messages": msgs("then runs"), "max_tokens": 200, "temperature": 0, "ignore_eos": True})
            _wait_metrics(s, lambda sm, ty: _gauge(sm, ty, "queue") == 1, "the third request queued")
            a.close()  # frees the cache: the waiting request runs
            st, js, raw = fut.result(timeout=120)
        assert st == 200 and js["usage"]["completion_tokens"] == 200, raw[:300]
        _wait_metrics(s, lambda sm, ty: _gauge(sm, ty, "queue", *ACTIVE) == 0 and _cancelled(sm, ty) >= c0 + 2,
                      "all done")
    finally:
        s.stop_and_check()


def test_v2_small_chunks_equal_generate(v2_server):
    """The V2 model with --chunk-size 16: prompts are prefilled 16 tokens a step,
    interleaved with the others' decoding; the greedy texts still equal `numoe generate`."""
    long_prompt = " ".join(f"w{i}" for i in range(60))
    prompts = ["hi", TEXT, "The quick brown fox", long_prompt]
    want = []
    for p in prompts:
        g = run([v2_server.exe, "generate", "-m", V2, "--prompt", p, "-n", 20, "--ignore-eos", "-t", 2], timeout=120)
        assert g.returncode == 0, g.stderr[-2000:]
        want.append(_norm(g.stdout.rstrip("\n")))

    def one(p):
        st, js, raw = post_json(v2_server, "/v1/completions", {"prompt": p, "max_tokens": 20, "temperature": 0,
                                                               "ignore_eos": True})
        assert st == 200, raw[:300]
        return _norm(js["choices"][0]["text"])

    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        assert list(ex.map(one, prompts)) == want
