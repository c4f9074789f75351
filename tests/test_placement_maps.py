"""Placement map files, the usage-profile-balanced map (`numoe placement`)
and the NUMA topology / numactl lines (`numoe topology`) on hwloc synthetic
machines. Until launch/main.c dispatches `placement` and `topology`, the
commands are reached through a small driver linked from build/obj."""

import re

import pytest

from conftest import ROOT, assert_clean, gpus, run, sanitizer_env
from make_routing import records, write



@pytest.fixture(scope="module", params=["build", "build-asan"])
def numoe(request):
    exe = ROOT / request.param / "bin" / "numoe"
    if not exe.exists():
        if request.param == "build":
            pytest.fail("build/bin/numoe is not built: run `make`")
        pytest.skip("no sanitizer build")
    return exe


SHAPE = ["--n-layer", "3", "--n-dense", "1", "--n-expert", "16", "--k", "8"]


def check(numoe, tmp_path, text, *extra):
    m = tmp_path / "map.txt"
    m.write_text(text)
    p = run([numoe, "placement", *SHAPE, "--check", m, *extra])
    assert_clean(p)
    return p, str(m)


def whole(workers):
    return " ".join(str(w) for w in workers)


def test_map_ok(numoe, tmp_path):
    text = "# two workers\nworkers 2\nlayer 1: " + whole([0, 1] * 8) + "\n" + \
        "".join(f"2 {e} {e % 2} 0 -\n" for e in range(16))
    p, _ = check(numoe, tmp_path, text)
    assert p.returncode == 0, p.stderr
    assert "valid placement map for 2 workers" in p.stdout


@pytest.mark.parametrize("text,msg", [
    ("layer 1: " + whole([0] * 15) + "\nlayer 2: " + whole([0, 1] * 8) + "\n",
     ":1: layer 1 lists 15 experts, the model has 16: expert 15 is missing"),
    ("layer 1: " + whole([0, 1] * 8) + "\nlayer 1: " + whole([0, 1] * 8) + "\n",
     ":2: layer 1 is listed twice (first at line 1)"),
    ("workers 2\nlayer 1: " + whole([0, 1] * 7 + [0, 2]) + "\n",
     ":2: layer 1 expert 15: worker 2 does not exist (2 workers)"),
    ("layer 0: " + whole([0, 1] * 8) + "\n", ":1: layer 0 is not a MoE layer"),
    ("layer 1: " + whole([0, 1] * 8) + "\n", "MoE layer 2 is not in the map"),
    ("layer 1: " + whole([0, 1] * 8) + "\n" + "".join(f"2 {e} 0 0 -\n" for e in range(16) if e != 5),
     "layer 2 expert 5 is missing"),
    ("layer 1: " + whole([0, 1] * 8) + "\n" + "".join(f"2 {e} 1 0 -\n" for e in range(16)) + "2 3 0 0 -\n",
     ":18: layer 2 expert 3 is placed twice (first at line 5)"),
    ("layer 1: " + whole([0, 1] * 8) + "\n2 0 x 0 -\n", ":2: bad worker 'x'"),
    ("layer 1: " + whole([0] * 16) + "\n" + "".join(f"2 {e} 0 0 -\n" for e in range(16)),
     None),  # valid on 1 worker, refused on 2 below
])
def test_map_errors(numoe, tmp_path, text, msg):
    p, path = check(numoe, tmp_path, text)
    if msg is None:
        assert p.returncode == 0, p.stderr
        p, _ = check(numoe, tmp_path, text, "--workers", "2")
        assert p.returncode == 1
        assert "worker 1 holds no expert weights" in p.stderr, p.stderr
        return
    assert p.returncode == 1, p.stdout
    assert path in p.stderr and msg in p.stderr, p.stderr


def test_profile_balances_coactive(numoe, tmp_path):
    prof = tmp_path / "r.bin"
    write(prof, records(300, [1, 2], 16, 8, hot=8))  # experts 0..7 active for every token
    out = tmp_path / "bal.txt"
    p = run([numoe, "placement", *SHAPE, "--workers", "2", "--profile", prof, "-o", out])
    assert_clean(p)
    assert p.returncode == 0, p.stderr
    assert "contiguous blocks: 8.000" in p.stdout and "balanced:          4.000" in p.stdout, p.stdout
    lines = [l for l in out.read_text().splitlines() if l.startswith("layer ")]
    assert len(lines) == 2
    for l in lines:
        ws = [int(x) for x in l.split(":")[1].split()]
        assert sorted(ws[:8]) == [0] * 4 + [1] * 4, l  # the co-active experts are split 4 + 4
        assert ws.count(0) == 8 and ws.count(1) == 8, l  # equal capacity
    # the written map checks, and reproduces the balanced figure on the profile
    p = run([numoe, "placement", *SHAPE, "--check", out, "--profile", prof])
    assert p.returncode == 0, p.stderr
    assert "active experts per token: 4.000" in p.stdout
    # contiguous blocks written by hand: 8 per token on worker 0
    p, _ = check(numoe, tmp_path, "".join(f"layer {l}: " + whole([0] * 8 + [1] * 8) + "\n" for l in (1, 2)),
                 "--profile", prof)
    assert "active experts per token: 8.000" in p.stdout, p.stdout


def test_profile_bad(numoe, tmp_path):
    prof = tmp_path / "r.bin"
    prof.write_bytes(b"\0" * 13)
    p = run([numoe, "placement", *SHAPE, "--workers", "2", "--profile", prof, "-o", tmp_path / "x"])
    assert p.returncode == 1 and "ends inside a record" in p.stderr, p.stderr
    write(prof, [[0, 0] + list(range(8))])
    p = run([numoe, "placement", *SHAPE, "--workers", "2", "--profile", prof, "-o", tmp_path / "x"])
    assert p.returncode == 1 and "layer 0 is not a MoE layer" in p.stderr, p.stderr


def test_gpu_experts_coverage(numoe, tmp_path):
    """--gpu-experts N with a profile: the share of its picks that N experts of every layer in VRAM take,
    placed by the profile (its most used) and by id. Experts 12..15 are in every token's 8 picks, the
    other 4 drawn from 0..11: by profile 4 experts take exactly half, by id (0..3) about a sixth."""
    import random
    rng = random.Random(3)
    recs = [[pos, layer, 12, 13, 14, 15, *rng.sample(range(12), 4)] for pos in range(100) for layer in (1, 2)]
    prof = tmp_path / "r.bin"
    write(prof, recs)
    p = run([numoe, "placement", *SHAPE, "--profile", prof, "--gpu-experts", "4"])
    assert_clean(p)
    assert p.returncode == 0, p.stderr
    assert "4 of 16 experts per MoE layer in VRAM (25.0% of their bytes)" in p.stdout, p.stdout
    rows = {l.split()[0]: l.split() for l in p.stdout.splitlines()[2:]}
    assert set(rows) == {"1", "2", "all"}, p.stdout
    for r in rows.values():
        assert r[2] == "50.0%" and float(r[3].rstrip("%")) < 30, p.stdout
    p = run([numoe, "placement", *SHAPE, "--gpu-experts", "4"])
    assert p.returncode == 2 and "--profile and --gpu-experts N" in p.stderr, p.stderr


def topo(numoe, desc, *args):
    p = run([numoe, "topology", "--synthetic", desc, "--model", "m.gguf", *args])
    assert_clean(p)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_topology_two_sockets(numoe):
    out = topo(numoe, "pack:2 numa:1 core:8 pu:2")
    assert "2 NUMA nodes, 16 cores, 32 CPUs" in out
    assert "node 1: 8 cores, 16 CPUs (16-31)" in out
    assert "numactl --cpunodebind=0 --membind=0 numoe-worker --model m.gguf --worker-id 0 --workers 2" in out
    assert "numactl --cpunodebind=1 --membind=1 numoe-worker --model m.gguf --worker-id 1 --workers 2" in out
    out = topo(numoe, "pack:2 numa:1 core:8 pu:2", "--workers", "4")
    for w, cpus, node in [(0, "0-7", 0), (1, "8-15", 0), (2, "16-23", 1), (3, "24-31", 1)]:
        assert f"numactl --physcpubind={cpus} --membind={node} numoe-worker --model m.gguf --worker-id {w} " \
               "--workers 4" in out, out


def test_topology_env_and_one_socket(numoe):
    import os
    env = dict(os.environ, HWLOC_SYNTHETIC="pack:1 numa:1 core:4 pu:2")
    p = run([numoe, "topology", "--workers", "2"], env=env)
    assert p.returncode == 0, p.stderr
    assert "1 NUMA node, 4 cores, 8 CPUs" in p.stdout
    assert "--physcpubind=0-3 --membind=0 numoe-worker" in p.stdout
    assert "--physcpubind=4-7 --membind=0 numoe-worker" in p.stdout
    p = run([numoe, "topology", "--synthetic", "pack:1 numa:1 core:2 pu:1", "--workers", "3"])
    assert p.returncode == 1 and "has 2 cores, fewer than its 3 workers" in p.stderr


def cpu_list(text):
    """CPUs of a kernel list such as "0-3,8,10-11"."""
    out = set()
    for part in text.strip().split(","):
        if part:
            a, _, b = part.partition("-")
            out.update(range(int(a), int(b or a) + 1))
    return out


def cgroup_cpus():
    """The CPUs this cgroup's cpuset lets its processes use (what hwloc calls allowed;
    a process's own affinity, e.g. from taskset, does not restrict hwloc), or None."""
    from pathlib import Path
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, ctrls, path = line.split(":", 2)
        if hid == "0":
            cand = [Path("/sys/fs/cgroup") / path.lstrip("/") / "cpuset.cpus.effective"]
        elif "cpuset" in ctrls.split(","):
            cand = [Path("/sys/fs/cgroup/cpuset") / path.lstrip("/") / "cpuset.effective_cpus"]
        else:
            continue
        for f in cand:
            if f.exists() and f.read_text().strip():
                return cpu_list(f.read_text())
    return None


def machine_nodes():
    """{node: (CPUs, cores, MemTotal bytes)} as Linux describes this machine, read without
    hwloc: /sys/devices/system/node (online nodes this process may allocate on), each
    node's cpulist, online CPUs the cgroup allows, a core per distinct thread-siblings
    list, the node's MemTotal."""
    from pathlib import Path
    online = cpu_list(Path("/sys/devices/system/cpu/online").read_text())
    allowed = cgroup_cpus()
    cpus_ok = online & allowed if allowed else online
    status = Path("/proc/self/status").read_text()
    mems = cpu_list(re.search(r"^Mems_allowed_list:\s*(\S+)", status, re.M).group(1))
    base = Path("/sys/devices/system/node")
    out = {}
    for node in sorted(cpu_list((base / "online").read_text()) & mems):
        d = base / f"node{node}"
        cpus = cpu_list(d.joinpath("cpulist").read_text()) & cpus_ok
        cores = {Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
                 for c in cpus}
        kb = int(re.search(r"MemTotal:\s+(\d+) kB", d.joinpath("meminfo").read_text()).group(1))
        out[node] = (cpus, len(cores), kb * 1024)
    return out


def shown_bytes(b):
    """Memory as numoe topology prints it."""
    return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def test_topology_this_machine(numoe):
    """`numoe topology` on this machine: the nodes, cores, CPUs and memory that Linux
    reports (read from /sys, not through hwloc), and one numactl line per node."""
    if not __import__("pathlib").Path("/sys/devices/system/node/online").exists():
        pytest.skip("this kernel has no /sys/devices/system/node (built without NUMA)")
    env = {k: v for k, v in sanitizer_env().items() if k != "HWLOC_SYNTHETIC"}
    # hwloc's pci plugin (libpciaccess, loaded with dlopen) leaks ~1 KB at exit, which
    # LeakSanitizer reports from an unloaded module; numoe's own code is what this checks
    env["HWLOC_COMPONENTS"] = "-pci"
    before = machine_nodes()
    p = run([numoe, "topology"], env=env)
    after = machine_nodes()  # a VM's balloon can move MemTotal while numoe runs
    assert_clean(p)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    nn = len(before)
    assert nn >= 1 and before.keys() == after.keys(), (before, after)
    cores = sum(c for _, c, _ in before.values())
    cpus = sum(len(s) for s, _, _ in before.values())
    assert lines[0] == f"this machine: {nn} NUMA node{'' if nn == 1 else 's'}, {cores} cores, {cpus} CPUs", p.stdout
    for i, node in enumerate(before):
        node_cpus, node_cores, _ = before[node]
        m = re.fullmatch(rf"  node {node}: {node_cores} cores, {len(node_cpus)} CPUs \(([-,\d]*)\), (.+?)(; GPUs: .*)?",
                         lines[1 + i])
        assert m, (lines[1 + i], before[node])
        # the CPUs themselves (numoe lists them core by core, so compare them as a set)
        assert cpu_list(m.group(1)) == node_cpus, (m.group(1), node_cpus)
        # exactly the node's MemTotal; where that moved during the run, between the two reads
        lo, hi = sorted((before[node][2], after[node][2]))
        shown = {shown_bytes(b) for b in (lo, hi)}
        if len(shown) > 1 and all(x.endswith(" GiB") for x in shown | {m.group(2)}):
            shown = {f"{x / 10:.1f} GiB" for x in range(round(lo / 2**30 * 10), round(hi / 2**30 * 10) + 1)}
        assert m.group(2) in shown, (m.group(2), shown, lo, hi)
    rest = lines[1 + nn:]
    # the CUDA GPUs (tests/test_gpu_engine.py checks the lines of a machine that has one): here none
    # usable, with the reason (no driver, or a build without CUDA)
    assert rest[0] == "" and rest[1].startswith("GPUs (CUDA): "), p.stdout
    if not gpus():
        assert re.fullmatch(r"GPUs \(CUDA\): none usable \(.+\)", rest[1]), rest[1]
    i = 1
    while i < len(rest) and (rest[i].startswith("GPUs (CUDA): ") or rest[i].startswith("  gpu ")):
        i += 1
    rest = rest[i:]
    assert rest[0] == "" and rest[1] == f"{nn} worker{'' if nn == 1 else 's'} (one per NUMA node):", p.stdout
    assert rest[2:] == [f"numactl --cpunodebind={node} --membind={node} numoe-worker --model M.gguf --worker-id {w} "
                        f"--workers {nn} --placement split" for w, node in enumerate(before)], p.stdout


def test_profiled_map_end_to_end(numoe, tmp_path):
    """Routing recorded while generating -> `numoe placement --profile` -> the map
    drives two workers and the output equals the in-process run."""
    model = ROOT / "tests" / "fixtures" / "models" / "deepseek-v3-tiny-F32-mla.gguf"
    rt, mp = tmp_path / "r.bin", tmp_path / "map.txt"
    g = run([numoe, "generate", "-m", model, "--tokens", "0,17,200,45,3,99,150,12", "-n", "24", "--dump-routing", rt])
    assert g.returncode == 0, g.stderr
    p = run([numoe, "placement", "--model", model, "--profile", rt, "--workers", "2", "-o", mp])
    assert_clean(p)
    assert p.returncode == 0 and mp.exists(), p.stderr
    # group-limited routing keeps a token's experts in one group of 4 consecutive ids:
    # contiguous blocks put all of them on one worker, the balanced map does not
    before = float(p.stdout.split("contiguous blocks:")[1].split()[0])
    after = float(p.stdout.split("balanced:")[1].split()[0])
    assert after < before, p.stdout
    cmd = ["generate", "-m", model, "--tokens", "0,17,200,45", "-n", "12"]
    a = run([numoe, *cmd])
    b = run([numoe, *cmd, "--workers", "2", "--placement", mp])
    assert_clean(b)
    assert b.returncode == 0, b.stderr
    assert a.stdout == b.stdout
