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
* --port 0 (every server here): the OS picks the port, the loading and
  listening lines name it (IPv6 in brackets).
* /health, CORS preflight and /metrics: the format, and the values: after
  known requests every counter is exactly what they asked for (tokens as in
  their usage fields, one step a token when they run one by one), the gauges
  back at their idle values.
* Continuous batching: 8 greedy prompts sent together give the texts they give
  alone; 32 streaming clients against --max-batch-size 4 all finish with the
  texts they give alone, ran batched (4 running and the rest queued; far fewer
  steps than tokens) but never more than 4 at once, and a second round of 32
  does not grow the RSS. With --max-batch-size 2 two long streams advance
  together while a third waits.
* A client that goes away (streamed or not, running or queued) has its
  request cancelled (the slot and KV reservation freed, the counters exact)
  and the server goes on; --cache-lens holds requests in the queue until their
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

from conftest import ROOT, run
from serve_util import (
    BOS, FIXTURE_CTX, LISTENING, LOADING, V2, V3, V3_NAME, Server, chat_prompt_tokens, chat_stream_text, check_clean_exit, check_prometheus,
    completion_prompt_tokens, completion_stream_text, exe_of, get_json, metric, metrics, ndjson,
    parse_metrics, post_json, render_v3, request, series, sse, stream_lines,
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
    raise AssertionError(f"no usable stop string in {text!r}")  # the fixture's greedy texts have them


# ---------------------------------------------------------------------------- basics

def test_listening_line_and_health(server):
    """--port 0 (every Server): the OS picked the port; the loading and listening
    lines both name it, and it is the one that answers."""
    err = server.stderr()
    assert [m.groups() for m in LISTENING.finditer(err)] == [("127.0.0.1", str(server.port), V3_NAME)], err[-2000:]
    assert [m.groups() for m in LOADING.finditer(err)] == [("127.0.0.1", str(server.port))], err[-2000:]
    assert 0 < server.port < 65536
    st, js = get_json(server, "/health")
    assert st == 200 and js == {"status": "ok"}


def test_port_zero_ipv6(tree):
    """--host ::1 --port 0: an IPv6 socket on an OS-chosen port, printed in brackets."""
    s = Server(exe_of(tree), V3, ["-t", "2", "--workers", 0], tree, host="::1").start()
    try:
        err = s.stderr()
        assert [m.groups() for m in LISTENING.finditer(err)] == [("[::1]", str(s.port), V3_NAME)], err[-2000:]
        assert [m.groups() for m in LOADING.finditer(err)] == [("[::1]", str(s.port))], err[-2000:]
        assert get_json(s, "/health") == (200, {"status": "ok"})
    finally:
        s.stop_and_check()


def test_models_and_version(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [V3_NAME]
    st, js = get_json(server, "/v1/models")
    assert st == 200 and js["object"] == "list" and len(js["data"]) == 1
    assert {k: v for k, v in js["data"][0].items() if k != "created"} == \
        {"id": V3_NAME, "object": "model", "owned_by": "numoe"}, js
    # when the model was loaded, in whole seconds
    assert int(server.started) <= js["data"][0]["created"] <= time.time(), (server.started, js)
    st, tags = get_json(server, "/api/tags")
    assert st == 200 and len(tags["models"]) == 1, tags
    tag = tags["models"][0]
    assert {k: tag[k] for k in ("name", "model", "size", "digest")} == \
        {"name": V3_NAME, "model": V3_NAME, "size": V3.stat().st_size, "digest": ""}, tag
    assert tag["modified_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(V3.stat().st_mtime)), tag
    # 1 001 712 parameters (tests/unit/test_serve_info.c adds them up), all F32
    assert tag["details"] == {"format": "gguf", "family": "deepseek2", "families": ["deepseek2"],
                              "parameter_size": "1M", "quantization_level": "F32", "parent_model": ""}, tag
    st, ver = get_json(server, "/api/version")
    assert (st, ver) == (200, {"version": "0.1.0"})  # docs/SERVE.md


def test_chat_completion(server, client):
    r = chat(client, "hi", max_tokens=16)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl") and r.model == V3_NAME
    assert len(r.choices) == 1 and r.choices[0].index == 0
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    # the answer is what the chat template's rendering continues with (no reasoning block here)
    st, js, raw = post_json(server, "/v1/completions",
                            {"prompt": render_v3(msgs("hi"))[len(BOS):], "max_tokens": 16, "temperature": 0,
                             "ignore_eos": True})
    assert st == 200 and answer(msg) == ("", js["choices"][0]["text"]) and msg.content, (answer(msg), raw[:300])
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


def test_cors_preflight(v2_server):
    # with an API key every origin may call (a page cannot know the key); without
    # one no foreign origin may (tests/test_serve_hardening.py)
    server = v2_server
    st, hdr, body = request(server, "OPTIONS", "/v1/chat/completions",
                            headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST",
                                     "Access-Control-Request-Headers": "authorization, content-type"})
    assert st == 204 and body == b"", (st, body)
    assert {k: hdr.get(k) for k in ("access-control-allow-origin", "access-control-allow-methods",
                                    "access-control-allow-headers", "access-control-max-age")} == \
        {"access-control-allow-origin": "*", "access-control-allow-methods": "GET, POST, OPTIONS",
         "access-control-allow-headers": "authorization, content-type", "access-control-max-age": "86400"}, hdr
    # without Access-Control-Request-Headers the usual two are allowed
    st, hdr, _ = request(server, "OPTIONS", "/v1/models", headers={"Origin": "http://example.com"})
    assert st == 204 and hdr.get("access-control-allow-headers") == "Authorization, Content-Type", hdr
    # every answer carries the origin header, errors too
    for method, path, want in (("GET", "/health", 200), ("GET", "/nope", 404)):
        st, hdr, _ = request(server, method, path)
        assert st == want and hdr.get("access-control-allow-origin") == "*", (path, st, hdr)


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
    # without ignore_eos the fixture's greedy answer to TEXT ends with EOS before 40 tokens (at 20):
    # finish "stop", the EOS counted, and the text that of the same answer cut one token earlier
    r = chat(client, TEXT, max_tokens=40, ignore_eos=False)
    n = r.usage.completion_tokens
    assert r.choices[0].finish_reason == "stop" and 1 < n < 40, r
    cut = chat(client, TEXT, max_tokens=n - 1)
    assert cut.choices[0].finish_reason == "length"
    assert answer(r.choices[0].message) == answer(cut.choices[0].message)


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
    assert wide, f"the greedy continuation of 'hi' has a multi-byte character (U+0107): {hi!r}"
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
    # "engine" is in the prompt, not in the answer: the answer runs to max_tokens
    assert "engine" in TEXT and "engine" not in full, full
    r = client.completions.create(model=V3_NAME, prompt=TEXT, max_tokens=40, temperature=0, stop="engine",
                                  extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full, "length")
    # chat: the stop string cuts the answer (the fixture's greedy chat answer has no reasoning block)
    reasoning, content, _, _ = greedy_chat_raw(server, TEXT, 40)
    assert reasoning == "" and content, (reasoning, content)
    cstop = clean_piece(content, len(content) // 2)
    reasoning2, content2, finish, _ = greedy_chat_raw(server, TEXT, 40, stop=[cstop])
    assert content2 == content[: content.index(cstop)] and finish == "stop"
    r2, c2, f2, _ = greedy_chat_raw(server, TEXT, 40, stream=True, stop=[cstop])
    assert (r2, c2, f2) == (reasoning2, content2, "stop") == ("", content[: content.index(cstop)], "stop")


def test_seed_reproducible(client):
    def sample(seed, **kw):
        r = chat(client, TEXT, max_tokens=24, temperature=1.0, seed=seed, **kw)
        return answer(r.choices[0].message)

    a, b = sample(1234), sample(1234)
    assert a == b
    assert len({sample(s) for s in (1, 2, 3)}) == 3, "different seeds gave the same sampled text"
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
    assert final["model"] == V3_NAME and final["message"] == {"role": "assistant", "content": ""}, final
    assert final["prompt_eval_count"] == chat_prompt_tokens(V3, msgs(TEXT))
    assert all(l["message"]["role"] == "assistant" and "thinking" not in l["message"] for l in lines), lines
    # the same greedy answer as the OpenAI endpoint (no reasoning block; 12 tokens, EOS comes at 20)
    r = chat(client, TEXT, max_tokens=12, ignore_eos=False)
    assert answer(r.choices[0].message) == ("", streamed) and r.choices[0].finish_reason == "length"
    assert (final["eval_count"], final["done_reason"]) == (r.usage.completion_tokens, "length") == (12, "length")
    st, one, raw = post_json(server, "/api/chat", {**body, "stream": False})
    assert st == 200 and one["done"] is True and one["done_reason"] == "length", raw[:300]
    assert one["message"] == {"role": "assistant", "content": streamed}, one
    assert (one["prompt_eval_count"], one["eval_count"]) == (final["prompt_eval_count"], final["eval_count"])


def test_ollama_generate(server, client):
    body = {"model": V3_NAME, "prompt": TEXT, "options": {"num_predict": 10, "temperature": 0, "seed": 3}}
    st, ctype, lines = ndjson(server, "/api/generate", body)
    assert st == 200 and "ndjson" in ctype and lines[-1]["done"] is True, (st, lines[:2])
    streamed = "".join(l.get("response", "") for l in lines)
    assert lines[-1]["prompt_eval_count"] == chat_prompt_tokens(V3, msgs(TEXT))  # templated as a user turn
    # greedy (temperature 0; the seed does not matter): the chat endpoint's answer to the same user turn
    r = chat(client, TEXT, max_tokens=10, ignore_eos=False)
    assert streamed == r.choices[0].message.content
    assert (lines[-1]["eval_count"], lines[-1]["done_reason"]) == (r.usage.completion_tokens, "length") == (10, "length")
    st, one, raw = post_json(server, "/api/generate", {**body, "stream": False})
    assert st == 200 and one["done"] is True and one["response"] == streamed, raw[:300]
    assert (one["prompt_eval_count"], one["eval_count"]) == (lines[-1]["prompt_eval_count"], 10)
    # raw: the prompt untemplated, like /v1/completions
    st, rawgen, data = post_json(server, "/api/generate", {**body, "raw": True, "stream": False})
    assert st == 200, data[:300]
    assert rawgen["prompt_eval_count"] == completion_prompt_tokens(V3, TEXT)
    c = client.completions.create(model=V3_NAME, prompt=TEXT, max_tokens=10, temperature=0)
    assert rawgen["response"] == c.choices[0].text and rawgen["eval_count"] == c.usage.completion_tokens == 10
    # options.stop
    full = rawgen["response"]
    assert len(full) > 4, full
    stop = clean_piece(full, len(full) // 2)
    st, cut, _ = post_json(server, "/api/generate",
                           {**body, "raw": True, "stream": False, "options": {**body["options"], "stop": [stop]}})
    assert st == 200 and (cut["response"], cut["done_reason"]) == (full[: full.index(stop)], "stop"), cut


# ---------------------------------------------------------------------------- /metrics

SCHED_GAUGES = ("numoe_queue_depth", "numoe_active_requests", "numoe_kv_cache_used_tokens")
SCHED_COUNTERS = ("numoe_requests_finished_total", "numoe_requests_cancelled_total", "numoe_requests_failed_total",
                  "numoe_prompt_tokens_total", "numoe_generation_tokens_total", "numoe_steps_total")
HTTP_COUNTERS = ("numoe_http_prompt_tokens_total", "numoe_http_generated_tokens_total", "numoe_http_client_gone_total")
SCHED_HISTS = ("numoe_queue_wait_seconds", "numoe_time_to_first_token_seconds", "numoe_time_per_output_token_seconds",
               "numoe_request_seconds", "numoe_step_seconds")


def _counts(samples):
    """The metrics whose values a test can predict, by name (histograms: their _count)."""
    out = {n: metric(samples, n) for n in SCHED_GAUGES + SCHED_COUNTERS + HTTP_COUNTERS}
    out.update({h + "_count": metric(samples, h + "_count") for h in SCHED_HISTS})
    return out


def _delta(after, before):
    return {k: after[k] - before[k] for k in after}


def _by_route(samples):
    """{(path, status): n} of numoe_http_requests_total."""
    return {(dict(ls)["path"], dict(ls)["status"]): v for ls, v in series(samples, "numoe_http_requests_total").items()}


def _wait_idle(server, conns=None, timeout=20):
    """Waits until nothing runs, waits or holds KV cache (and, given CONNS, that many
    connections are open: a keep-alive connection stays open while its client idles)."""
    return _wait_metrics(server, lambda sm, ty: all(metric(sm, g) == 0 for g in SCHED_GAUGES)
                         and conns in (None, metric(sm, "numoe_http_connections_open")),
                         f"the server idle with {conns} connections open", timeout=timeout)


def test_metrics(tree):
    """/metrics of a server of its own: the format, then the values. Fresh, every
    counter is 0 but the start-up's one /health; after known requests every counter
    is exactly what they asked for and were answered (tokens as in their usage
    fields), and the gauges are back to their idle values."""
    s = Server(exe_of(tree), V3, ["--max-batch-size", MAX_BATCH, "-t", "2"], tree).start()
    try:
        st, hdr, data = request(s, "GET", "/metrics")
        assert st == 200 and hdr.get("content-type") == "text/plain; version=0.0.4; charset=utf-8", hdr
        types = check_prometheus(data.decode())
        for n in SCHED_GAUGES + ("numoe_up", "numoe_kv_cache_total_tokens", "numoe_max_batch_size",
                                 "numoe_http_connections_open", "numoe_http_requests_in_flight"):
            assert types.get(n) == "gauge", (n, types.get(n))
        for n in SCHED_COUNTERS + HTTP_COUNTERS + ("numoe_http_requests_total",):
            assert types.get(n) == "counter", (n, types.get(n))
        for n in SCHED_HISTS + ("numoe_http_request_duration_seconds",):
            assert types.get(n) == "histogram", (n, types.get(n))
        zero = {k: 0 for k in _counts(parse_metrics(data.decode())[0])}

        # the scrapes count themselves once the next one renders; connections once their close is seen
        before, _ = _wait_idle(s, conns=1)
        n_scrapes = metric(before, "numoe_http_requests_total", path="/metrics", status="200")
        assert _by_route(before) == {("/health", "200"): 1, ("/metrics", "200"): n_scrapes}
        assert _counts(before) == zero

        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", timeout=60, max_retries=0)
        client.models.list()
        client.models.list()
        r = chat(client, "hi", max_tokens=5)
        client.close()  # its keep-alive connection would count as open
        _, _, events, done, _ = sse(s, "/v1/completions", {"prompt": TEXT, "max_tokens": 7, "temperature": 0,
                                                            "ignore_eos": True, "stream": True,
                                                            "stream_options": {"include_usage": True}})
        comp_usage = completion_stream_text(events)[2]
        st, gen, raw = post_json(s, "/api/generate", {"model": V3_NAME, "prompt": "hi", "stream": False,
                                                      "options": {"num_predict": 3, "temperature": 0}})
        assert st == 200 and gen["eval_count"] == 3, raw[:300]
        assert request(s, "GET", "/no/such/path")[0] == 404
        assert post_json(s, "/v1/chat/completions", {"messages": msgs("x"), "temperature": 9})[0] == 400
        assert request(s, "OPTIONS", "/v1/chat/completions")[0] == 204

        # counted when the answer is queued, so at once: one read, no waiting
        after, _ = metrics(s)
        prompt = r.usage.prompt_tokens + comp_usage["prompt_tokens"] + gen["prompt_eval_count"]
        generated = r.usage.completion_tokens + comp_usage["completion_tokens"] + gen["eval_count"]
        assert (prompt, generated) == (2 * chat_prompt_tokens(V3, msgs("hi")) + completion_prompt_tokens(V3, TEXT),
                                       5 + 7 + 3)
        routes = {("/health", "200"): 1, ("/metrics", "200"): n_scrapes + 1, ("/v1/models", "200"): 2,
                  ("/v1/chat/completions", "200"): 1, ("/v1/completions", "200"): 1, ("/api/generate", "200"): 1,
                  ("other", "404"): 1, ("/v1/chat/completions", "400"): 1, ("/v1/chat/completions", "204"): 1}
        assert _by_route(after) == routes
        per_path = {}
        for (path, _), n in routes.items():
            per_path[path] = per_path.get(path, 0) + n
        assert {dict(ls)["path"]: v for ls, v in series(after, "numoe_http_request_duration_seconds_count").items()} \
            == per_path
        # three generations, one after another; prompts shorter than a --chunk-size step: one step a token
        assert _counts(after) == {
            "numoe_queue_depth": 0, "numoe_active_requests": 0, "numoe_kv_cache_used_tokens": 0,
            "numoe_requests_finished_total": 3, "numoe_requests_cancelled_total": 0, "numoe_requests_failed_total": 0,
            "numoe_prompt_tokens_total": prompt, "numoe_generation_tokens_total": generated,
            "numoe_steps_total": generated,
            "numoe_http_prompt_tokens_total": prompt, "numoe_http_generated_tokens_total": generated,
            "numoe_http_client_gone_total": 0,
            "numoe_queue_wait_seconds_count": 3, "numoe_time_to_first_token_seconds_count": 3,
            "numoe_time_per_output_token_seconds_count": 3, "numoe_request_seconds_count": 3,
            "numoe_step_seconds_count": generated,
        }
        # idle: nothing queued, running or reserved; the scrape itself is the one request in flight
        assert {n: metric(after, n) for n in SCHED_GAUGES + ("numoe_up", "numoe_http_requests_in_flight",
                                                             "numoe_kv_cache_total_tokens", "numoe_max_batch_size")} \
            == {"numoe_queue_depth": 0, "numoe_active_requests": 0, "numoe_kv_cache_used_tokens": 0, "numoe_up": 1,
                "numoe_http_requests_in_flight": 1, "numoe_kv_cache_total_tokens": FIXTURE_CTX * MAX_BATCH,
                "numoe_max_batch_size": MAX_BATCH}
        _wait_idle(s, conns=1)  # and the connections of these requests closed
    finally:
        s.stop_and_check()


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
    """32 streams at once against --max-batch-size 4, two rounds: every text is the
    one it gives alone; they ran batched (a watcher sees exactly 4 running and some
    queued, and the steps show more than one token each), never more than 4 at once
    (no step made more than 4 tokens: steps >= tokens / 4), and the RSS stays put."""
    n_tok = 32
    prompts = [f"Client {i}: {PROMPTS[i % len(PROMPTS)]}" for i in range(32)]
    ref = {p: greedy_chat_raw(server, p, n_tok)[:2] for p in prompts}
    assert len(set(ref.values())) > 16, "the prompts should give different answers"
    n_prompt = sum(chat_prompt_tokens(V3, msgs(p)) for p in prompts)

    stop_watch = threading.Event()

    def watch(seen):
        while not stop_watch.is_set():
            sm, _ = metrics(server)
            seen.append((metric(sm, "numoe_active_requests"), metric(sm, "numoe_queue_depth")))
            time.sleep(0.01)

    rss = []
    for _round in range(2):
        before, _ = _wait_idle(server)
        seen = []
        w = threading.Thread(target=watch, args=(seen,), daemon=True)
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
        after, _ = _wait_idle(server)
        d = _delta(_counts(after), _counts(before))
        steps = d.pop("numoe_steps_total")
        assert d == {
            "numoe_queue_depth": 0, "numoe_active_requests": 0, "numoe_kv_cache_used_tokens": 0,
            "numoe_requests_finished_total": 32, "numoe_requests_cancelled_total": 0,
            "numoe_requests_failed_total": 0, "numoe_prompt_tokens_total": n_prompt,
            "numoe_generation_tokens_total": 32 * n_tok, "numoe_http_prompt_tokens_total": n_prompt,
            "numoe_http_generated_tokens_total": 32 * n_tok, "numoe_http_client_gone_total": 0,
            "numoe_queue_wait_seconds_count": 32, "numoe_time_to_first_token_seconds_count": 32,
            "numoe_time_per_output_token_seconds_count": 32, "numoe_request_seconds_count": 32,
            "numoe_step_seconds_count": steps,
        }, d
        # one at a time would take 32 * n_tok steps, and no step makes more than MAX_BATCH tokens
        # (measured: 257 steps for 1024 tokens)
        assert 32 * n_tok / MAX_BATCH <= steps <= 32 * n_tok / 2, steps
        assert max(a for a, _ in seen) == MAX_BATCH, seen
        assert 1 <= max(q for _, q in seen) <= 31, seen  # requests are admitted as they come
        assert all(a <= MAX_BATCH and a + q <= 32 for a, q in seen), seen
        rss.append(server.rss_kib())
    check_prometheus(request(server, "GET", "/metrics")[2].decode())
    if server.tree == "build":  # ASan's quarantine and shadow memory make RSS meaningless
        assert rss[1] <= max(rss[0] * 1.10, rss[0] + 4096), f"RSS grew from {rss[0]} KiB to {rss[1]} KiB"


def test_bench_serve_tool(server, tmp_path):
    """tests/bench_serve.py (the load tool of docs/SERVE.md) against the server: every
    level's requests succeed with the tokens asked for, and its figures are there."""
    out = tmp_path / "bench.json"
    p = run(["python3", ROOT / "tests" / "bench_serve.py", "--url", server.url, "--concurrency", "1,3",
             "--requests", 6, "--max-tokens", 8, "--prompt-len", 16, "--json", out], timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    assert res["model"] == V3_NAME and [lv["clients"] for lv in res["levels"]] == [1, 3]
    for lv in res["levels"]:
        assert (lv["requests"], lv["failures"], lv["errors"]) == (6, 0, []), lv
        for r in lv["per_request"]:
            assert r["error"] is None and r["completion_tokens"] == 8 and r["prompt_tokens"] > 16, r
            assert 0 < r["ttft"] <= r["latency"], r
        assert lv["gen_tok_s"] > 0 and lv["ttft_p50_ms"] > 0, lv
    assert p.stdout.count("\n| 1 | 6 |") == 1 and p.stdout.count("\n| 3 | 6 |") == 1, p.stdout


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
    msg = "missing or wrong API key: send 'Authorization: Bearer KEY'"
    for path, method in (("/v1/models", "GET"), ("/v1/chat/completions", "POST"), ("/api/tags", "GET")):
        for auth in (None, "Bearer wrong", "Bearer sekrit2", "Basic sekrit", "sekrit"):
            st, hdr, data = request(v2_server, method, path, b'{"messages":[{"role":"user","content":"x"}]}',
                                    headers={"Authorization": auth})
            assert st == 401 and hdr.get("www-authenticate") == "Bearer", (path, auth, st, hdr, data[:200])
            want = {"error": msg} if path.startswith("/api/") else \
                {"error": {"message": msg, "type": "invalid_request_error", "param": None, "code": None}}
            assert json.loads(data) == want, (path, data[:300])
    # the probes and the version stay open without a key
    for path in ("/health", "/metrics", "/api/version", "/"):
        st, _, data = request(v2_server, "GET", path, headers={"Authorization": None})
        assert st == 200, (path, st, data[:200])
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
    the default name of a split-style file name."""
    model = tmp_path / "Tiny-R1-Q4_K-00001-of-00003.gguf"
    model.symlink_to(V3)
    s = Server(exe_of(tree), model, ["--force-think", "-t", "2"], tree).start()
    try:
        assert "(model Tiny-R1-Q4_K)" in s.stderr()
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", timeout=60, max_retries=0)
        assert [m.id for m in c.models.list().data] == ["Tiny-R1-Q4_K"]
        r = c.chat.completions.create(model="Tiny-R1-Q4_K", messages=msgs("hi"), max_tokens=48, temperature=0,
                                      extra_body={"ignore_eos": True})
        reasoning, content = answer(r.choices[0].message)
        assert r.usage.prompt_tokens == chat_prompt_tokens(V3, msgs("hi"), force_think=True)
        # the reply starts inside the reasoning block: all of it is the text the rendered prompt
        # (ending "<think>\n") continues with, which never closes the block within 48 tokens
        st, js, raw = post_json(s, "/v1/completions", {"prompt": render_v3(msgs("hi"), True)[len(BOS):],
                                                       "max_tokens": 48, "temperature": 0, "ignore_eos": True})
        assert st == 200 and js["usage"]["prompt_tokens"] == r.usage.prompt_tokens, raw[:300]
        cont = js["choices"][0]["text"]
        assert "</think>" not in cont and cont.strip(), cont
        assert (reasoning, content) == (cont, "")
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


def _g(samples, *names):
    """The values of the unlabelled series NAMES, as a tuple."""
    return tuple(metric(samples, n) for n in names)


QA = ("numoe_queue_depth", "numoe_active_requests")
LONG_CTX = 16384  # a 16000-token greedy request takes many seconds even on the tiny model


def _stream_events(buf):
    """The JSON events of a raw (chunked) SSE response so far."""
    return [json.loads(m) for m in re.findall(rb"data: (\{.*?\})\n", buf)]


def _read_to_eof(sock, timeout=30):
    """Everything SOCK still sends until the peer closes it; a reset or a
    timeout fails (a clean close is what the server promises)."""
    sock.settimeout(timeout)
    out = b""
    while True:
        d = sock.recv(65536)
        if not d:
            return out
        out += d


def test_batch_limit_and_disconnect(tree):
    """--max-batch-size 2: two streams run together (both advance while neither has
    ended), a third waits in the queue; clients that go away, queued or running, are
    cancelled, their batch slot and KV reservation freed, the queued one admitted."""
    s = Server(exe_of(tree), V3, ["--max-batch-size", 2, "-c", LONG_CTX, "-t", "2"], tree).start()
    socks = []
    try:
        samples, _ = metrics(s)
        assert _g(samples, *QA, "numoe_kv_cache_used_tokens", "numoe_kv_cache_total_tokens",
                  "numoe_requests_cancelled_total", "numoe_http_client_gone_total") == (0, 0, 0, 2 * LONG_CTX, 0, 0)
        c0 = g0 = 0
        n_tok = LONG_CTX - 100
        texts = ("long one", "long two", "queued one", "queued two")
        reserve = {t: chat_prompt_tokens(V3, msgs(t)) + n_tok for t in texts}  # prompt + max_tokens

        a = _open_stream(s, texts[0], n_tok)
        socks.append(a)
        buf_a = _read_events(a, 2)
        b = _open_stream(s, texts[1], n_tok)
        socks.append(b)
        buf_b = _read_events(b, 2)
        _wait_metrics(s, lambda sm, ty: _g(sm, *QA, "numoe_kv_cache_used_tokens") ==
                      (0, 2, reserve[texts[0]] + reserve[texts[1]]), "two running, their KV reserved")
        # both advance while both are open and unfinished: they run in the same batch
        for _ in range(3):
            n_a, n_b = buf_a.count(b"\ndata: {"), buf_b.count(b"\ndata: {")
            buf_a = _read_more(a, buf_a, n_a + 1)
            buf_b = _read_more(b, buf_b, n_b + 1)
        assert b"[DONE]" not in buf_a + buf_b

        c = _open_stream(s, texts[2], n_tok)
        socks.append(c)
        _wait_metrics(s, lambda sm, ty: _g(sm, *QA) == (1, 2), "two running and one queued")
        c.close()  # the queued client goes away
        _wait_metrics(s, lambda sm, ty: _g(sm, *QA, "numoe_requests_cancelled_total") == (0, 2, c0 + 1),
                      "the queued request cancelled, the two still running")
        d = _open_stream(s, texts[3], n_tok)
        socks.append(d)
        _wait_metrics(s, lambda sm, ty: _g(sm, *QA) == (1, 2), "a fourth request queued")
        a.close()  # a running client goes away: its slot goes to the queued request
        buf_d = _read_events(d, 2)
        _wait_metrics(s, lambda sm, ty: _g(sm, *QA, "numoe_kv_cache_used_tokens", "numoe_requests_cancelled_total")
                      == (0, 2, reserve[texts[1]] + reserve[texts[3]], c0 + 2), "the queued request admitted")
        assert _stream_events(buf_d)[0]["choices"][0]["delta"]["role"] == "assistant"
        b.close()
        d.close()
        _wait_metrics(s, lambda sm, ty: _g(sm, *QA, "numoe_kv_cache_used_tokens", "numoe_requests_cancelled_total",
                                           "numoe_http_client_gone_total") == (0, 0, 0, c0 + 4, g0 + 4),
                      "every request cancelled, its KV cache given back, four clients gone")
        samples, _ = metrics(s)
        assert _g(samples, "numoe_requests_finished_total", "numoe_requests_failed_total") == (0, 0)
        # and it still serves
        st, js, raw = post_json(s, "/v1/chat/completions",
                                {"messages": msgs("hi"), "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert st == 200 and js["usage"]["completion_tokens"] == 4, raw[:300]
    finally:
        for k in socks:
            k.close()
        s.stop_and_check()


def _read_more(sock, buf, n, timeout=30):
    """BUF plus what SOCK sends until BUF holds N events."""
    end = time.time() + timeout
    while buf.count(b"\ndata: {") < n:
        assert time.time() < end, f"no {n} events in {timeout} s: {buf[-500:]!r}"
        data = sock.recv(65536)
        assert data, f"connection closed early: {buf[-500:]!r}"
        buf += data
    return buf


def test_sigterm_during_stream(tree):
    """SIGTERM with a stream running (expert workers on), a non-streamed request
    queued behind it, an idle keep-alive connection and a half-sent request: exit 0,
    the stream ends with a 503 error event and a clean close, the waiting client gets
    a 503 error body, the other two connections are closed, no worker is left."""
    s = Server(exe_of(tree), V3, ["--workers", 1, "--max-batch-size", 1, "-c", LONG_CTX, "-t", "2"], tree).start()
    socks = []
    try:
        a = _open_stream(s, "long one", LONG_CTX - 100)
        socks.append(a)
        _read_events(a, 2)
        keep = socket.create_connection((s.host, s.port), timeout=30)
        socks.append(keep)
        keep.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while not got.endswith(b'{"status":"ok"}'):
            d = keep.recv(65536)
            assert d, got
            got += d
        assert got.startswith(b"HTTP/1.1 200"), got
        half = socket.create_connection((s.host, s.port), timeout=30)
        socks.append(half)
        half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        with cf.ThreadPoolExecutor(1) as ex:
            queued = ex.submit(post_json, s, "/v1/chat/completions",
                               {"messages": msgs("queued"), "max_tokens": 50, "ignore_eos": True})
            _wait_metrics(s, lambda sm, ty: _g(sm, *QA) == (1, 1), "the second request queued")
            kids = s.children()
            comms = sorted(open(f"/proc/{k}/comm").read().strip() for k in kids)
            # the launcher's two children: the coordinator (its name cut to 15 bytes) and one worker
            assert comms == ["numoe-coordinat", "numoe-worker"], (kids, comms)
            rc, err = s.stop(sig=signal.SIGTERM, timeout=60)
            check_clean_exit(rc, err, kids)
            st, js, raw = queued.result(timeout=30)
        assert st == 503 and js == {"error": {"message": "the request was cancelled: the server is shutting down",
                                              "type": "server_error", "param": None, "code": None}}, raw[:300]
        # the stream: the error as its last event, no [DONE], the chunked body ended, then EOF
        tail = _read_to_eof(a)
        assert b"[DONE]" not in tail and tail.endswith(b"\r\n0\r\n\r\n"), tail[-300:]
        assert _stream_events(tail)[-1] == {"error": {"message": "the request was cancelled: the server is "
                                                                 "shutting down", "type": "server_error",
                                                      "param": None, "code": None}}, tail[-300:]
        assert _read_to_eof(keep) == b"" and _read_to_eof(half) == b""
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
        n_hi = chat_prompt_tokens(V3, msgs("hi"))
        assert st == 400 and js == {"error": {
            "message": f"the prompt's {n_hi} tokens plus max_tokens 13000 exceed the whole KV cache (--cache-lens 12000)",
            "type": "invalid_request_error", "param": None, "code": None}}, raw[:300]
        samples, _ = metrics(s)
        assert _g(samples, "numoe_kv_cache_total_tokens", "numoe_requests_cancelled_total") == (12000, 0)
        long_reserve = chat_prompt_tokens(V3, msgs("long one")) + 11900

        a = _open_stream(s, "long one", 11900)  # leaves < 100 positions of the 12000
        _read_events(a, 2)
        b = _open_whole(s, "waits for cache", 200)
        _wait_metrics(s, lambda sm, ty: _g(sm, *QA, "numoe_kv_cache_used_tokens") == (1, 1, long_reserve),
                      "the second request queued for KV cache")
        b.close()
        _wait_metrics(s, lambda sm, ty: _g(sm, *QA, "numoe_requests_cancelled_total") == (0, 1, 1),
                      "the waiting non-streamed request cancelled")
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(post_json, s, "/v1/chat/completions",
                            {"messages": msgs("then runs"), "max_tokens": 200, "temperature": 0, "ignore_eos": True})
            _wait_metrics(s, lambda sm, ty: _g(sm, *QA) == (1, 1), "the third request queued")
            a.close()  # frees the cache: the waiting request runs
            st, js, raw = fut.result(timeout=120)
        assert st == 200 and js["usage"]["completion_tokens"] == 200, raw[:300]
        _wait_metrics(s, lambda sm, ty: _g(sm, *QA, "numoe_kv_cache_used_tokens", "numoe_requests_cancelled_total",
                                           "numoe_requests_finished_total") == (0, 0, 0, 2, 1), "all done")
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
