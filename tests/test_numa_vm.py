"""numoe on a two-socket machine: a two-NUMA-node virtual machine (issue 20).

tests/numa_vm.sh boots QEMU (software emulation, no KVM needed) with 4 CPUs and
two nodes (node 0: CPUs 0-1 + 1 GiB, node 1: CPUs 2-3 + 1 GiB) on Debian's
kernel and a busybox initramfs holding numoe; its /init (tests/numa_vm_init.sh)
runs `numoe topology` and `numoe generate` with the defaults (one worker per
node, split placement) on the tiny V3 F32 fixture, holds the run at two points
that need no timing (before the first layer, and in the middle of the decode),
probes /proc and move_pages(2) there (tests/numa_vm_probe.c), kills the node-1
worker with SIGKILL, and prints all of it on the serial console. Checked here:

* the kernel and the launcher see 2 nodes; `numoe topology` prints the numactl
  binding the launcher printed and applied to each worker;
* every thread of each worker may run only on its node's CPUs;
* every page of each worker's shard (its memfd, held by the launcher, and the pages its
  own mapping has in use) is on its node, under a strict bind policy;
* the coordinator holds no page that lies wholly inside an expert tensor of
  the model, and maps no shard;
* the logits (20 prompt + 64 greedy tokens) equal those of the same command on
  this (one-node) machine with one worker, within the worker tests' tolerance;
* the killed node-1 worker is restarted on node 1 and re-maps the same shard
  segment, still on node 1; the run ends with status 0;
* nothing is left in /dev/shm or the process table.

The VM runs once for the module (~30 s on the 2-core development VM). The test
skips only where QEMU cannot run at all; a missing kernel is a failure
(tests/setup.sh extracts it)."""
import base64
import os
import re
import shutil
import subprocess
import time

import numpy as np
import pytest

from conftest import FIX_MODELS, ROOT, WORKER_TOL, run

MODEL = FIX_MODELS / "deepseek-v3-tiny-F32-mla.gguf"
TOKENS = "0,17,200,45,3,99,150,12,8,77,240,31,5,64,128,250,33,2,190,101"
NPRED = 64
KERNEL = ROOT / "build" / "tools" / "vm" / "vmlinuz"
VM_LIMIT_S = 300  # a hang, not a speed limit: the whole VM run takes ~30 s on 2 cores
NODE_CPUS = {0: {0, 1}, 1: {2, 3}}


def cpus(spec):
    """{0, 2, 3} from "0,2-3"."""
    out = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def vm_bin_dir():
    """A build tree whose numoe loads no CUDA library (the initramfs stays small):
    build/ where it was built without nvcc, else build-vm/ (`make test` builds it)."""
    exe = ROOT / "build" / "bin" / "numoe"
    if not exe.exists():
        pytest.fail("build/bin/numoe is not built: run `make`")
    libs = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    if "libcudart" not in libs and "libcublas" not in libs:
        return exe.parent
    vm = ROOT / "build-vm" / "bin"
    if not (vm / "numoe").exists() or not (vm / "numoe-worker").exists():
        pytest.fail("build/bin/numoe links CUDA; the VM needs a build without it: "
                    "`make NVCC= BUILD=build-vm build-vm/bin/numoe build-vm/bin/numoe-worker` (make test does it)")
    return vm


class Console:
    """The VM's "NUMOE-VM <key> <rest>" lines (and "<key>| <line>" blocks)."""

    def __init__(self, text):
        self.text = text
        # the serial console ends lines with \r\n; trailing blanks carry nothing
        self.lines = [ln[len("NUMOE-VM "):].rstrip() for ln in text.splitlines() if ln.startswith("NUMOE-VM ")]

    def block(self, key):
        """The lines printed as "<key>| ..." in order."""
        p = key + "| "
        return [ln[len(p):] if ln.startswith(p) else "" for ln in self.lines if ln.startswith(p) or ln == key + "|"]

    def one(self, prefix):
        """The rest of the one line that starts with prefix + " "."""
        got = [ln[len(prefix) + 1:] for ln in self.lines if ln.startswith(prefix + " ")]
        assert len(got) == 1, (prefix, got, self.tail())
        return got[0]

    def all(self, prefix):
        return [ln[len(prefix) + 1:] for ln in self.lines if ln.startswith(prefix + " ")]

    def tail(self):
        return "\n".join(ln for ln in self.text.splitlines()[-60:] if "logits|" not in ln)


def probe(s):
    """{'maps': 1, 'pages': 193, 'present': 193, 'n0': 0, 'n1': 193, ...} of a numa_vm_probe line."""
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", s)}


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        pytest.skip("qemu-system-x86_64 is not installed (tests/setup.sh installs qemu-system-x86)")
    v = subprocess.run([qemu, "-version"], capture_output=True, text=True)
    if v.returncode != 0:
        pytest.skip(f"qemu-system-x86_64 cannot run here: {(v.stderr or v.stdout).strip()[:300]}")
    if not KERNEL.exists():
        pytest.fail(f"no VM kernel at {KERNEL}: run tests/setup.sh (it extracts Debian's linux-image)")
    bindir = vm_bin_dir()
    out = tmp_path_factory.mktemp("numa_vm")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "tests" / "numa_vm.sh"), "--bin", str(bindir), "--model", str(MODEL),
                           "--out", str(out), "--tokens", TOKENS, "-n", str(NPRED), "--timeout", str(VM_LIMIT_S)],
                          capture_output=True, text=True, errors="replace", timeout=VM_LIMIT_S + 120)
    secs = time.monotonic() - t0
    print(f"two-node VM run (build, boot, topology, generate, kill, restart, power-off): {secs:.1f} s")
    con = Console(proc.stdout)
    assert proc.returncode == 0, f"numa_vm.sh exited {proc.returncode}: {proc.stderr[-2000:]}\n{con.tail()}"
    errors = con.all("error")
    assert not errors, f"{errors}\n{con.tail()}"
    assert "done" in con.lines, f"the VM did not finish its script:\n{con.tail()}"
    return con, bindir


def test_two_nodes_and_a_worker_on_each(vm):
    con, _ = vm
    assert con.one("node 0").startswith("cpus 0-1 "), con.tail()
    assert con.one("node 1").startswith("cpus 2-3 "), con.tail()
    topo = con.block("topology")
    assert topo[0] == "this machine: 2 NUMA nodes, 4 cores, 4 CPUs", topo
    err = con.block("gen-stderr")
    # the launcher's default: one worker per node, worker i on node i
    for w in (0, 1):
        assert any(re.match(rf"numoe: worker {w}: pid \d+, node {w}, 2 threads, shard \d+ bytes", ln) for ln in err), err
    assert any("numoe: 2 workers (placement split" in ln for ln in err), err


def test_topology_lines_are_what_the_launcher_applied(vm):
    """`numoe topology` prints, per worker, the numactl options the launcher printed for
    it, and the worker ran that way: its threads on those nodes' CPUs, its memory bound
    to that node."""
    con, _ = vm
    printed = {int(m[2]): m[1] for m in (re.match(r"numactl (.*) numoe-worker --model \S+ --worker-id (\d+) --workers 2 "
                                                  r"--placement split$", ln) for ln in con.block("topology")) if m}
    launched = {int(m[1]): m[2] for m in (re.match(r"numoe: worker (\d+): numactl (.*?) /numoe/bin/numoe-worker ", ln)
                                          for ln in con.block("gen-stderr")) if m}
    assert sorted(printed) == [0, 1] and printed == launched, (printed, launched)
    for w, opts in printed.items():
        m = re.fullmatch(r"--cpunodebind=(\d+) --membind=(\d+)", opts)
        assert m and int(m[1]) == int(m[2]) == w, opts
        for tag in ("p1", "p2"):
            # the node's CPUs, all of them (the ZeroMQ threads keep the process's set;
            # the compute threads are pinned to one each)
            allowed = set().union(*(cpus(t.split()[1]) for t in con.all(f"threads {tag} w{w}")))
            assert allowed == NODE_CPUS[int(m[1])], (w, tag, allowed)
            shard = " ".join(con.block(f"numa_maps {tag} w{w}"))
            assert f" bind:{m[2]} file=/memfd:numoe-" in shard, (w, tag, shard)
            assert con.one(f"policy {tag} w{w}") == f"bind:{m[2]}", (w, tag)


def test_worker_threads_only_on_their_node(vm):
    con, _ = vm
    for tag, w in (("p1", 0), ("p1", 1), ("p2", 0), ("p2", 1), ("restart", 1)):
        threads = con.all(f"threads {tag} w{w}")
        assert len(threads) >= 3, (tag, w, threads)  # main, compute, ZeroMQ's
        for t in threads:
            tid, allowed, comm = t.split(maxsplit=2)
            assert cpus(allowed) <= NODE_CPUS[w], (tag, w, t)


def test_shard_pages_on_their_node(vm):
    """Every page of each worker's /dev/shm shard segment is on the worker's node before
    the first layer, mid-decode and after the node-1 worker's restart; so are the pages
    of the segment the worker's own mapping has in use mid-decode."""
    con, _ = vm
    for tag, w in (("p1", 0), ("p1", 1), ("p2", 0), ("p2", 1), ("restart", 1)):
        f = probe(con.one(f"shard-file {tag} w{w}"))
        own, other = f"n{w}", f"n{1 - w}"
        assert f["pages"] == 193 and f["present"] == f["pages"] == f[own] and f[other] == 0, (tag, w, f)
    for w in (0, 1):
        m = probe(con.one(f"shard-map p2 w{w}"))
        assert m["maps"] == 1 and m["present"] > 0 and m[f"n{w}"] == m["present"], (w, m)


def test_coordinator_holds_no_expert_pages(vm):
    """No page wholly inside an expert tensor is in the coordinator's page tables (the
    workers hold the experts), while the pages of the tensors it does read are; and it
    maps no shard."""
    con, _ = vm
    for tag in ("p1", "p2"):
        e = probe(con.one(f"coord-experts {tag}"))
        assert e["maps"] == 1 and e["pages"] > 300 and e["present"] == 0, (tag, e)
        model = probe(con.one(f"coord-model {tag}"))
        assert model["present"] > 0, (tag, model)  # the probe sees the pages the coordinator uses
        assert probe(con.one(f"coord-shard {tag}"))["maps"] == 0, tag
    assert con.one("coord-wchan p1").split()[1] == "257"  # held in open(2) of the logits FIFO
    assert con.one("coord-wchan p2").split()[1] == "1"    # held in write(2) mid-decode
    assert 0 < len(con.one("tokens-at-p2").split(",")) < NPRED, con.one("tokens-at-p2")


def test_logits_equal_the_one_node_run(vm, tmp_path):
    con, bindir = vm
    raw = base64.b64decode("".join(con.block("logits")))
    assert len(raw) == int(con.one("logits-bytes")), (len(raw), con.one("logits-bytes"))
    got = np.frombuffer(raw, dtype=np.float32).reshape(20 + NPRED, -1).astype(np.float64)
    isa = re.search(r"numoe: engine: CPU, \d+ threads, (\w+)", "\n".join(con.block("gen-stderr")))[1]
    dump = tmp_path / "host.bin"
    # same SIMD path as the VM's CPU (QEMU's emulated one), one worker: the one-node run
    host = run([bindir / "numoe", "generate", "-m", MODEL, "--tokens", TOKENS, "-n", NPRED, "--workers", "1",
                "--dump-logits", dump], env={**os.environ, "NUMOE_ISA": isa})
    assert host.returncode == 0, host.stderr
    assert f"threads, {isa}" in host.stderr, host.stderr  # the host ran the VM's kernels
    ref = np.fromfile(dump, dtype=np.float32).reshape(20 + NPRED, -1).astype(np.float64)
    assert con.one("gen-stdout") == host.stdout.strip()
    d = float((np.abs(ref - got).max(1) / np.abs(ref).max(1)).max())
    print(f"two-node VM vs one-node host logits: max relative difference {d:.3g} (bound {WORKER_TOL})")
    assert d <= WORKER_TOL, d


def test_killed_node1_worker_restarts_on_node1(vm):
    con, _ = vm
    pids = dict(kv.split("=") for kv in con.one("pids").split())
    old, new = con.one("killed w1"), con.one("restarted w1")
    assert old == pids["w1"] and new != old, (old, new)
    err = "\n".join(con.block("gen-stderr"))
    launcher = con.one("launcher")
    assert f"numoe: worker 1 (pid {old}) killed by signal 9 (Killed); restarting it" in err, err
    assert f"numoe-worker 1: re-mapped its persistent shard memfd:numoe-{launcher}-shard-1 read-only" in err, err
    m = re.search(rf"^numoe: worker 1 restarted in ([\d.]+) ms \(attempt 1, pid {new}\)$", err, re.M)
    assert m, err
    print(f"restart of the node-1 worker: {m[1]} ms (in the VM, the coordinator held while it happened)")
    # the same segment (inode) as before the kill, still wholly on node 1 (test_shard_pages_on_their_node)
    inode = {tag: con.one(f"shard-file {tag} w1").rsplit("inode=", 1)[1] for tag in ("p1", "restart")}
    assert inode["p1"] == inode["restart"], inode
    assert con.one("gen-rc") == "0"


def test_nothing_left_behind(vm):
    con, _ = vm
    assert con.one("gen-rc") == "0"
    assert con.one("shm-left") == "[]", con.tail()
    assert con.one("procs-left") == "[]", con.tail()
