"""`evalscope perf` - the load tool the KTransformers write-ups benchmark servers
with - against `numoe serve`: streamed and whole chat completions at several
concurrencies must all succeed, and the token counts it reads from the
server's usage must be the ones asked for.

evalscope lives in its own virtual environment (tests/setup.sh puts it in
build/tools/evalscope) because its pins clash with the test packages. Its
datasets normally come from the network; here it reads prompts line by line
from a local file."""
import json
import subprocess
import urllib.request

import pytest

from conftest import ROOT
from serve_util import metric, parse_metrics, wait_listening

EVALSCOPE = ROOT / "build" / "tools" / "evalscope" / "bin" / "evalscope"
MODEL = ROOT / "tests" / "fixtures" / "models" / "deepseek-v3-tiny-F32-mla.gguf"
PROMPTS = [
    "Tell me about the weather in Paris.",
    "What is a mixture of experts?",
    "Write a haiku about memory bandwidth.",
    "Explain what a KV cache holds.",
    "List three prime numbers.",
    "Why do GPUs need so much memory?",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not EVALSCOPE.exists():
        pytest.fail(f"{EVALSCOPE} is missing: run tests/setup.sh (make deps)")
    log = tmp_path_factory.mktemp("evalscope") / "server.log"
    with open(log, "w") as lf:
        # --port 0: the OS picks a free port, the listening line says which
        proc = subprocess.Popen([str(ROOT / "build" / "bin" / "numoe"), "serve", "-m", str(MODEL), "--port", "0",
                                 "-t", "2", "--max-batch-size", "4", "--quiet"], stdout=lf, stderr=lf)
    host, port = wait_listening(proc, log.read_text, 90)
    url = f"http://{host}:{port}"
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert (r.status, json.loads(r.read())) == (200, {"status": "ok"})
    yield url
    proc.terminate()
    assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]


def _counters(url):
    with urllib.request.urlopen(url + "/metrics", timeout=20) as r:
        samples, _ = parse_metrics(r.read().decode())
    return {n: metric(samples, n) for n in ("numoe_requests_finished_total", "numoe_requests_cancelled_total",
                                            "numoe_requests_failed_total", "numoe_generation_tokens_total",
                                            "numoe_active_requests", "numoe_queue_depth")}


@pytest.mark.parametrize("parallel,stream", [(1, True), (4, True), (8, False)])
def test_evalscope_perf(server, tmp_path, parallel, stream):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    number = 2 * parallel + 4
    cmd = [str(EVALSCOPE), "perf", "--url", server + "/v1/chat/completions", "--model",
           "deepseek-v3-tiny-F32-mla", "--api", "openai", "--dataset", "line_by_line", "--dataset-path",
           str(prompts), "--parallel", str(parallel), "--number", str(number), "--max-tokens", "24",
           "--min-tokens", "24", "--extra-args", json.dumps({"ignore_eos": True}),
           "--outputs-dir", str(tmp_path / "out"), "--no-timestamp", "--stream" if stream else "--no-stream",
           "--no-test-connection"]  # no extra probe request: the server sees exactly NUMBER
    before = _counters(server)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    found = list((tmp_path / "out").rglob("benchmark_summary.json"))
    assert len(found) == 1, (p.stdout + p.stderr)[-4000:]
    summary = json.loads(found[0].read_text())
    assert summary["Total Requests"] == number
    assert summary["Success Requests"] == number and summary["Failed Requests"] == 0, summary
    # ignore_eos + max_tokens: every answer is exactly 24 tokens by the server's own usage count
    assert summary["Avg Output Tokens"] == 24, summary
    # and by the server's own count: NUMBER requests of 24 tokens each, all finished, none left running
    after = _counters(server)
    assert {k: after[k] - before[k] for k in after} == {
        "numoe_requests_finished_total": number, "numoe_requests_cancelled_total": 0,
        "numoe_requests_failed_total": 0, "numoe_generation_tokens_total": 24 * number,
        "numoe_active_requests": 0, "numoe_queue_depth": 0}, (before, after)
