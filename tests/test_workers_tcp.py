"""Workers started by hand, reached over tcp:// (`numoe-worker --listen tcp://ADDR:PORT`,
`numoe generate --worker-endpoints tcp://h1:p1,...`; coordinator/experts/tcp_inline.c,
worker/main.c). Activations, expert ids and weights travel inline in MoeRequest, the
partial output inline in MoeReply; no shared memory.

* Logits with 1 and 2 tcp workers equal the in-process logits (--workers 0) within 1e-5
  of each row's max, on the V2 and V3 fixtures (F32 and Q8_0), prefill and
  --decode-from 0; the same worker processes serve several coordinator runs in a row.
* Clear errors, no hang: a worker holding another model file, another placement, the
  wrong worker id for its endpoint position, nothing listening at an endpoint, a worker
  that fails a layer, a worker that dies mid-run (its endpoint named), --workers that
  does not match the endpoint count.
* Restarted by hand at its endpoint, a worker is reconnected and sent the layer again.
* `numoe keygen` + --key / --worker-key (ZeroMQ CURVE): the same key works, another key or
  a key on one side only fails at once; a key file others may read is refused.
* A worker in another network namespace, over a veth link (when root and iproute2 can
  make one; skipped with the reason otherwise).
* Every process started here is ended (try/finally); the workers exit 0 on SIGTERM.
Ports: every worker listens on tcp://ADDR:* (the system picks a free port) and the test
reads the endpoint from the worker's "listening on" line, so no port is chosen first and
then taken by someone else. Nothing here has a speed limit: where a failure must be seen
through one mechanism (a lost connection, a refused handshake) and not a long timeout,
that timeout is set far beyond the run's deadline and the message names the mechanism."""
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import WORKER_MODELS as MODELS, WORKER_SEQ as SEQ, WORKER_TOL as TOL
from conftest import assert_clean, sanitizer_env
from waits import wait_until

MODES = {"prefill": [], "decode": ["--decode-from", "0"]}
MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer")
LISTENING = re.compile(r"^numoe-worker \d+: listening on (tcp://\S+) \(worker ", re.M)
NEVER = "3600"  # a --worker-timeout no run here may reach: the failure must come another way


@pytest.fixture(scope="module")
def exe(exe_and_worker):
    return exe_and_worker


def listening_endpoint(p, log):
    """Waits for the "listening on tcp://ADDR:PORT" line of a worker started with
    --listen tcp://ADDR:* and returns that endpoint (p must not end first)."""
    def seen():
        assert p.poll() is None, f"the worker ended ({p.returncode}): {log.read_text()[-3000:]}"
        m = LISTENING.search(log.read_text())
        return m and m.group(1)
    return wait_until(seen, 120, lambda: f"a worker's 'listening on' line: {log.read_text()[-3000:]}")


class Workers:
    """numoe-worker --listen processes, started by hand as a user would."""

    def __init__(self, exe, tmp_path):
        self.worker = exe.parent / "numoe-worker"
        self.tmp = tmp_path
        self.procs = []  # (Popen, endpoint, log path)

    def start(self, model, n, placement, ids=None, env=None, extra=(), listen="tcp://127.0.0.1:*"):
        """Starts workers (ids, default 0..n-1) and returns their endpoints once each
        has said where it listens (its shard is loaded then)."""
        started = []
        for wid in ids if ids is not None else range(n):
            log = self.tmp / f"worker-{len(self.procs) + len(started)}.log"
            e = sanitizer_env()
            e.update(env or {})
            with open(log, "w") as f:
                p = subprocess.Popen([str(self.worker), "--model", str(model), "--worker-id", str(wid), "--workers",
                                      str(n), "--placement", placement, "--threads", "1", "--listen", listen,
                                      *map(str, extra)],
                                     stdout=subprocess.DEVNULL, stderr=f, env=e)
            started.append((p, log))
            self.procs.append((p, None, log))
        eps = [listening_endpoint(p, log) for p, log in started]
        self.procs[-len(started):] = [(p, ep, log) for (p, log), ep in zip(started, eps)]
        return eps

    def stop(self):
        logs = []
        for p, ep, log in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, ep, log in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            logs.append((p.returncode, log.read_text()))
        self.procs = []
        return logs


@pytest.fixture
def workers(exe, tmp_path):
    w = Workers(exe, tmp_path)
    try:
        yield w
    finally:
        w.stop()


def generate(exe, model, extra=(), tmp_path=None, tag="x", env=None, timeout=300, worker_timeout="30"):
    """numoe generate; `timeout` is the deadline of a hang, not a speed limit."""
    dump = tmp_path / f"{model.stem}-{tag}.bin"
    if dump.exists():
        dump.unlink()
    e = sanitizer_env()
    e.update(env or {})
    cmd = [str(exe), "generate", "-m", str(model), "--tokens", ",".join(map(str, SEQ)), "-n", "0", "-t", "2",
           "--dump-logits", str(dump), "--worker-timeout", worker_timeout, *map(str, extra)]
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=e, timeout=timeout)
    assert_clean(p)
    logits = None
    if p.returncode == 0:
        logits = np.fromfile(dump, dtype=np.float32).reshape(len(SEQ), -1).astype(np.float64)
    return logits, p.returncode, p.stderr


def rel_diff(a, b):
    return float((np.abs(a - b).max(1) / np.abs(a).max(1)).max())


def check_worker_logs(logs, expect_rc=0):
    for rc, text in logs:
        for m in MARKERS:
            assert m not in text, text[-3000:]
        assert rc == expect_rc, (rc, text[-3000:])


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("key", MODELS)
def test_logits_equal_in_process(exe, workers, key, n, tmp_path):
    model = MODELS[key]
    # the stock Q8_0 experts are one block wide: only whole experts can go to 2 workers
    placements = ["split"] if n == 1 else (["experts", "split"] if "F32" in key else ["experts"])
    for placement in placements:
        eps = workers.start(model, n, placement)
        for mode, extra in MODES.items():
            # the reference in process: without --workers 0 it would be the default local worker's run
            ref, rc, err = generate(exe, model, [*extra, "--workers", "0"], tmp_path, tag=f"w0-{mode}")
            assert rc == 0, err
            assert "routed experts in workers" not in err, err
            got, rc, err = generate(exe, model, [*extra, "--placement", placement, "--worker-endpoints", ",".join(eps)],
                                    tmp_path, tag=f"tcp{n}-{placement}-{mode}")
            assert rc == 0, err
            assert "tcp inline hand-off" in err, err
            for ep in eps:
                assert ep in err, err
            d = rel_diff(ref, got)
            assert d <= TOL, (key, n, placement, mode, d)
        check_worker_logs(workers.stop())  # served both runs, exits 0 on SIGTERM


def test_wrong_model_on_a_worker(exe, workers, tmp_path):
    eps = workers.start(MODELS["v3-F32"], 2, "experts", ids=[0]) + workers.start(MODELS["v2-F32"], 2, "experts",
                                                                                 ids=[1])
    _, rc, err = generate(exe, MODELS["v3-F32"], ["--placement", "experts", "--worker-endpoints", ",".join(eps)],
                          tmp_path)
    assert rc == 1, err
    assert f"worker at {eps[1]} refused" in err and "opened a different model" in err, err
    logs = workers.stop()
    assert any("refused by a coordinator" in text for _, text in logs), logs


def test_wrong_placement(exe, workers, tmp_path):
    model = MODELS["v2-F32"]
    eps = workers.start(model, 2, "experts-rr")
    _, rc, err = generate(exe, model, ["--placement", "experts", "--worker-endpoints", ",".join(eps)], tmp_path)
    assert rc == 1, err
    # both workers disagree; whichever registers first is the one reported
    assert any(f"worker at {e} refused" in err for e in eps) and "placement" in err, err
    # same kind, other worker count: the worker does not fit
    eps = workers.start(model, 1, "split")
    _, rc, err = generate(exe, model, ["--placement", "split", "--worker-endpoints", ",".join(eps * 2)], tmp_path)
    assert rc == 1, err
    assert "does not fit this coordinator's 2 workers" in err, err


def test_worker_ids_must_follow_endpoint_order(exe, workers, tmp_path):
    model = MODELS["v3-Q8_0"]
    eps = workers.start(model, 2, "experts")
    _, rc, err = generate(exe, model, ["--placement", "experts", "--worker-endpoints", f"{eps[1]},{eps[0]}"], tmp_path)
    assert rc == 1, err
    # whichever answers first is named
    assert "is worker 1 of 2, but it is endpoint 0" in err or "is worker 0 of 2, but it is endpoint 1" in err, err


def test_nothing_listening(exe, tmp_path):
    # a port this test holds, bound but not listening: nobody else can take it, and a
    # connection to it is refused
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ep = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        _, rc, err = generate(exe, MODELS["v2-F32"], ["--worker-endpoints", ep], tmp_path,
                              env={"NUMOE_WORKER_CONNECT_TIMEOUT_S": "2", "NUMOE_WORKER_START_TIMEOUT_S": NEVER},
                              worker_timeout=NEVER)
    assert rc == 1, err
    assert f"nothing accepted a connection at {ep} within 2 s" in err, err


def test_worker_fails_a_layer(exe, workers, tmp_path):
    model = MODELS["v3-F32"]
    eps = workers.start(model, 2, "experts", env={"NUMOE_TEST_FAULT": "1:1:error"})
    _, rc, err = generate(exe, model, ["--placement", "experts", "--worker-endpoints", ",".join(eps)], tmp_path)
    assert rc == 1, err
    assert f"worker 1 at {eps[1]} failed layer 1: injected failure" in err, err


def test_lost_worker_is_named(exe, workers, tmp_path):
    model = MODELS["v3-F32"]
    eps = workers.start(model, 2, "experts", env={"NUMOE_TEST_FAULT": "1:2:die"})
    # seen through the connection: with --worker-timeout beyond generate()'s deadline
    # a run that waited for the timeout instead would fail there
    _, rc, err = generate(exe, model, ["--placement", "experts", "--worker-endpoints", ",".join(eps)], tmp_path,
                          env={"NUMOE_WORKER_RECONNECT_S": "2"}, worker_timeout=NEVER)
    assert rc == 1, err
    assert f"lost the connection to worker 1 at {eps[1]} while it computed layer 2" in err, err
    assert "it did not come back" in err, err
    logs = workers.stop()
    assert logs[1][0] == -signal.SIGKILL  # the injected death
    check_worker_logs(logs[:1])


def test_bad_endpoint_options(exe, tmp_path):
    model = MODELS["v2-F32"]
    _, rc, err = generate(exe, model, ["--worker-endpoints", "ipc://@x"], tmp_path)
    assert rc != 0 and "--worker-endpoints needs comma-separated tcp://HOST:PORT" in err, err
    _, rc, err = generate(exe, model, ["--workers", "3", "--worker-endpoints", "tcp://127.0.0.1:1,tcp://127.0.0.1:2"],
                          tmp_path)
    assert rc == 1 and "--workers 3, but --worker-endpoints names 2 workers" in err, err
    worker = exe.parent / "numoe-worker"
    p = subprocess.run([str(worker), "--model", str(model), "--worker-id", "0", "--workers", "1", "--placement",
                        "split", "--listen", "tcp://256.1.1.1:1"], capture_output=True, text=True, timeout=60,
                       env=sanitizer_env())
    assert p.returncode == 3 and "cannot listen on tcp://256.1.1.1:1" in p.stderr, p.stderr
    p = subprocess.run([str(exe), "generate", "--help"], capture_output=True, text=True, timeout=60)
    assert "--worker-endpoints" in p.stdout + p.stderr and "NUMOE_WORKER_RECONNECT_S" in p.stdout + p.stderr


def test_listen_port_chosen_by_the_system(exe, workers, tmp_path):
    """--listen tcp://ADDR:* or tcp://ADDR:0: the worker binds a port the system picks and
    its "listening on" line names it (a coordinator reaches it there); --help says so."""
    model = MODELS["v2-F32"]
    eps = workers.start(model, 1, "split") + workers.start(model, 1, "split", listen="tcp://127.0.0.1:0")
    ports = [int(ep.rpartition(":")[2]) for ep in eps]
    assert all(ep.startswith("tcp://127.0.0.1:") for ep in eps) and all(0 < q < 65536 for q in ports), eps
    assert ports[0] != ports[1], eps
    ref, rc, err = generate(exe, model, [], tmp_path, tag="w0")
    assert rc == 0, err
    for i, ep in enumerate(eps):
        got, rc, err = generate(exe, model, ["--worker-endpoints", ep], tmp_path, tag=f"port{i}")
        assert rc == 0, err
        assert rel_diff(ref, got) <= TOL
    check_worker_logs(workers.stop())
    p = subprocess.run([str(exe.parent / "numoe-worker"), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())
    assert "PORT * or 0: the system picks a free port" in text, p.stdout
    assert "prints `numoe-worker I: listening on tcp://ADDR:PORT (...)` with the port it bound" in text, p.stdout


def test_worker_restarted_by_hand_is_reconnected(exe, workers, tmp_path):
    """A tcp worker dies mid-layer and whoever runs it starts it again at the same
    endpoint: the coordinator reconnects, the new process registers, gets the layer
    again, and the logits equal the in-process ones."""
    model = MODELS["v3-F32"]
    ref, rc, err = generate(exe, model, [], tmp_path, tag="w0")
    assert rc == 0, err
    eps = workers.start(model, 2, "experts", ids=[0])
    eps += workers.start(model, 2, "experts", ids=[1], env={"NUMOE_TEST_FAULT": "1:2:die"})
    dump = tmp_path / "reconnect.bin"
    cmd = [str(exe), "generate", "-m", str(model), "--tokens", ",".join(map(str, SEQ)), "-n", "0", "-t", "2",
           "--dump-logits", str(dump), "--placement", "experts", "--worker-endpoints", ",".join(eps)]
    log = tmp_path / "coord.log"
    with open(log, "w") as f:
        coord = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env=sanitizer_env())
    try:
        dead, _, _ = workers.procs[1]
        dead.wait(timeout=60)  # the injected death at layer 2
        assert dead.returncode == -signal.SIGKILL
        w = workers.worker
        wlog = tmp_path / "worker-1-again.log"
        with open(wlog, "w") as f:  # the same worker, started again by hand (no fault this time)
            again = subprocess.Popen([str(w), "--model", str(model), "--worker-id", "1", "--workers", "2",
                                      "--placement", "experts", "--threads", "1", "--listen", eps[1]],
                                     stdout=subprocess.DEVNULL, stderr=f, env=sanitizer_env())
        workers.procs.append((again, eps[1], wlog))
        assert coord.wait(timeout=120) == 0, log.read_text()
    finally:
        if coord.poll() is None:
            coord.kill()
            coord.wait()
    err = log.read_text()
    assert f"lost the connection to worker 1 at {eps[1]} while it computed layer 2" in err, err
    assert re.search(rf"worker 1 at {re.escape(eps[1])} is back after [\d.]+ ms", err), err
    got = np.fromfile(dump, dtype=np.float32).reshape(len(SEQ), -1).astype(np.float64)
    assert rel_diff(ref, got) <= TOL


def test_curve_key(exe, workers, tmp_path):
    """`numoe keygen` + `--key` / `--worker-key`: the same key file on both sides works
    (logits as in-process); another key, or none, fails fast with a message saying so; a
    key file others may read is refused; keygen does not overwrite a key."""
    model = MODELS["v3-F32"]
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    for k in (k1, k2):
        p = subprocess.run([str(exe), "keygen", str(k)], capture_output=True, text=True, env=sanitizer_env())
        assert p.returncode == 0, p.stderr
        assert (k.stat().st_mode & 0o777) == 0o600
    p = subprocess.run([str(exe), "keygen", str(k1)], capture_output=True, text=True, env=sanitizer_env())
    assert p.returncode == 1 and "cannot create" in p.stderr, p.stderr
    ref, rc, err = generate(exe, model, [], tmp_path, tag="w0")
    assert rc == 0, err
    eps = workers.start(model, 1, "split", extra=["--key", k1])
    got, rc, err = generate(exe, model, ["--worker-endpoints", eps[0], "--worker-key", k1], tmp_path, tag="k1")
    assert rc == 0, err
    assert rel_diff(ref, got) <= TOL
    for extra in (["--worker-key", k2], []):
        # at once: the handshake's failure, not a connect / start timeout (set beyond the deadline)
        _, rc, err = generate(exe, model, ["--worker-endpoints", eps[0], *extra], tmp_path, tag="bad",
                              env={"NUMOE_WORKER_CONNECT_TIMEOUT_S": NEVER, "NUMOE_WORKER_START_TIMEOUT_S": NEVER},
                              worker_timeout=NEVER)
        assert rc == 1, err
        assert f"worker 0 at {eps[0]}: the" in err and "handshake failed" in err and "same key file" in err, err
    check_worker_logs(workers.stop())
    k1.chmod(0o644)
    _, rc, err = generate(exe, model, ["--worker-endpoints", eps[0], "--worker-key", k1], tmp_path, tag="mode")
    assert rc == 1 and "may be read by others (mode 644); chmod 600 it" in err, err
    # a worker without a key says it is open, and a coordinator with one will not use it
    eps = workers.start(model, 1, "split")
    _, rc, err = generate(exe, model, ["--worker-endpoints", eps[0], "--worker-key", k2], tmp_path, tag="open")
    assert rc == 1 and "handshake failed" in err, err
    logs = workers.stop()
    assert "warning: no --key: anyone who can reach" in logs[0][1], logs


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair: 10.213.N.1 here, 10.213.N.2
    there (root and iproute2 needed; skipped otherwise, with the reason). Yields (name,
    worker address)."""
    if os.geteuid() != 0:
        pytest.skip("a network namespace needs root (this test runs as uid %d)" % os.geteuid())
    if not shutil.which("ip"):
        pytest.skip("a network namespace needs iproute2's `ip`, which is not installed (apt-get install iproute2)")
    n = os.getpid() % 200 + 20
    name, host_if, ns_if = f"numoe-t{n}", f"nmh{n}", f"nmn{n}"
    setup = [["ip", "netns", "add", name],
             ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
             ["ip", "link", "set", ns_if, "netns", name],
             ["ip", "addr", "add", f"10.213.{n}.1/24", "dev", host_if],
             ["ip", "link", "set", host_if, "up"],
             ["ip", "netns", "exec", name, "ip", "addr", "add", f"10.213.{n}.2/24", "dev", ns_if],
             ["ip", "netns", "exec", name, "ip", "link", "set", ns_if, "up"],
             ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"]]
    try:
        for cmd in setup:
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                pytest.skip(f"cannot set up a network namespace ({' '.join(cmd)}: {p.stderr.strip()})")
        yield name, f"10.213.{n}.2"
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_worker_in_another_network_namespace(exe, netns, tmp_path):
    """A keyed worker in its own network namespace (another host, as far as the network
    goes), reached over a veth link: logits equal the in-process ones."""
    name, addr = netns
    model = MODELS["v3-F32"]
    key = tmp_path / "cluster.key"
    assert subprocess.run([str(exe), "keygen", str(key)], capture_output=True).returncode == 0
    ref, rc, err = generate(exe, model, [], tmp_path, tag="w0")
    assert rc == 0, err
    log = tmp_path / "ns-worker.log"
    with open(log, "w") as f:
        w = subprocess.Popen(["ip", "netns", "exec", name, str(exe.parent / "numoe-worker"), "--model", str(model),
                              "--worker-id", "0", "--workers", "1", "--placement", "split", "--threads", "1",
                              "--listen", f"tcp://{addr}:*", "--key", str(key)], stdout=subprocess.DEVNULL, stderr=f,
                             env=sanitizer_env())
    try:
        ep = listening_endpoint(w, log)
        assert ep.startswith(f"tcp://{addr}:") and ep != f"tcp://{addr}:*", ep
        got, rc, err = generate(exe, model, ["--worker-endpoints", ep, "--worker-key", key], tmp_path, tag="ns")
        assert rc == 0, err
        assert f"numoe: worker 0: {ep} (host" in err, err
        assert rel_diff(ref, got) <= TOL
    finally:
        w.send_signal(signal.SIGTERM)
        w.wait(timeout=15)
    check_worker_logs([(w.returncode, log.read_text())])
