"""`evalscope perf` - the load tool the KTransformers write-ups benchmark servers
with - against `numoe serve`: streamed and whole chat completions at several
concurrencies must all succeed, and the token counts it reads from the
server's usage must be the ones asked for.

evalscope lives in its own virtual environment (tests/setup.sh puts it in
build/tools/evalscope) because its pins clash with the test packages. Its
datasets normally come from the network; here it reads prompts line by line
from a local file."""
import json
import pathlib
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import ROOT

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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not EVALSCOPE.exists():
        pytest.fail(f"{EVALSCOPE} is missing: run tests/setup.sh (make deps)")
    port = free_port()
    log = tmp_path_factory.mktemp("evalscope") / "server.log"
    with open(log, "w") as lf:
        proc = subprocess.Popen([str(ROOT / "build" / "bin" / "numoe"), "serve", "-m", str(MODEL), "--port", str(port),
                                 "-t", "2", "--max-batch-size", "4", "--quiet"], stdout=lf, stderr=lf)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("server did not become healthy:\n" + log.read_text()[-2000:])
    yield url
    proc.terminate()
    assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]


@pytest.mark.parametrize("parallel,stream", [(1, True), (4, True), (8, False)])
def test_evalscope_perf(server, tmp_path, parallel, stream):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    number = 2 * parallel + 4
    cmd = [str(EVALSCOPE), "perf", "--url", server + "/v1/chat/completions", "--model",
           "deepseek-v3-tiny-F32-mla", "--api", "openai", "--dataset", "line_by_line", "--dataset-path",
           str(prompts), "--parallel", str(parallel), "--number", str(number), "--max-tokens", "24",
           "--min-tokens", "24", "--extra-args", json.dumps({"ignore_eos": True}),
           "--outputs-dir", str(tmp_path / "out"), "--no-timestamp", "--stream" if stream else "--no-stream"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    found = list((tmp_path / "out").rglob("benchmark_summary.json"))
    assert len(found) == 1, (p.stdout + p.stderr)[-4000:]
    summary = json.loads(found[0].read_text())
    assert summary["Total Requests"] == number
    assert summary["Success Requests"] == number and summary["Failed Requests"] == 0, summary
    # ignore_eos + max_tokens: every answer is exactly 24 tokens by the server's own usage count
    assert summary["Avg Output Tokens"] == 24, summary
