"""Shard memory (issue 16): memfd shards the launcher holds, the file-backed mode, start-up
progress and /health while loading.

* Progress: a worker's shard build prints one line per 10% (NUMOE_PROGRESS=lines) whose
  percentages and byte counts only grow, then a final "done" line with the shard's bytes;
  the bar mode (NUMOE_PROGRESS=bar) ends with the same final line.
* --shard-memory file: the workers compute from the model file's pages (no copy), with
  the same tokens as --workers 0 and as ram shards, split and whole experts.
* `numoe serve` with a worker held before its shard build (NUMOE_TEST_BUILD_HOLD):
  /health is 503 {"status": "loading", "progress": p} with 0 < p < 1 once the other
  worker has registered, and 200 once the held one is released.
* A shard larger than /dev/shm (a 64 MiB tmpfs mounted over /dev/shm in a private mount
  namespace; each shard of the 0.7 GB V2-Lite-shaped model is ~150 MiB) loads, and a
  worker killed with SIGKILL mid-layer comes back by re-mapping its memfd, nothing
  copied from the model, with the tokens of an undisturbed run.
* A memory cgroup whose limit (256 MiB) is below the model's routed experts (~300 MiB):
  the launcher picks the file-backed mode by itself, and the run inside the cgroup gives
  the greedy tokens of an unlimited run; tok/s and the page-in count are printed.
The two big-model tests run the optimised tree only (the model is 0.7 GB of random
blocks, generated once per session in ~15 s)."""
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FIX_MODELS, ROOT, assert_clean, run, sanitizer_env
from serve_util import end_process, request
from waits import wait_until

TINY_SPLIT = FIX_MODELS / "deepseek-v3-tiny-F32-mla.gguf"  # F32: split cuts anywhere
TOKENS = "5,6,7,8,9"


@pytest.fixture(scope="module", params=["build", "build-asan"])
def exe(request):
    path = ROOT / request.param / "bin" / "numoe"
    if not path.exists() or not (path.parent / "numoe-worker").exists():
        if request.param == "build":
            pytest.fail("build/bin/numoe and numoe-worker are not built: run `make`")
        pytest.skip("no sanitizer build of numoe + numoe-worker")
    return path


@pytest.fixture(scope="session")
def big_model(tmp_path_factory):
    """V2-Lite widths, 2 layers (one dense, one MoE of 64 experts), Q4_K random blocks."""
    out = tmp_path_factory.mktemp("big") / "v2lite-2l-Q4_K.gguf"
    r = run(["python3", ROOT / "tests" / "gen_deepseek.py", "--shape", "v2-lite", "--layers", "2", "--type", "Q4_K",
             "--random-blocks", "-q", "-o", out])
    assert r.returncode == 0, r.stderr
    return out


def generate(exe, model, extra=(), env=None, n=8, prefix=()):
    e = sanitizer_env()
    e.update(env or {})
    r = run([*prefix, exe, "generate", "-m", model, "--tokens", TOKENS, "-n", n, "-t", "2", "--gpu", "none",
             "--worker-timeout", "120", *extra], env=e)
    assert_clean(r)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip(), r.stderr


PCT = re.compile(r"^numoe-worker 0: building its shard: (\d+)% \(([\d.]+) / ([\d.]+) GiB, [\d.]+ GB/s(, \d+ s left)?\)$",
                 re.M)
DONE = re.compile(r"numoe-worker 0: building its shard: done, ([\d.]+) GiB in [\d.]+ s \([\d.]+ GB/s\)$", re.M)


def shard_bytes(err):
    return [int(b) for b in re.findall(r"^numoe: worker \d+: pid \d+,.* shard (\d+) bytes", err, re.M)]


def test_progress_lines(exe):
    """One line per 10% crossed, growing; the final line names the shard's size."""
    _, err = generate(exe, TINY_SPLIT, ["--workers", "1"], env={"NUMOE_PROGRESS": "lines"}, n=1)
    lines = PCT.findall(err)
    assert len(lines) >= 3, err  # 3 MoE layers x 8 experts x 3 copies: most deciles are crossed
    pcts = [int(p) for p, *_ in lines]
    done = [float(d) for _, d, *_ in lines]
    assert pcts == sorted(set(pcts)) and all(10 <= p <= 90 and p % 10 == 0 for p in pcts), pcts
    assert done == sorted(done), done
    final = DONE.findall(err)
    assert len(final) == 1, err
    total = shard_bytes(err)[0]
    assert abs(float(final[0]) - total / 2**30) < 0.006, (final, total)
    # the final line comes after every percentage line
    assert err.rindex("building its shard: done") > err.rindex("% (")
    assert "numoe: shard memory: ram: the workers' shards" in err, err


def test_progress_bar(exe):
    """The bar redraws one line in place (\\r) and ends with the same final line."""
    _, err = generate(exe, TINY_SPLIT, ["--workers", "1"], env={"NUMOE_PROGRESS": "bar"}, n=1)
    # (text mode reads the \r as a line end) the bar's line is cleared, the final line drawn over it
    assert "\x1b[Knumoe-worker 0: building its shard: done, " in err, repr(err[-2000:])
    assert not PCT.search(err), err  # no 10% lines in bar mode
    _, err = generate(exe, TINY_SPLIT, ["--workers", "1"], env={"NUMOE_PROGRESS": "off"}, n=1)
    assert "building its shard" not in err, err


@pytest.mark.parametrize("placement,n", [("split", 2), ("experts", 3)])
def test_file_backed_same_tokens(exe, placement, n):
    """--shard-memory file: no copy, the file's layout (down's full row stride for a split
    piece), the tokens of the in-process run and of ram shards."""
    ref, _ = generate(exe, TINY_SPLIT, ["--workers", "0"], n=12)
    ram, err_ram = generate(exe, TINY_SPLIT, ["--workers", n, "--placement", placement, "--shard-memory", "ram"], n=12)
    out, err = generate(exe, TINY_SPLIT, ["--workers", n, "--placement", placement, "--shard-memory", "file"], n=12)
    assert out == ref == ram, (out, ref, ram)
    assert "numoe: shard memory: file (--shard-memory file)" in err, err
    assert len(re.findall(r"^numoe-worker \d: file-backed shard: computes from the model's pages", err, re.M)) == n, err
    assert "--shard-fd" not in err and "--shard-fd" in err_ram  # no memfd for a file-backed worker
    assert shard_bytes(err) == shard_bytes(err_ram)


def test_health_reports_loading(exe, tmp_path):
    """/health answers 503 loading with the load fraction while a worker is held before its
    shard build, and 200 once it is released."""
    hold = tmp_path / "release"
    log = tmp_path / "serve.log"
    env = sanitizer_env()
    env["NUMOE_TEST_BUILD_HOLD"] = f"1:{hold}"
    with open(log, "w") as f:
        p = subprocess.Popen([str(exe), "serve", "-m", str(TINY_SPLIT), "--port", "0", "--workers", "2", "--placement",
                              "split", "--gpu", "none", "-t", "2"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=f, env=env)
    try:
        m = wait_until(lambda: re.search(r"http://127\.0\.0\.1:(\d+)/health answers 503", log.read_text()), 120,
                       lambda: log.read_text()[-2000:])

        class S:
            host, port, api_key = "127.0.0.1", int(m.group(1)), None

        def half_loaded():
            assert p.poll() is None, log.read_text()[-3000:]
            st, _, body = request(S, "GET", "/health", timeout=10)
            js = json.loads(body)
            assert st == 503 and js["status"] == "loading", (st, js)
            return js if js["progress"] > 0 else None
        js = wait_until(half_loaded, 120, lambda: log.read_text()[-2000:])
        assert 0 < js["progress"] < 1 and set(js) == {"status", "progress"}, js
        assert abs(js["progress"] - 0.5) < 0.05, js  # split: worker 0 holds half the routed bytes
        hold.write_text("")

        def ready():
            assert p.poll() is None, log.read_text()[-3000:]
            st, _, body = request(S, "GET", "/health", timeout=10)
            return st == 200 and json.loads(body) == {"status": "ok"}
        wait_until(ready, 120, lambda: log.read_text()[-2000:])
    finally:
        end_process(p)
    assert "Sanitizer" not in log.read_text()


def test_shard_larger_than_dev_shm(big_model, tmp_path):
    """Each worker's shard (~150 MiB) is larger than the 64 MiB tmpfs mounted over /dev/shm:
    it loads into its memfd, and a worker SIGKILLed mid-layer is back by re-mapping it."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a private /dev/shm")
    exe = ROOT / "build" / "bin" / "numoe"
    ref, _ = generate(exe, big_model, ["--workers", "0"], n=6)
    shell = ("mount -t tmpfs -o size=64m tmpfs /dev/shm && df -B1 --output=size /dev/shm | tail -1 >&2 && "
             'exec "$@"')
    out, err = generate(exe, big_model, ["--workers", "2", "--placement", "split"], n=6,
                        env={"NUMOE_TEST_FAULT": "1:1:die-once"}, prefix=["unshare", "-m", "sh", "-c", shell, "sh"])
    assert int(err.split("\n", 1)[0]) == 64 << 20, err[:300]  # the small /dev/shm was in force
    shards = shard_bytes(err)
    assert len(shards) == 2 and min(shards) > 2 * (64 << 20), shards
    assert out == ref, (out, ref)
    m = re.search(r"^numoe: worker 1 restarted in ([\d.]+) ms \(attempt 1, pid \d+\)$", err, re.M)
    assert m, err[-3000:]
    assert re.search(r"^numoe-worker 1: re-mapped its persistent shard memfd:numoe-\d+-shard-1 read-only "
                     r"\(\d+ bytes, in [\d.]+ ms; nothing copied from the model\)$", err, re.M), err[-3000:]
    print(f"restart of a {shards[1] / 2**20:.0f} MiB shard with /dev/shm at 64 MiB: {m.group(1)} ms")


def memory_cgroup(tmp_name, limit):
    """A child memory cgroup of this process's (v1 or v2) with the limit; its directory,
    or None where none can be made."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    for ln in lines:
        _, ctrl, path = ln.split(":", 2)
        if ctrl == "memory" and Path("/sys/fs/cgroup/memory").is_dir():
            d = Path("/sys/fs/cgroup/memory" + path.rstrip("/")) / tmp_name
            limit_file = "memory.limit_in_bytes"
            break
        if ctrl == "" and (Path("/sys/fs/cgroup") / "cgroup.controllers").exists():
            parent = Path("/sys/fs/cgroup" + path.rstrip("/"))
            if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                continue
            d, limit_file = parent / tmp_name, "memory.max"
            break
    else:
        return None
    try:
        d.mkdir()
        (d / limit_file).write_text(str(limit))
    except OSError:
        return None
    return d


def test_models_larger_than_the_memory_limit(big_model):
    """The whole run inside a memory cgroup whose limit is below the routed experts:
    auto picks the file-backed mode, the tokens are those of an unlimited run."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a memory cgroup")
    exe = ROOT / "build" / "bin" / "numoe"
    limit = 256 << 20
    ref, err_ref = generate(exe, big_model, ["--workers", "2"], n=8)
    assert "numoe: shard memory: ram" in err_ref, err_ref
    d = memory_cgroup(f"numoe-test-{os.getpid()}", limit)
    if d is None:
        pytest.skip("no memory cgroup can be made here (cgroup v1 memory or v2 with memory delegated)")
    try:
        t0 = time.monotonic()
        out, err = generate(exe, big_model, ["--workers", "2"], n=8,
                            prefix=["sh", "-c", f'echo $$ > {d}/cgroup.procs && exec "$@"', "sh"])
        wall = time.monotonic() - t0
        stat = dict(ln.split() for ln in (d / "memory.stat").read_text().splitlines())
        peak_file = d / ("memory.max_usage_in_bytes" if (d / "memory.max_usage_in_bytes").exists() else "memory.peak")
        peak = int(peak_file.read_text()) if peak_file.exists() else -1
    finally:
        wait_until(lambda: not (d / "cgroup.procs").read_text().split(), 60, "the cgroup's processes to end")
        d.rmdir()
    routed = int(re.search(r"the model has (\d+)", err).group(1))
    assert routed > limit, (routed, limit)
    assert re.search(r"^numoe: shard memory: file: the workers' shards \([\d.]+ GiB\) do not fit 90% of the memory "
                     r"they may use \([\d.]+ GiB: cgroup memory limit ", err, re.M), err
    assert out == ref, (out, ref)
    assert 0 < peak <= limit, (peak, limit)
    tps = re.search(r"generated \d+ tokens in [\d.]+ s \(([\d.]+) tok/s\)", err).group(1)
    pgin = int(stat.get("pgpgin", stat.get("pgfault", "0")))
    print(f"limit {limit >> 20} MiB, routed {routed >> 20} MiB, file size {big_model.stat().st_size >> 20} MiB: "
          f"{tps} tok/s, {pgin} pages in ({pgin * 4096 / 2**20 / wall:.0f} MiB/s over the {wall:.1f} s run), "
          f"peak {peak >> 20} MiB")
