"""Placement map files, the usage-profile-balanced map (`numoe placement`)
and the NUMA topology / numactl lines (`numoe topology`) on hwloc synthetic
machines. Until launch/main.c dispatches `placement` and `topology`, the
commands are reached through a small driver linked from build/obj."""

import pytest

from conftest import ROOT, assert_clean, run, sanitizer_env
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


def test_topology_this_machine(numoe):
    env = {k: v for k, v in sanitizer_env().items() if k != "HWLOC_SYNTHETIC"}
    # hwloc's pci plugin (libpciaccess, loaded with dlopen) leaks ~1 KB at exit, which
    # LeakSanitizer reports from an unloaded module; numoe's own code is what this checks
    env["HWLOC_COMPONENTS"] = "-pci"
    p = run([numoe, "topology"], env=env)
    assert_clean(p)
    assert p.returncode == 0, p.stderr
    assert "numactl --cpunodebind=" in p.stdout


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
