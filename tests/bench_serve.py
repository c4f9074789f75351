#!/usr/bin/env python3
"""Load generator for `numoe serve` (or any OpenAI-compatible server).

    python3 tests/bench_serve.py --url http://127.0.0.1:10002 --concurrency 1,4,16 \\
        --requests 64 --max-tokens 128 --prompt-len 256 [--json out.json]

For every concurrency level C it keeps C clients busy until --requests
streaming chat completions have been sent (stream_options.include_usage,
ignore_eos so each request generates --max-tokens unless --no-ignore-eos), and
measures per request:
  TTFT     time from sending the request to the first content or reasoning delta
  latency  time to the end of the stream ([DONE])
  tokens   completion_tokens from the usage chunk
  TPOT     (latency - TTFT) / (tokens - 1)
It prints one markdown table row per level: aggregate generation tok/s (all
output tokens / wall time of the level), p50/p99 TTFT, p50 TPOT, failures.
Standard library only (threads + http.client); not a test."""
import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def make_prompt(rng, n_words):
    """About n_words tokens of text (most of these words are one to three tokens in
    real vocabularies); a random head keeps requests from sharing a prefix."""
    return f"[{rng.randrange(1 << 30):x}] " + " ".join(rng.choice(WORDS) for _ in range(max(1, n_words)))


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def one_request(url, args, prompt):
    """Returns a dict of measurements; 'error' set on failure."""
    u = urllib.parse.urlsplit(url)
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": args.temperature}
    if args.model:
        body["model"] = args.model
    if not args.no_ignore_eos:
        body["ignore_eos"] = True
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    res = {"ttft": None, "latency": None, "prompt_tokens": None, "completion_tokens": None, "error": None,
           "chunks": 0}
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=args.timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", (u.path.rstrip("/") or "") + "/v1/chat/completions", body=json.dumps(body),
                     headers=headers)
        r = conn.getresponse()
        if r.status != 200:
            res["error"] = f"HTTP {r.status}: {r.read()[:200]!r}"
            return res
        done = False
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                break
            ev = json.loads(payload)
            if "error" in ev:
                res["error"] = f"stream error: {ev['error']}"
                return res
            res["chunks"] += 1
            for ch in ev.get("choices") or []:
                d = ch.get("delta") or {}
                if res["ttft"] is None and (d.get("content") or d.get("reasoning_content")):
                    res["ttft"] = time.perf_counter() - t0
            if ev.get("usage"):
                res["prompt_tokens"] = ev["usage"].get("prompt_tokens")
                res["completion_tokens"] = ev["usage"].get("completion_tokens")
        res["latency"] = time.perf_counter() - t0
        if not done:
            res["error"] = "stream ended without [DONE]"
        elif res["completion_tokens"] is None:
            res["error"] = "no usage chunk"
        elif not args.no_ignore_eos and res["completion_tokens"] != args.max_tokens:
            # with ignore_eos every request must run to max_tokens, or the tok/s figures mislead
            res["error"] = f"usage says {res['completion_tokens']} tokens, asked for {args.max_tokens}"
    except (OSError, http.client.HTTPException, ValueError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return res


def run_level(url, args, conc, rng):
    prompts = [make_prompt(rng, args.prompt_len) for _ in range(args.requests)]
    lock = threading.Lock()
    nxt = [0]
    results = []

    def client():
        while True:
            with lock:
                if nxt[0] >= len(prompts):
                    return
                i = nxt[0]
                nxt[0] += 1
            r = one_request(url, args, prompts[i])
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    ok = [r for r in results if not r["error"]]
    out_tok = sum(r["completion_tokens"] or 0 for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [(r["latency"] - r["ttft"]) / (r["completion_tokens"] - 1)
            for r in ok if r["ttft"] is not None and (r["completion_tokens"] or 0) > 1]
    lat = [r["latency"] for r in ok]
    prompt_tok = [r["prompt_tokens"] for r in ok if r["prompt_tokens"] is not None]
    return {
        "clients": conc,
        "requests": len(results),
        "wall_s": wall,
        "output_tokens": out_tok,
        "gen_tok_s": out_tok / wall if wall > 0 else 0.0,
        "req_s": len(ok) / wall if wall > 0 else 0.0,
        "mean_prompt_tokens": statistics.mean(prompt_tok) if prompt_tok else float("nan"),
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "tpot_p50_ms": percentile(tpot, 50) * 1e3,
        "latency_p50_ms": percentile(lat, 50) * 1e3,
        "latency_p99_ms": percentile(lat, 99) * 1e3,
        "failures": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if r["error"]})[:5],
        "per_request": results,
    }


def fetch_model(url, args):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=args.timeout)
    try:
        h = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        conn.request("GET", (u.path.rstrip("/") or "") + "/v1/models", headers=h)
        r = conn.getresponse()
        data = json.loads(r.read())
        return data["data"][0]["id"]
    finally:
        conn.close()


HEADER = ("| clients | requests | gen tok/s | req/s | prompt tok | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
          "| latency p50 ms | failures |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def row(r):
    return (f"| {r['clients']} | {r['requests']} | {r['gen_tok_s']:.1f} | {r['req_s']:.2f} | "
            f"{r['mean_prompt_tokens']:.0f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
            f"{r['tpot_p50_ms']:.2f} | {r['latency_p50_ms']:.0f} | {r['failures']} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:10002", help="server base URL (without /v1)")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default 64)")
    ap.add_argument("--prompt-len", type=int, default=64, help="approximate prompt length in words (default 64)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at end-of-generation")
    ap.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request socket timeout, seconds")
    ap.add_argument("--warmup", type=int, default=1, help="requests sent one at a time before measuring")
    ap.add_argument("--seed", type=int, default=0, help="prompt generator seed")
    ap.add_argument("--json", default=None, help="write all results (per request too) to this file")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1 or args.requests < 1 or args.max_tokens < 1:
        ap.error("--concurrency, --requests and --max-tokens must be positive")

    url = args.url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if args.model is None:
        try:
            args.model = fetch_model(url, args)
        except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as e:
            print(f"bench_serve: cannot read {url}/v1/models: {e}", file=sys.stderr)
            return 1
    rng = random.Random(args.seed)
    for _ in range(args.warmup):
        w = one_request(url, args, make_prompt(rng, args.prompt_len))
        if w["error"]:
            print(f"bench_serve: warm-up request failed: {w['error']}", file=sys.stderr)
            return 1

    print(f"model {args.model}, {args.requests} requests per level, max_tokens {args.max_tokens}, "
          f"prompt ~{args.prompt_len} words, temperature {args.temperature}\n")
    print(HEADER)
    rows = []
    for c in levels:
        r = run_level(url, args, c, rng)
        rows.append(r)
        print(row(r), flush=True)
        for e in r["errors"]:
            print(f"  error: {e}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"url": url, "model": args.model, "max_tokens": args.max_tokens,
                       "prompt_len": args.prompt_len, "requests": args.requests, "levels": rows}, f, indent=1)
    return 1 if any(r["failures"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
