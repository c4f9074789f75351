"""Routed experts in numoe-worker processes (`--workers N`, coordinator/experts/,
worker/, proto/).

* Logits with N = 1, 2, 3 workers equal the in-process logits (--workers 0) to a max
  relative difference <= 1e-5 of each row's max, for both placement families (split,
  experts; experts-rr once), on the V2- and V3-style fixtures (F32 and Q8_0), prefill
  (one batch), decode (--decode-from 0) and chunked prefill then decode (-b 4). The stock fixtures' experts are 32 wide, one
  Q8_0 block, so `split` over 2-3 workers is impossible there (a clear error is checked);
  Q8_0 and Q4_K models with wider experts (96 = 3 Q8_0 blocks, 512 = 2 Q4_K blocks) are
  generated on the fly for the split comparisons of quantised weights.
* Workers hold Q4_K / Q5_0 experts as pre-packed tiles where the CPU runs them (the
  Q4_K model above): one worker's logits equal the in-process ones (rows packed per
  call) bit for bit, 1-3 workers, prefill, decode, chunked; NUMOE_ISA=avx2 keeps rows;
  a restarted worker re-maps its shard of tiles.
* The workers' shard bytes (reported in Register, printed by numoe) add up to the model's
  routed-expert bytes as `numoe inspect` counts them.
* Bad input gets a clear error: wrong protocol version, a node that does not exist, an
  impossible placement, a worker that dies / fails / hangs mid-run.
* No worker process and no /dev/shm/numoe-* object outlives a run, a failed run, a SIGINT
  or a SIGKILL of the coordinator.
* Supervision: a worker killed (SIGKILL) in the middle of a greedy generation, or crashing
  in the middle of a layer (NUMOE_TEST_FAULT=W:L:die-once), is restarted; the generation
  gives the same tokens / logits, the restart line is printed (its time is a figure for
  docs/, not checked here) and the worker re-maps its persistent shard (the memfd
  numoe-<pid>-shard-<id> the launcher holds) instead of re-reading the model; no process
  holds one after the run or after SIGINT (test_memory.py has the shard memory modes).
* `--workers N` without --placement: split, or whole experts with one line saying why
  when split cannot cut this model's experts; an explicit --placement split still fails.
Whatever another process does is waited for (tests/waits.py), never read once after a
sleep, and no test has a speed limit: a busy 2-core machine is slow, not wrong.
The placement validator's own unit tests are tests/unit/test_placement.c."""
import dataclasses
import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FIX_MODELS as FIX, WORKER_MODELS as MODELS, WORKER_SEQ as SEQ, WORKER_TOL as TOL
from conftest import assert_clean, run, sanitizer_env
from waits import wait_until

MODES = {"prefill": [], "decode": ["--decode-from", "0"], "chunked": ["--decode-from", "10", "-b", "4"]}


@pytest.fixture(scope="module")
def exe(exe_and_worker):
    return exe_and_worker


@pytest.fixture(scope="session")
def wide(tmp_path_factory):
    """Models whose experts are several quantisation blocks wide, so `split` can cut them:
    tiny V2/V3 shapes with expert ff 96 (Q8_0: 3 blocks) and a V3 with ff 512 (Q4_K down
    rows: 2 blocks of 256)."""
    pytest.importorskip("gguf")
    import gen_deepseek
    d = tmp_path_factory.mktemp("wide")
    out = {}
    for key, base, ff, typ, layout in (("v2-ff96-Q8_0", "tiny-v2", 96, "Q8_0", "legacy"),
                                       ("v3-ff96-Q8_0", "tiny-v3", 96, "Q8_0", "mla"),
                                       ("v3-ff512-Q4_K", "tiny-v3", 512, "Q4_K", "mla")):
        name = f"{base}-ff{ff}"
        if name not in gen_deepseek.SHAPES:
            gen_deepseek.SHAPES[name] = dataclasses.replace(gen_deepseek.SHAPES[base], name=name, n_ff_exp=ff)
        path = d / f"{key}.gguf"
        rc = gen_deepseek.main(["--shape", name, "--type", typ, "--attn-layout", layout, "-q", "-o", str(path)])
        assert rc in (0, None) and path.exists()
        out[key] = path
    return out


def worker_pids(stderr):
    return [int(p) for p in re.findall(r"^numoe: worker \d+: pid (\d+),", stderr, re.M)]


def alive(pid):
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def shm_of(pid):
    return sorted(Path("/dev/shm").glob(f"numoe-{pid}-*"))


def shard_maps(pid):
    """The memfd shards process pid maps ("memfd:numoe-<launcher>-shard-<id>")."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return set(re.findall(r"/(memfd:numoe-\d+-shard-\d+)", maps))


def assert_no_leftovers(coord_pid, pids, wait=60.0):
    """Every process in pids ends and every /dev/shm/numoe-<coord_pid>-* name goes
    (waited for: a process being torn down takes its time on a busy machine)."""
    wait_until(lambda: not [p for p in pids if alive(p)], wait,
               lambda: f"the processes {[p for p in pids if alive(p)]} to end (left behind?)")
    wait_until(lambda: not shm_of(coord_pid), wait, lambda: f"shm objects {shm_of(coord_pid)} to be removed")


def generate(exe, model, extra=(), env=None, tokens=SEQ, n=0, tmp_path=None, tag="x"):
    """Runs numoe generate with workers in its own process (Popen, so we know its pid
    for the shm check); returns (logits or None, returncode, stderr)."""
    dump = tmp_path / f"{model.stem}-{tag}.bin"
    if dump.exists():
        dump.unlink()
    e = sanitizer_env()
    e.update(env or {})
    cmd = [str(exe), "generate", "-m", str(model), "--tokens", ",".join(map(str, tokens)), "-n", str(n), "-t", "2",
           "--dump-logits", str(dump), *map(str, extra)]
    if "--worker-timeout" not in cmd:
        cmd += ["--worker-timeout", "60"]  # a hang fails in a minute, not five
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", env=e)
    try:
        out, err = p.communicate(timeout=600)  # a hang, not a speed limit
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"numoe generate did not end within 600 s: {err[-3000:]}")
    proc = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    assert_clean(proc)
    assert_no_leftovers(p.pid, worker_pids(err))
    logits = None
    if p.returncode == 0:
        logits = np.fromfile(dump, dtype=np.float32).reshape(len(tokens) + n, -1).astype(np.float64)
    return logits, p.returncode, err


_base = {}


def baseline(exe, model, mode, tmp_path):
    key = (str(exe), str(model), mode)
    if key not in _base:
        # --workers 0 said: the default is one worker per NUMA node, not the in-process backend
        logits, rc, err = generate(exe, model, [*MODES[mode], "--workers", 0], tmp_path=tmp_path, tag=f"w0-{mode}")
        assert "routed experts in workers" not in err, err
        assert rc == 0, err
        _base[key] = logits
    return _base[key]


def rel_diff(a, b):
    return float((np.abs(a - b).max(1) / np.abs(a).max(1)).max())


def compare(exe, model, n, placement, mode, tmp_path, env=None):
    ref = baseline(exe, model, mode, tmp_path)
    got, rc, err = generate(exe, model, [*MODES[mode], "--workers", n, "--placement", placement], env=env,
                            tmp_path=tmp_path, tag=f"w{n}-{placement}-{mode}")
    assert rc == 0, err
    assert len(worker_pids(err)) == n, err
    d = rel_diff(ref, got)
    assert d <= TOL, (model.name, n, placement, mode, d)
    return err


def split_blocks(model):
    """Blocks of 32 in an expert's ff dimension of the stock fixtures (F32: no blocks)."""
    return None if "F32" in model.name else 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("placement", ["split", "experts"])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("key", MODELS)
def test_logits_equal_in_process(exe, key, n, placement, mode, tmp_path):
    model = MODELS[key]
    if placement == "split" and split_blocks(model) is not None and n > split_blocks(model):
        # one Q8_0 block per expert row: cannot be cut; clear error, no worker started
        _, rc, err = generate(exe, model, [*MODES[mode], "--workers", n, "--placement", "split"], tmp_path=tmp_path)
        assert rc == 1, err
        assert "cannot be split between" in err and "use --placement experts or at most 1 worker" in err, err
        assert not worker_pids(err), err
        return
    compare(exe, model, n, placement, mode, tmp_path)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("key", ["v2-ff96-Q8_0", "v3-ff96-Q8_0"])
def test_split_quantised_wide_experts(exe, wide, key, n, mode, tmp_path):
    """Q8_0 down rows cut at block boundaries (3 blocks over 2 workers: 2 + 1) and repacked."""
    compare(exe, wide[key], n, "split", mode, tmp_path)


def test_split_k_quant(exe, wide, tmp_path):
    """Q4_K down rows of 512 = 2 super-blocks: 2 workers split them, 3 cannot.

    Split changes the order of float additions inside each expert (two partial dots
    added instead of one dot over 512 columns): ~1e-7 of the MoE output. In this model
    every matrix after the MoE (attention, the Q6_K output head) quantises its input to
    Q8_K, and where a value sits on a rounding boundary that 1e-7 moves it by one
    quantisation step (1/127 of its block's max), i.e. up to ~1% of a logit row at a
    few positions (measured on an 8-token prompt: the routed-expert outputs of the two
    runs agree to 1e-5 at every position and layer, the logits differ by 0.8% and 1.0%
    at 2 positions). So here: one worker (same order) equal to 1e-5, two workers equal
    to 1e-5 at most positions and within about a quantisation step at all; a wrong cut
    or repack of the K-quant blocks is off by far more everywhere."""
    model = wide["v3-ff512-Q4_K"]
    for mode in MODES:
        compare(exe, model, 1, "split", mode, tmp_path)
        ref = baseline(exe, model, mode, tmp_path)
        got, rc, err = generate(exe, model, [*MODES[mode], "--workers", 2, "--placement", "split"],
                                tmp_path=tmp_path, tag=f"k2-{mode}")
        assert rc == 0, err
        rel = np.abs(ref - got).max(1) / np.abs(ref).max(1)
        assert (rel <= TOL).mean() >= 0.75 and rel.max() <= 2e-2, (mode, rel)
    _, rc, err = generate(exe, model, ["--workers", 3, "--placement", "split"], tmp_path=tmp_path)
    assert rc == 1 and "blocks of 256" in err and "at most 2 workers" in err, err


TILES_LINE = re.compile(r"^numoe-worker (\d+): shard of (\d+) bytes \((\d+) bytes of rows\): (\d+) bytes are experts' "
                        r"matrices as packed tiles", re.M)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("placement,n", [("split", 1), ("experts", 1), ("experts", 2), ("experts", 3)])
def test_tiles_in_shard_equal_in_process(exe, wide, placement, n, mode, tmp_path):
    """On a Q4_K model whose widths are whole Q4_K blocks (embd 256, expert ff 512) every
    worker holds its experts as pre-packed tiles (kernels/tile.h; the line saying so,
    tiles a little over their rows' bytes), while the in-process backend packs the rows
    per call: one worker gives the in-process logits bit for bit (same numbers, same
    order of additions), 2-3 workers within WORKER_TOL (partial sums added in another
    order). Skipped where this CPU has no AVX512-VNNI tiles."""
    model = wide["v3-ff512-Q4_K"]
    ref = baseline(exe, model, mode, tmp_path)
    got, rc, err = generate(exe, model, [*MODES[mode], "--workers", n, "--placement", placement],
                            tmp_path=tmp_path, tag=f"tiles-{n}-{placement}-{mode}")
    assert rc == 0, err
    lines = TILES_LINE.findall(err)
    if not lines:
        assert "avx512vnni" not in err, err  # the engine line names the ISA: tiles would have been used
        pytest.skip("no AVX512-VNNI tiles on this CPU")
    assert sorted(int(w) for w, *_ in lines) == list(range(n)), err
    for _, mem, rows, tiled in lines:
        assert int(tiled) == int(mem) and int(rows) < int(mem) <= int(rows) * 1.03, lines  # Q4_K: 2368 / 2304
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0, ref  # real logits, not a run that computed nothing
    if n == 1:
        assert np.array_equal(ref, got), (mode, rel_diff(ref, got))
    else:
        assert rel_diff(ref, got) <= TOL, (mode, rel_diff(ref, got))


def test_tiles_not_used_below_vnni(exe, wide, tmp_path):
    """NUMOE_ISA=avx2: the tiles cannot run, so the shard holds rows (no tiles line, the
    shard is its rows' bytes) and the worker still gives the in-process logits (of the
    same ISA) bit for bit."""
    model = wide["v3-ff512-Q4_K"]
    env = {"NUMOE_ISA": "avx2"}
    ref, rc, err = generate(exe, model, ["--workers", 0], env=env, tmp_path=tmp_path, tag="avx2-w0")
    assert rc == 0, err
    got, rc, err = generate(exe, model, ["--workers", 1], env=env, tmp_path=tmp_path, tag="avx2-w1")
    assert rc == 0, err
    assert not TILES_LINE.search(err), err
    assert np.array_equal(ref, got), rel_diff(ref, got)


def test_tiles_restart_remaps(exe, wide, tmp_path):
    """A worker holding tiles that dies mid-layer re-maps its persistent shard of tiles
    (nothing packed again) and the logits are the in-process ones bit for bit."""
    model = wide["v3-ff512-Q4_K"]
    ref = baseline(exe, model, "prefill", tmp_path)
    got, rc, err = generate(exe, model, ["--workers", 1, "--placement", "split"], tmp_path=tmp_path, tag="tiles-crash",
                            env={"NUMOE_TEST_FAULT": "0:2:die-once"})
    assert rc == 0, err
    assert re.search(r"^numoe: worker 0 restarted in [\d.]+ ms \(attempt 1, pid \d+\)$", err, re.M), err
    assert "numoe-worker 0: re-mapped its persistent shard memfd:numoe-" in err, err
    if TILES_LINE.search(err):
        assert np.array_equal(ref, got), rel_diff(ref, got)
    else:
        assert rel_diff(ref, got) <= TOL


def test_round_robin_and_zmq_handoff(exe, tmp_path):
    model = MODELS["v3-F32"]
    compare(exe, model, 3, "experts-rr", "decode", tmp_path)
    # the per-layer hand-off over ZeroMQ messages instead of the doorbell: same numbers
    err = compare(exe, model, 2, "split", "prefill", tmp_path, env={"NUMOE_HANDOFF": "zmq"})
    assert "ZeroMQ hand-off" in err


def test_experts_used_lowered(exe, tmp_path):
    """--experts-used below the model's count: fewer ids per token in the slot rows."""
    model = MODELS["v3-Q8_0"]
    ref, rc, err = generate(exe, model, ["--experts-used", 2, "--workers", 0], tmp_path=tmp_path, tag="k2-local")
    assert rc == 0, err
    got, rc, err = generate(exe, model, ["--experts-used", 2, "--workers", 2, "--placement", "experts-rr"],
                            tmp_path=tmp_path, tag="k2-workers")
    assert rc == 0, err
    assert rel_diff(ref, got) <= TOL


def test_bound_to_node_0(exe, tmp_path):
    """--worker-nodes 0 (a node that exists everywhere): workers bound with hwloc, same logits."""
    model = MODELS["v3-F32"]
    ref = baseline(exe, model, "prefill", tmp_path)
    got, rc, err = generate(exe, model, ["--workers", 2, "--worker-nodes", 0], tmp_path=tmp_path, tag="node0")
    assert rc == 0, err
    assert len(re.findall(r"^numoe: worker \d+: pid \d+, node 0,", err, re.M)) == 2, err
    assert rel_diff(ref, got) <= TOL


def test_generated_tokens_equal(exe, tmp_path):
    """Greedy generation (prefill, then decode steps through the workers) gives the same ids."""
    model = MODELS["v2-F32"]
    outs = []
    for extra in (["--workers", "0"], ["--workers", "2", "--placement", "split"], ["--workers", "3", "--placement", "experts"]):
        proc = run([exe, "generate", "-m", model, "--tokens", "5,6,7,8", "-n", "24", "-t", "2", *extra])
        assert_clean(proc)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout.strip())
    assert outs[0] == outs[1] == outs[2], outs


def inspect_routed_bytes(exe, model):
    proc = run([exe, "inspect", model, "--no-tensors"])
    assert proc.returncode == 0, proc.stderr
    return int(re.search(r"routed experts :\s+(\d+) bytes", proc.stdout).group(1))


@pytest.mark.parametrize("placement,n", [("split", 1), ("split", 2), ("split", 3), ("experts", 2), ("experts", 3),
                                         ("experts-rr", 3)])
def test_shard_bytes_add_up(exe, placement, n, tmp_path):
    model = MODELS["v3-F32"]
    routed = inspect_routed_bytes(exe, model)
    _, rc, err = generate(exe, model, ["--workers", n, "--placement", placement], tmp_path=tmp_path, tokens=[1])
    assert rc == 0, err
    shards = [int(b) for b in re.findall(r"^numoe: worker \d+: pid \d+, .* shard (\d+) bytes", err, re.M)]
    assert len(shards) == n, err
    assert sum(shards) == routed, (shards, routed)
    assert all(s > 0 for s in shards)
    total = re.search(r"hold (\d+) bytes of routed experts; the model has (\d+)", err)
    assert total and int(total.group(1)) == int(total.group(2)) == routed, err
    if placement == "split" and n > 1:
        assert max(shards) - min(shards) <= routed // 32, shards  # 32 ff columns in F32: near-equal slices


def test_shard_bytes_quantised(exe, wide, tmp_path):
    model = wide["v3-ff96-Q8_0"]
    routed = inspect_routed_bytes(exe, model)
    _, rc, err = generate(exe, model, ["--workers", 2, "--placement", "split"], tmp_path=tmp_path, tokens=[1])
    assert rc == 0, err
    shards = [int(b) for b in re.findall(r"shard (\d+) bytes", err)]
    assert sum(shards) == routed and len(shards) == 2, (shards, routed)


def test_protocol_version_mismatch(exe, tmp_path):
    _, rc, err = generate(exe, MODELS["v3-Q8_0"], ["--workers", 2, "--placement", "experts"], tmp_path=tmp_path,
                          env={"NUMOE_FAKE_PROTOCOL_VERSION": "99"})
    assert rc == 1, err
    assert re.search(r"worker \d speaks numoe protocol version 99, this coordinator speaks version 1", err), err


def test_node_that_does_not_exist(exe, tmp_path):
    _, rc, err = generate(exe, MODELS["v3-F32"], ["--workers", 2, "--worker-nodes", "0,77"], tmp_path=tmp_path)
    assert rc == 1, err
    assert "worker 1: NUMA node 77 does not exist; this machine has" in err, err


def test_worker_binary_node_error_and_usage(exe):
    worker = exe.parent / "numoe-worker"
    proc = run([worker, "--model", MODELS["v3-F32"], "--worker-id", "0", "--workers", "1", "--placement", "split",
                "--node", "77", "--endpoint", "ipc://@numoe-test-nobody-listens"], timeout=60)
    assert_clean(proc)
    assert proc.returncode == 3 and "numoe-worker 0: NUMA node 77 does not exist" in proc.stderr, proc.stderr
    proc = run([worker, "--model", MODELS["v3-F32"], "--worker-id", "0", "--workers", "1", "--placement", "split"])
    assert proc.returncode == 2 and "--endpoint is required" in proc.stderr, proc.stderr
    proc = run([worker, "--model", "x", "--worker-id", "2", "--workers", "2", "--placement", "split",
                "--endpoint", "ipc://@x"])
    assert proc.returncode == 2 and "--worker-id 2 is not below --workers 2" in proc.stderr, proc.stderr
    proc = run([worker, "--placement", "diagonal"])
    assert proc.returncode == 2 and "bad value 'diagonal' for --placement" in proc.stderr, proc.stderr


def test_bad_options(exe, tmp_path):
    model = MODELS["v3-F32"]
    proc = run([exe, "generate", "-m", model, "--tokens", "1", "--placement", "diagonal"])
    assert proc.returncode == 2 and "--placement must be split, experts, experts-rr or a readable map file" in proc.stderr
    proc = run([exe, "generate", "-m", model, "--tokens", "1", "--workers", "-1"])
    assert proc.returncode == 2 and "--workers needs an integer" in proc.stderr
    proc = run([exe, "generate", "-m", model, "--tokens", "1", "--worker-nodes", "0,x"])
    assert proc.returncode == 2 and "--worker-nodes needs comma-separated" in proc.stderr
    _, rc, err = generate(exe, model, ["--workers", 9, "--placement", "experts"], tmp_path=tmp_path, tokens=[1])
    assert rc == 1 and "8 experts per layer cannot be placed whole on 9 workers" in err, err
    env = {"NUMOE_WORKER": str(tmp_path / "no-such-worker")}
    _, rc, err = generate(exe, model, ["--workers", 1], tmp_path=tmp_path, tokens=[1], env=env)
    assert rc == 1 and "cannot run the worker binary" in err and "no-such-worker" in err, err


FALLBACK = "numoe: placement experts (whole experts per worker) instead of the default split, which cannot hold"


def test_default_placement_falls_back_to_whole_experts(exe, tmp_path):
    """`--workers N` without --placement: split where it can cut the experts (F32:
    32 columns), whole experts where it cannot (the stock Q8_0 experts are one block
    wide), said in one line with the reason; logits as in-process either way. An
    explicit --placement split is not overridden, and where neither fits the split
    error stands."""
    q8 = MODELS["v3-Q8_0"]
    ref = baseline(exe, q8, "prefill", tmp_path)
    got, rc, err = generate(exe, q8, ["--workers", 2], tmp_path=tmp_path, tag="default-q8")
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("numoe: placement experts")]
    assert lines == [f"{FALLBACK} this model on 2 workers: layer 1: ffn_down_exps rows are 32 columns in blocks of "
                     "32, so an expert's ff dimension has only 1 block and cannot be split between 2 workers at "
                     "block boundaries"], err
    assert len(re.findall(r"^numoe: worker \d: .*numoe-worker .* --placement experts --endpoint", err, re.M)) == 2, err
    assert "numoe: 2 workers (placement experts, doorbell hand-off)" in err, err
    assert rel_diff(ref, got) <= TOL

    f32 = MODELS["v3-F32"]  # split can cut these: it stays the default, nothing said
    ref = baseline(exe, f32, "prefill", tmp_path)
    got, rc, err = generate(exe, f32, ["--workers", 2], tmp_path=tmp_path, tag="default-f32")
    assert rc == 0, err
    assert "numoe: 2 workers (placement split, doorbell hand-off)" in err and FALLBACK not in err, err
    assert rel_diff(ref, got) <= TOL

    _, rc, err = generate(exe, q8, ["--workers", 2, "--placement", "split"], tmp_path=tmp_path)
    assert rc == 1 and FALLBACK not in err, err
    assert "cannot be split between 2 workers" in err and "use --placement experts or at most 1 worker" in err, err
    assert not worker_pids(err), err

    # 9 workers, 8 experts: whole experts do not fit either; the split error is reported
    _, rc, err = generate(exe, q8, ["--workers", 9], tmp_path=tmp_path, tokens=[1])
    assert rc == 1 and FALLBACK not in err, err
    assert "cannot be split between 9 workers" in err, err


@pytest.mark.parametrize("fault,expect", [
    ("1:2:die", r"worker 1 \(pid \d+\) died while computing layer 2; "
                r"worker 1 \(pid \d+\) killed by signal 9 \(Killed\); gave up after 4 restart attempts"),
    ("0:1:error", r"worker 0 \(pid \d+\) failed layer 1: injected failure"),
    ("2:2:hang", r"worker 2 \(pid \d+\) did not answer layer 2 within 2 s \(--worker-timeout\); "
                 r"worker 2 \(pid \d+\) killed by signal 9 \(Killed\); gave up after 4 restart attempts"),
])
def test_worker_failures_are_named(exe, fault, expect, tmp_path):
    # the message names how each failure was seen (death, an Error message, the 2 s
    # --worker-timeout); generate()'s deadline catches a hang
    _, rc, err = generate(exe, MODELS["v3-F32"], ["--workers", 3, "--worker-timeout", 2], tmp_path=tmp_path,
                          env={"NUMOE_TEST_FAULT": fault}, n=4)
    assert rc == 1, err
    assert re.search(expect, err), err
    # restarts of a worker that fails every time: each new pid is gone too
    restarted = [int(q) for q in re.findall(r"^numoe: worker \d+ restarted in [\d.]+ ms \(attempt \d+, pid (\d+)\)", err, re.M)]
    assert not [q for q in restarted if alive(q)]


def wait_for_line(p, log, text, timeout=120):
    """Waits until the stderr log of p has `text` (p must not end first)."""
    def seen():
        assert p.poll() is None, f"ended ({p.returncode}) before printing {text!r}: {log.read_text()[-3000:]}"
        return text in log.read_text()
    wait_until(seen, timeout, lambda: f"{text!r} in the log: {log.read_text()[-3000:]}")


def cpu_seconds(pid):
    """CPU time (user + system) pid has used, all its threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    f = stat[stat.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def wait_computing(pids, seconds=0.3, timeout=120):
    """Waits until each process has used `seconds` more CPU time than now: after its
    model loaded, that is time in the forward pass (its thread pool has run)."""
    for pid in pids:
        t0 = cpu_seconds(pid)
        wait_until(lambda: cpu_seconds(pid) >= t0 + seconds, timeout, f"process {pid} to compute for {seconds} s")


def start_long_run(exe, tmp_path, n_workers=3):
    """A bench that runs for minutes; returns (Popen, stderr path, worker pids) once the
    workers are up, the model loaded and the coordinator computing."""
    log = tmp_path / "stderr.txt"
    f = open(log, "w")
    p = subprocess.Popen([str(exe), "bench", "-m", str(MODELS["v3-F32"]), "-p", "32", "-n", "64", "-r", "1000000",
                          "-t", "1", "--workers", str(n_workers)], stdout=subprocess.DEVNULL, stderr=f,
                         env=sanitizer_env())
    f.close()
    wait_for_line(p, log, "routed experts in workers")
    # the line is the coordinator's (named numoe-coordinat by then); into its repetitions
    coord, = wait_until(lambda: children_named(p.pid, "numoe-coordinat"), 60, "the coordinator process")
    wait_computing([coord])
    pids = worker_pids(log.read_text())
    assert len(pids) == n_workers, log.read_text()
    assert all(alive(q) for q in pids)
    return p, log, pids


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_no_leftovers_after_signal(exe, sig, tmp_path):
    """The coordinator dies of a signal mid-run: its workers end (PR_SET_PDEATHSIG) and no
    shm object is left (the workers unlinked the names when they mapped the slots)."""
    p, log, pids = start_long_run(exe, tmp_path)
    p.send_signal(sig)
    p.wait(timeout=60)
    assert p.returncode == -sig
    assert_no_leftovers(p.pid, pids)
    assert "Sanitizer" not in log.read_text(), log.read_text()[-3000:]


def test_coordinator_crash_cleans_up(exe, tmp_path):
    """The coordinator dies (kill -9) mid-run: the launcher ends the workers, removes
    every /dev/shm name of the run and dies of the same signal."""
    p, log, pids = start_long_run(exe, tmp_path, n_workers=2)
    coord, = children_named(p.pid, "numoe-coordinat")
    assert sorted(children_named(p.pid, "numoe-worker")) == sorted(pids)
    os.kill(coord, signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert_no_leftovers(p.pid, pids + [coord])


def test_restarts_off(exe, tmp_path):
    """NUMOE_WORKER_RESTARTS=0: a worker that dies is not restarted and the run fails
    naming it: seen as a death ("died while computing"), not through --worker-timeout."""
    _, rc, err = generate(exe, MODELS["v3-F32"], ["--workers", 2], tmp_path=tmp_path, n=4,
                          env={"NUMOE_TEST_FAULT": "1:2:die", "NUMOE_WORKER_RESTARTS": "0"})
    assert rc == 1, err
    assert re.search(r"worker 1 \(pid \d+\) died while computing layer 2; worker 1 \(pid \d+\) killed by signal 9 "
                     r"\(Killed\); not restarted \(NUMOE_WORKER_RESTARTS=0\)", err), err
    assert "restarting it" not in err, err


def test_launcher_prints_worker_command_lines(exe, tmp_path):
    """Each worker's command line, as a user would start it by hand, is printed (with the
    numactl binding when the worker is bound to a node)."""
    _, rc, err = generate(exe, MODELS["v3-F32"], ["--workers", 2, "--worker-nodes", "0"], tmp_path=tmp_path)
    assert rc == 0, err
    for i in range(2):
        m = re.search(rf"^numoe: worker {i}: numactl --cpunodebind=0 --membind=0 (\S+numoe-worker) .*--worker-id {i} "
                      r"--workers 2 .*--node 0 ", err, re.M)
        assert m, err


def cpus_allowed(pid):
    """CPUs pid (or "pid/task/tid") may run on."""
    text = Path(f"/proc/{pid}/status").read_text()
    spec = re.search(r"^Cpus_allowed_list:\s*(\S+)", text, re.M).group(1)
    out = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def test_workers_sharing_a_node_split_its_cores(exe, tmp_path):
    """More workers than NUMA nodes: each worker runs on its own share of the node's
    cores (numactl --physcpubind=... in the printed line), so they never compete."""
    if len(os.sched_getaffinity(0)) < 2 or len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) != 1:
        pytest.skip("needs one NUMA node with at least 2 CPUs")
    p, log, pids = start_long_run(exe, tmp_path, n_workers=2)
    try:
        sets = [cpus_allowed(q) for q in pids]
        assert sets[0] and sets[1] and not sets[0] & sets[1], sets
        err = log.read_text()
        for i in range(2):
            assert re.search(rf"^numoe: worker {i}: numactl --physcpubind=\S+ --membind=0 ", err, re.M), err
        threads = [int(t) for t in re.findall(r"^numoe: worker \d+: pid \d+, node -, (\d+) threads", err, re.M)]
        assert threads == [len(sets[0]), len(sets[1])], (threads, sets)
    finally:
        p.terminate()
        p.wait(timeout=30)


def pinned_threads(pid):
    """CPU of each thread of pid that may run on exactly one CPU."""
    out = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpus = cpus_allowed(f"{pid}/task/{t.name}")
        except (OSError, AttributeError):
            continue
        if len(cpus) == 1:
            out += list(cpus)
    return sorted(out)


@pytest.mark.parametrize("pin", ["default", "0"])
def test_compute_threads_pinned(exe, pin, tmp_path):
    """With a worker, the coordinator's and the worker's compute threads each stay on one
    CPU of their own (thread i on CPU i); NUMOE_PIN_THREADS=0 leaves them to the
    scheduler, and so does the in-process backend by default."""
    n = len(os.sched_getaffinity(0))
    if n < 2:
        pytest.skip("needs 2 CPUs")
    env = {} if pin == "default" else {"NUMOE_PIN_THREADS": "0"}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as f:
        p = subprocess.Popen([str(exe), "bench", "-m", str(MODELS["v3-F32"]), "-p", "8", "-n", "64", "-r", "1000000",
                              "-t", "2", "--workers", "1"], stdout=subprocess.DEVNULL, stderr=f,
                             env={**sanitizer_env(), **env})
    try:
        wait_for_line(p, log, "routed experts in workers")
        coord, = wait_until(lambda: children_named(p.pid, "numoe-coordinat"), 60, "the coordinator process")
        worker, = wait_until(lambda: children_named(p.pid, "numoe-worker"), 60, "the worker process")
        want = sorted(os.sched_getaffinity(0))[:2] if pin == "default" else []
        if want:  # a thread is pinned when it first runs pool work: wait for that
            for q in (coord, worker):
                wait_until(lambda: pinned_threads(q) == want, 60,
                           lambda: f"threads of {q} pinned to CPUs {want} (pinned now: {pinned_threads(q)})")
        else:  # nothing to wait for: both compute a while, then nothing may be pinned
            wait_computing([coord, worker])
            assert pinned_threads(coord) == [] and pinned_threads(worker) == [], log.read_text()
        assert ("--pin-threads" in log.read_text()) == (pin == "default")
    finally:
        p.terminate()
        p.wait(timeout=30)
    if pin != "default":
        return
    with open(log, "w") as f:  # in-process: not pinned unless asked
        p = subprocess.Popen([str(exe), "bench", "-m", str(MODELS["v3-F32"]), "-p", "8", "-n", "64", "-r", "1000000",
                              "-t", "2", "--workers", "0"], stdout=subprocess.DEVNULL, stderr=f, env=sanitizer_env())
    try:
        wait_for_line(p, log, "loaded in")
        wait_computing([p.pid])
        assert pinned_threads(p.pid) == [], log.read_text()
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_sigterm_to_every_process(exe, tmp_path):
    """SIGTERM to the launcher, the coordinator and the workers at once (what systemd
    does to a service's cgroup): no worker is restarted, everything ends (no process
    waits for another that is gone: the deadline is a hang's), nothing is left in
    /dev/shm."""
    p, log, pids = start_long_run(exe, tmp_path, n_workers=2)
    coord, = children_named(p.pid, "numoe-coordinat")
    for q in [p.pid, coord, *pids]:
        try:
            os.kill(q, signal.SIGTERM)
        except ProcessLookupError:  # already ended by an earlier one's shutdown
            pass
    p.wait(timeout=120)
    assert "restarting it" not in log.read_text(), log.read_text()[-2000:]
    assert_no_leftovers(p.pid, pids + [coord])


def test_sigint_reaches_only_the_coordinator(exe, tmp_path):
    """Workers run in their own process group: a terminal's Ctrl-C (SIGINT to the
    foreground group) is the coordinator's to handle."""
    p, log, pids = start_long_run(exe, tmp_path, n_workers=2)
    assert all(os.getpgid(q) != os.getpgid(p.pid) for q in pids)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    assert_no_leftovers(p.pid, pids)


def test_bench_ipc(exe):
    """`numoe bench ipc` (once launch/main.c dispatches it)."""
    probe = run([exe, "bench", "ipc", "--help"])
    if probe.returncode != 0 or "round trip" not in probe.stdout.lower():
        pytest.skip("`numoe bench ipc` is not wired into launch/main.c yet")
    for handoff in ("doorbell", "zmq"):
        proc = run([exe, "bench", "ipc", "-n", "300", "-m", MODELS["v3-F32"], "--workers", "2", "-t", "1"],
                   env={**sanitizer_env(), "NUMOE_HANDOFF": handoff})
        assert_clean(proc)
        assert proc.returncode == 0, proc.stderr
        for row in ("zmq REQ/REP", "zmq DEALER/ROUTER", "shm doorbell, polling", "shm doorbell, futex",
                    f"backend, 2 workers, {handoff}, empty layer", f"backend, 2 workers, {handoff}, 1 token",
                    "in-process backend, 1 token"):
            assert row in proc.stdout, proc.stdout


def restarted_pids(stderr):
    return [int(p) for p in re.findall(r"^numoe: worker \d+ restarted in [\d.]+ ms \(attempt \d+, pid (\d+)\)$",
                                       stderr, re.M)]


@pytest.mark.parametrize("placement,mode", [("experts", "decode"), ("experts", "chunked"), ("split", "prefill")])
def test_crash_mid_layer_same_logits(exe, placement, mode, tmp_path):
    """A worker dies (SIGKILL, NUMOE_TEST_FAULT=...:die-once) in the middle of a MoE layer:
    it is restarted from its persistent shard, the layer is re-sent, the logits are those
    of the undisturbed run."""
    model = MODELS["v3-F32"]
    n = 2 if placement == "experts" else 1
    err = compare(exe, model, n, placement, mode, tmp_path, env={"NUMOE_TEST_FAULT": f"{n - 1}:2:die-once"})
    m = re.search(rf"^numoe: worker {n - 1} restarted in ([\d.]+) ms \(attempt 1, pid \d+\)$", err, re.M)
    assert m, err
    print(f"restart after a crash mid-layer: {m.group(1)} ms")  # a figure, not a limit (docs/ has the benchmark)
    assert f"numoe-worker {n - 1}: re-mapped its persistent shard memfd:numoe-" in err, err
    assert not [q for q in restarted_pids(err) if alive(q)]


def read_until(stream, pred, timeout=120):
    """Reads stream a byte at a time until pred(bytes read) holds; fails at EOF or
    when nothing satisfying it came within the deadline."""
    buf = b""
    end = time.monotonic() + timeout
    while not pred(buf):
        left = end - time.monotonic()
        assert left > 0 and select.select([stream], [], [], left)[0], f"waited {timeout} s for output; got {buf!r}"
        c = os.read(stream.fileno(), 1)
        assert c, f"output ended; got {buf!r}"
        buf += c
    return buf.decode()


def children_named(ppid, name):
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[1]) == ppid and comm == name and rest[0] != "Z":
            out.append(int(d.name))
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_kill_worker_mid_generation(exe, sig, tmp_path):
    """kill -9 (or a plain kill) of a worker while a 64-token greedy generation runs: same
    tokens as an undisturbed run, the restart line printed, the persistent shard re-mapped,
    nothing left behind."""
    model = MODELS["v3-F32"]
    args = [str(exe), "generate", "-m", str(model), "--tokens", "5,6,7,8,9", "-n", "64", "-t", "2"]
    ref = run(args)
    assert_clean(ref)
    assert ref.returncode == 0, ref.stderr
    env = sanitizer_env()
    # >= 20 ms a token (2 MoE layers): the 61 tokens after the first 3 take over a second,
    # time enough to kill a worker mid-way even when this process is slow to do it
    env["NUMOE_TEST_DELAY_US"] = "10000"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as f:
        p = subprocess.Popen([*args, "--workers", "2", "--placement", "experts"], stdout=subprocess.PIPE, stderr=f,
                             env=env)
    first = read_until(p.stdout, lambda b: b.count(b",") >= 3)  # the first tokens are out
    kids = children_named(p.pid, "numoe-worker")
    pids = worker_pids(log.read_text())
    assert len(pids) == 2 and sorted(kids) == sorted(pids), (kids, log.read_text())
    assert p.poll() is None
    assert shard_maps(pids[0]) == {f"memfd:numoe-{p.pid}-shard-0"}, shard_maps(pids[0])
    assert shard_maps(pids[1]) == {f"memfd:numoe-{p.pid}-shard-1"}, shard_maps(pids[1])
    os.kill(pids[1], sig)
    rest = p.stdout.read().decode()
    p.wait(timeout=120)
    err = log.read_text()
    assert p.returncode == 0, err
    assert "Sanitizer" not in err, err[-3000:]
    out = first + rest
    assert out.count(",") == 63 and first.count(",") == 3, (first, out)
    assert out.strip() == ref.stdout.strip(), (out, ref.stdout)
    m = re.search(r"^numoe: worker 1 restarted in ([\d.]+) ms \(attempt 1, pid \d+\)$", err, re.M)
    assert m, err
    print(f"recovery after {signal.Signals(sig).name}: {m.group(1)} ms")  # a figure, not a limit
    assert re.search(r"^numoe-worker 1: re-mapped its persistent shard memfd:numoe-%d-shard-1 read-only" % p.pid,
                     err, re.M), err
    assert_no_leftovers(p.pid, pids + restarted_pids(err))


def test_sigint_after_restart_leaves_nothing(exe, tmp_path):
    """A restarted worker, then Ctrl-C of the coordinator: every worker (the new one too)
    ends (with them the last holders of the shards' memfds) and no slot is left in /dev/shm."""
    p, log, pids = start_long_run(exe, tmp_path, n_workers=2)
    try:
        assert [len(shard_maps(q)) for q in pids] == [1, 1], [shard_maps(q) for q in pids]
        os.kill(pids[0], signal.SIGKILL)

        def restarted():
            assert p.poll() is None, log.read_text()[-3000:]
            return restarted_pids(log.read_text())
        new = wait_until(restarted, 120, lambda: f"the restart of worker 0: {log.read_text()[-3000:]}")
        assert len(new) == 1 and alive(new[0]), log.read_text()
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    assert_no_leftovers(p.pid, pids + new)
    assert "Sanitizer" not in log.read_text(), log.read_text()[-3000:]


def smaps_rss(pid, match):
    """Resident bytes of the mappings of pid whose path contains `match`."""
    total, cur = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            cur = match in line
        elif cur and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def test_rss_no_expert_copied_twice(exe, tmp_path):
    """While 3 workers serve a run: each worker's resident shard segment is its
    reported shard size, the shards add up to the model's routed-expert bytes, and
    the coordinator keeps no resident copy of the expert weights (its mapping of
    the model file stays far below the routed-expert bytes)."""
    p, log, pids = start_long_run(exe, tmp_path, n_workers=3)
    try:
        err = log.read_text()
        shard = {int(w): int(b) for w, b in re.findall(r"^numoe: worker (\d+): pid \d+,.* shard (\d+) bytes", err, re.M)}
        routed = int(re.search(r"hold (\d+) bytes of routed experts; the model has (\d+)", err).group(2))
        assert sum(shard.values()) == routed, (shard, routed)
        for w, pid in enumerate(pids):
            resident = smaps_rss(pid, f"numoe-{p.pid}-shard-{w}")
            assert shard[w] <= resident <= shard[w] + 2 * 4096, (w, resident, shard[w])
        coord, = children_named(p.pid, "numoe-coordinat")
        coord_model = smaps_rss(coord, MODELS["v3-F32"].name)
        dense = MODELS["v3-F32"].stat().st_size - routed
        assert coord_model <= dense + routed // 10, (coord_model, dense, routed)
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_process_names(numoe):
    """ps / pgrep -f show the launcher `numoe`, its children `numoe-coordinator` and
    `numoe-worker`; the kernel's 15-byte thread names are numoe,
    numoe-coordinat and numoe-worker."""
    p = subprocess.Popen([str(numoe), "chat", "-m", str(FIX / "deepseek-v3-tiny-F32-mla.gguf"), "--workers", "2"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=sanitizer_env())
    want = ["numoe-coordinat", "numoe-worker", "numoe-worker"]

    def names():
        """(comm, argv[0]) of the launcher's children once they are what the test
        expects; a child that has not yet exec'd (or, the coordinator, set its
        name) still shows the launcher's."""
        assert p.poll() is None, p.stderr.read().decode(errors="replace")[-2000:]
        kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        seen = sorted((Path(f"/proc/{k}/comm").read_text().strip(),
                       Path(f"/proc/{k}/cmdline").read_bytes().split(b"\0")[0]) for k in kids)
        return seen if [c for c, _ in seen] == want else None
    try:
        seen = wait_until(names, 120, "a coordinator and 2 workers under their own names")
        assert Path(f"/proc/{p.pid}/comm").read_text().strip() == "numoe"
        (_, coord_argv0), *workers = seen
        assert coord_argv0 == b"numoe-coordinator", seen
        assert all(a.endswith(b"/numoe-worker") for _, a in workers), seen
    finally:
        out, err = p.communicate(b"", timeout=60)
    assert p.returncode == 0, err.decode(errors="replace")[-2000:]


def test_in_process_is_one_process(numoe):
    """--workers 0: no launcher, the command itself is numoe-coordinator."""
    p = subprocess.Popen([str(numoe), "chat", "-m", str(FIX / "deepseek-v3-tiny-F32-mla.gguf"), "--workers", "0"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=sanitizer_env())
    try:
        wait_until(lambda: Path(f"/proc/{p.pid}/comm").read_text().strip() == "numoe-coordinat", 120,
                   "the command to rename itself numoe-coordinat")
        assert Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")[0] == b"numoe-coordinator"
        assert not Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
    finally:
        out, err = p.communicate(b"", timeout=60)
    assert p.returncode == 0, err.decode(errors="replace")[-2000:]


@pytest.mark.parametrize("opt,msg", [(["--gpu", "banana"], "--gpu needs a CUDA device number, none or auto (got 'banana')"),
                                     (["--workers", "x"], "--workers needs an integer in 0..256 (got 'x')"),
                                     (["--placement", "nowhere"], "--placement must be split, experts, experts-rr")])
def test_bad_option_reported_once(numoe, opt, msg):
    """The launcher's plan only peeks at the options: a bad one is reported once, by
    the command, with its name in front (it was printed three times: by the plan, by
    the plan again after the re-exec, and by the command)."""
    p = run([numoe, "generate", "-m", FIX / "deepseek-v3-tiny-F32-mla.gguf", "--prompt", "hi", "-n", "2", *opt])
    assert p.returncode == 2, p.stderr
    assert p.stderr.count(msg) == 1 and f"numoe generate: {msg}" in p.stderr, p.stderr
    assert "numoe-worker" not in p.stderr, p.stderr  # no worker was started for a command that cannot run
