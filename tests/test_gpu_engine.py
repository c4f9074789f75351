"""The GPU engine (coordinator/engine/gpu/gpu_engine.h) behind `--gpu N|none|auto`.

Everywhere: `--gpu` is parsed strictly; `--gpu N` for a device the machine does not have (here:
every N on a machine without a usable GPU, and N = 99 on any) fails with a message that names the
fix (--gpu none), never falls back; auto prints exactly one `numoe: engine:` line on stderr, the
CPU one where no GPU is usable (saying why), and `--gpu none` says so.

Where a GPU is usable (`nvidia-smi -L` lists one) and build/bin/numoe was built with CUDA, on
every fixture in tests/fixtures/models, with the routed experts in process and in one worker,
`--gpu 0` against `--gpu none`:
  generate  64 greedy tokens from a fixed prompt: identical on float models (F32, F16: both
            engines keep activations in fp32), every logits row at cosine >= COS_FLOAT; on quantised models (the CPU rounds activations to
            Q8_0 / Q8_K, the GPU does not) equal up to the first position where the GPU's token
            is a near-tie in the CPU's logits (its CPU logit within NEAR_TIE * max |logit| of the
            CPU's best), and that position must be one;
  routing   --dump-routing files identical on float models;
  sampling  --temp 0.8 --seed 7 on float models: the same tokens (host sampler on the same logits);
  perplexity  within PPL_FLOAT (relative) on float models, PPL_QUANT on quantised ones;
  bench     runs, names the GPU engine and reports both phases.
`numoe serve --gpu 0`: four concurrent greedy requests give each the text it gives alone (the
scheduler's batched step over several sequences), with --workers 0 and 1.
The comparisons above keep every routed expert on the host (`--gpu-experts 0`), so they check
the hand-off; `--gpu-experts` (routed experts resident in VRAM, computed on the GPU) has its own
checks: auto (every expert of a fixture fits), 2 per layer, and a routing profile, against the
CPU engine by the same rules; kill -9 of a worker with part of the experts in VRAM; the option
parsed strictly and refused without a GPU engine.
The build-asan tree has no GPU engine (the CUDA runtime and ASan do not mix: Makefile), so the
GPU checks run build/ only; the refusal checks run both trees.
"""
import concurrent.futures
import os
import re
import subprocess

import pytest

from conftest import ROOT, assert_clean, gpus, run
from serve_util import Server, post_json

MODELS = sorted((ROOT / "tests" / "fixtures" / "models").glob("*.gguf"))
TEXT = ROOT / "tests" / "fixtures" / "text" / "python-docs-heldout.txt"
PROMPT = "1,7,42,99,3,150,23,8,61,200,12,5"
STEPS = 64
# Bounds, with what an H200 measured (build/, experts in process and in one worker alike):
# NEAR_TIE: where the GPU's greedy token first differs on a quantised model, its CPU logit is at
#   most this far (relative to max |logit|) below the CPU's best; measured 4.3e-4 .. 0.039
#   (first difference at 11..61 of 64; demo-v3-Q8_0 none).
# COS_FLOAT: every logits row of a float model, GPU against CPU (the 0.99999).
# PPL_FLOAT: relative perplexity difference on float models; measured <= 1.1e-7.
# PPL_QUANT: the same on quantised models. The random tiny fixtures, whose perplexity (5000-7000)
#   exceeds their vocabulary, magnify the CPU's activation rounding: measured 3.9e-4 .. 0.033; the
#   trained demo models 1.3e-3 and 3.0e-3.
NEAR_TIE = 0.08
COS_FLOAT = 0.99999
PPL_FLOAT = 1e-4
PPL_QUANT = {"tiny": 0.05, "demo": 0.006}


def is_float(model):
    return "-F32" in model.name or "-F16" in model.name


def engine_lines(stderr):
    return [x for x in stderr.splitlines() if x.startswith("numoe: engine: ")]


def numoe_trees():
    return [p for p in (ROOT / "build" / "bin" / "numoe", ROOT / "build-asan" / "bin" / "numoe") if p.exists()]


def built_with_cuda(exe):
    p = run([exe, "generate", "-m", MODELS[0], "--tokens", "1", "-n", "1", "--workers", "0"], timeout=120)
    return "built without CUDA" not in p.stderr


MODEL = ROOT / "tests" / "fixtures" / "models" / "deepseek-v3-tiny-F32-mla.gguf"


# ---- everywhere ---------------------------------------------------------------------------------

@pytest.mark.parametrize("exe", numoe_trees(), ids=lambda p: p.parent.parent.name)
def test_gpu_option_parsed_strictly(exe):
    for bad in ("x", "-1", "", "0x"):
        p = run([exe, "generate", "-m", MODEL, "--tokens", "1", "-n", "1", "--gpu", bad])
        assert_clean(p)
        assert p.returncode == 2 and "--gpu needs a CUDA device number, none or auto" in p.stderr, (bad, p.stderr)


@pytest.mark.parametrize("exe", numoe_trees(), ids=lambda p: p.parent.parent.name)
def test_prefill_experts_parsed_strictly(exe):
    for bad in ("x", "GPU", "", "1"):
        p = run([exe, "generate", "-m", MODEL, "--tokens", "1", "-n", "1", "--prefill-experts", bad])
        assert_clean(p)
        assert p.returncode == 2 and "--prefill-experts must be cpu, gpu, split or auto" in p.stderr, (bad, p.stderr)
    h = run([exe, "generate", "--help"])
    assert "--prefill-experts cpu|gpu|split|auto" in h.stdout + h.stderr
    # gpu on the CPU engine is a contradiction, refused before anything starts; cpu and auto are not
    for gpu_only in ("gpu", "split"):
        p = run([exe, "generate", "-m", MODEL, "--tokens", "1", "-n", "1", "--gpu", "none", "--prefill-experts",
                 gpu_only])
        assert_clean(p)
        assert p.returncode != 0 and f"--prefill-experts {gpu_only} computes routed experts on the GPU" in p.stderr \
            and "--gpu none" in p.stderr and "worker 0:" not in p.stderr, p.stderr[-2000:]
    for ok in ("cpu", "auto"):
        p = run([exe, "generate", "-m", MODEL, "--tokens", "1", "-n", "1", "--workers", "0", "--gpu", "none",
                 "--prefill-experts", ok])
        assert p.returncode == 0, (ok, p.stderr[-2000:])


@pytest.mark.parametrize("exe", numoe_trees(), ids=lambda p: p.parent.parent.name)
def test_gpu_experts_parsed_strictly(exe, tmp_path):
    """--gpu-experts auto|N|FILE: anything else is refused naming the three; N or FILE on the CPU engine is
    an error naming the fix (auto, the default, is nothing to refuse there)."""
    for bad in ("x", "-1", "", str(tmp_path / "missing.route")):
        p = run([exe, "generate", "-m", MODEL, "--tokens", "1", "-n", "1", "--gpu-experts", bad])
        assert_clean(p)
        assert p.returncode == 2 and "--gpu-experts: " in p.stderr and "routing profile" in p.stderr, (bad, p.stderr)
    prof = tmp_path / "p.route"
    prof.write_bytes(b"")
    for val in ("2", str(prof)):
        p = run([exe, "generate", "-m", MODEL, "--tokens", "1", "-n", "1", "--workers", "0", "--gpu", "none",
                 "--gpu-experts", val])
        assert_clean(p)
        assert p.returncode != 0 and "--gpu-experts keeps routed experts in VRAM" in p.stderr \
            and "--gpu none" in p.stderr, (val, p.stderr[-2000:])
    p = run([exe, "generate", "-m", MODEL, "--tokens", "1", "-n", "1", "--workers", "0", "--gpu", "none",
             "--gpu-experts", "auto"])
    assert p.returncode == 0, p.stderr[-2000:]
    p = run([exe, "generate", "-m", MODEL, "--tokens", "1", "-n", "1", "--gpu-experts-profile", str(tmp_path / "no")])
    assert p.returncode == 2 and "--gpu-experts-profile needs a readable routing profile" in p.stderr, p.stderr
    p = run([exe, "generate", "-m", MODEL, "--tokens", "1", "-n", "1", "--workers", "0", "--gpu", "none",
             "--gpu-experts-profile", str(prof)])
    assert p.returncode != 0 and "--gpu-experts keeps routed experts in VRAM" in p.stderr, p.stderr[-2000:]
    h = run([exe, "generate", "--help"])
    assert "--gpu-experts auto|N|FILE" in h.stdout + h.stderr


@pytest.mark.parametrize("exe", numoe_trees(), ids=lambda p: p.parent.parent.name)
@pytest.mark.parametrize("cmd", ["generate", "bench", "perplexity", "serve", "chat"])
def test_missing_device_refused(exe, cmd):
    """--gpu N without that device: a clear error naming --gpu none, nothing run, no fallback."""
    devices = ["99"] + ([] if gpus() and built_with_cuda(exe) else ["0"])
    extra = {"generate": ["--tokens", "1", "-n", "1"], "bench": ["-p", "4", "-n", "2"],
             "perplexity": ["-f", TEXT, "--ctx", "16", "--chunks", "1"], "serve": ["--port", "0"],
             "chat": []}[cmd]
    for dev in devices:
        p = run([exe, cmd, "-m", MODEL, "--workers", "0", "--gpu", dev, *extra], timeout=120,
                stdin=subprocess.DEVNULL)
        assert_clean(p)
        assert p.returncode != 0, (cmd, dev, p.stdout[-1000:], p.stderr[-2000:])
        assert f"--gpu {dev}: " in p.stderr and "--gpu none" in p.stderr, (cmd, dev, p.stderr[-2000:])
        assert not engine_lines(p.stderr), p.stderr  # no engine was made, so none is announced
        if cmd == "generate":
            assert p.stdout == "", p.stdout


@pytest.mark.parametrize("exe", numoe_trees(), ids=lambda p: p.parent.parent.name)
def test_missing_device_starts_no_worker(exe):
    """With the default worker, --gpu N without that device is refused before any worker is spawned."""
    p = run([exe, "generate", "-m", MODEL, "--tokens", "1", "-n", "1", "--gpu", "99"], timeout=120)
    assert_clean(p)
    assert p.returncode != 0 and "--gpu 99: " in p.stderr and "--gpu none" in p.stderr, p.stderr[-2000:]
    assert "numoe: worker" not in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("exe", numoe_trees(), ids=lambda p: p.parent.parent.name)
def test_auto_and_none_announce_the_engine(exe):
    base = [exe, "generate", "-m", MODEL, "--tokens", PROMPT, "-n", "8", "--workers", "0"]
    none = run(base + ["--gpu", "none"])
    assert_clean(none)
    assert none.returncode == 0, none.stderr[-2000:]
    lines = engine_lines(none.stderr)
    assert len(lines) == 1 and lines[0].startswith("numoe: engine: CPU, ") and lines[0].endswith("(--gpu none)"), lines
    for auto in (run(base), run(base + ["--gpu", "auto"])):
        assert_clean(auto)
        assert auto.returncode == 0, auto.stderr[-2000:]
        lines = engine_lines(auto.stderr)
        assert len(lines) == 1, auto.stderr
        if gpus() and built_with_cuda(exe):
            assert re.match(r"numoe: engine: GPU 0: .+ \(\d+ GiB\), VRAM: embedding\+head [0-9.]+ MiB, ", lines[0]), lines
        else:
            assert lines[0].startswith("numoe: engine: CPU, ") and "(no usable GPU: " in lines[0], lines
            assert auto.stdout == none.stdout  # the same engine, so the same tokens


# ---- on a GPU -----------------------------------------------------------------------------------

EXE = ROOT / "build" / "bin" / "numoe"


@pytest.fixture(scope="module")
def gpu_exe():
    if not EXE.exists():
        pytest.fail("build/bin/numoe is not built: run `make`")
    if not gpus():
        pytest.skip("no GPU (nvidia-smi -L lists none): the GPU engine's checks run on a GPU machine")
    if not built_with_cuda(EXE):
        pytest.skip("build/bin/numoe was built without CUDA (no nvcc): rebuild with nvcc to check the GPU engine")
    return EXE


def generate(exe, model, gpu, workers, *extra, stderr_to=None):
    """On the GPU every routed expert stays on the host (--gpu-experts 0) unless extra says otherwise."""
    if gpu != "none" and "--gpu-experts" not in extra:
        extra = ("--gpu-experts", "0", *extra)
    p = run([exe, "generate", "-m", model, "--tokens", PROMPT, "-n", STEPS, "--workers", workers, "-t", "4",
             "--gpu", gpu, *extra], timeout=300)
    if stderr_to is not None:
        stderr_to.append(p.stderr)
    assert_clean(p)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = engine_lines(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("numoe: engine: GPU 0: " if gpu == "0" else "numoe: engine: CPU"), \
        lines
    return [int(t) for t in p.stdout.strip().split(",")]


def test_topology_lists_the_gpus(gpu_exe):
    """`numoe topology` lists every GPU nvidia-smi lists, under nvidia-smi's name, with VRAM (free <= total),
    compute capability, SMs and PCI address, and its NUMA node and PCIe link or that the platform does not
    say; one line per pair of GPUs."""
    p = run([gpu_exe, "topology"])
    assert p.returncode == 0, p.stderr
    listed = gpus()
    lines = p.stdout.splitlines()
    head = [i for i, ln in enumerate(lines) if ln.startswith("GPUs (CUDA): ")]
    assert len(head) == 1 and lines[head[0]] == f"GPUs (CUDA): {len(listed)}", p.stdout
    for d, smi in enumerate(listed):
        ln = lines[head[0] + 1 + d]
        m = re.fullmatch(r"  gpu (\d+): (.+), ([\d.]+) GiB \(([\d.]+) free\), sm_(\d+), (\d+) SMs; PCI "
                         r"([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.0), (NUMA node \d+|NUMA node not reported), "
                         r"(PCIe [1-6]\.0 x\d+|PCIe link not reported)", ln)
        assert m and int(m.group(1)) == d and m.group(2) in smi, (ln, smi)
        assert 0 < float(m.group(4)) <= float(m.group(3)) and int(m.group(6)) > 0, ln
    pairs = lines[head[0] + 1 + len(listed):head[0] + 1 + len(listed) + len(listed) * (len(listed) - 1) // 2]
    assert all(re.fullmatch(r"  gpu \d+ <-> gpu \d+: (peer access.*, link rank -?\d+|no peer access .*)", ln)
               for ln in pairs), pairs


@pytest.mark.parametrize("var", ["NUMOE_GPU_FUSE", "NUMOE_GPU_SPLIT", "NUMOE_GPU_AHEAD", "NUMOE_GPU_PDL"])
def test_gpu_switches_parsed_strictly(gpu_exe, var):
    """The GPU engine's 0 / 1 switches: another value stops the run naming the variable and both values; 0
    and 1 both run."""
    base = [gpu_exe, "generate", "-m", MODEL, "--tokens", "1,2,3", "-n", "2", "--workers", "0", "--gpu", "0"]
    p = run(base, env={**os.environ, var: "yes"})
    assert p.returncode != 0 and f"{var}=yes: use 1 (" in p.stderr and ") or 0 (" in p.stderr, p.stderr[-2000:]
    for ok in ("0", "1"):
        p = run(base, env={**os.environ, var: ok})
        assert p.returncode == 0, (var, ok, p.stderr[-2000:])


def logits_rows(path, n_vocab):
    import numpy as np
    a = np.fromfile(path, dtype="<f4")
    assert a.size % n_vocab == 0
    return a.reshape(-1, n_vocab)


@pytest.mark.parametrize("experts", ["auto", "gpu", "split"])
@pytest.mark.parametrize("workers", ["0", "1"])
@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.stem)
def test_generate_gpu_vs_cpu(gpu_exe, model, workers, experts, tmp_path):
    """The GPU engine against the CPU engine; --prefill-experts gpu computes every pass's routed experts on the
    GPU (streamed), split half of every layer's on the GPU and the rest on the CPU (in process or the worker) at
    the same time, auto only passes of >= 32 tokens (none here: a 12-token prompt, then decode)."""
    compare_gpu_cpu(gpu_exe, model, workers, tmp_path, ("--prefill-experts", experts))


@pytest.mark.parametrize("hot", ["auto", "2", "profile", "2+profile"])
@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.stem)
def test_gpu_experts_vs_cpu(gpu_exe, model, hot, tmp_path):
    """Routed experts resident in VRAM (--gpu-experts auto: all of a fixture's fit; 2 of every layer; a
    profile - the CPU engine's own --dump-routing of another prompt - as many as fit; the 2 most used of
    every layer by that profile, --gpu-experts-profile), the rest in one
    worker: against the CPU engine by the rules of test_generate_gpu_vs_cpu, and the engine line says how
    many are resident."""
    args = ("--gpu-experts", hot)
    if "profile" in hot:
        prof = str(tmp_path / "hot.route")
        p = run([gpu_exe, "generate", "-m", model, "--tokens", "3,1,4,1,5,9,2,6", "-n", "16", "--workers", "0",
                 "--gpu", "none", "--dump-routing", prof], timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        args = ("--gpu-experts", prof) if hot == "profile" else ("--gpu-experts", "2", "--gpu-experts-profile", prof)
    err = compare_gpu_cpu(gpu_exe, model, "1", tmp_path, args)
    line = engine_lines(err)[0]
    assert re.search(r"routed experts in VRAM: \d+ \(", line), line
    if "profile" in hot:
        assert "the most used of the profile" in line, line


def compare_gpu_cpu(gpu_exe, model, workers, tmp_path, gpu_extra):
    import numpy as np
    # both runs dump their logits: generate then also feeds the last token (one more step)
    cpu_logits, gpu_logits = tmp_path / "cpu.f32", tmp_path / "gpu.f32"
    cpu = generate(gpu_exe, model, "none", workers, "--dump-logits", cpu_logits,
                   "--dump-routing", tmp_path / "cpu.route")
    gpu_err = []
    gpu = generate(gpu_exe, model, "0", workers, "--dump-logits", gpu_logits,
                   "--dump-routing", tmp_path / "gpu.route", *gpu_extra, stderr_to=gpu_err)
    assert len(cpu) == len(gpu) == STEPS
    n_prompt = len(PROMPT.split(","))
    n_vocab = cpu_logits.stat().st_size // 4 // (n_prompt + STEPS)
    rows = logits_rows(cpu_logits, n_vocab)
    if is_float(model):
        assert gpu == cpu
        assert (tmp_path / "gpu.route").read_bytes() == (tmp_path / "cpu.route").read_bytes()
        g = logits_rows(gpu_logits, n_vocab)
        assert g.shape == rows.shape
        cos = (g * rows).sum(1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(rows, axis=1))
        rel = float((np.abs(g - rows).max(1) / np.abs(rows).max(1)).max())
        print(f"\n{model.stem} workers={workers}: {STEPS} greedy tokens and the routing log identical; "
              f"logits rows: min cosine {cos.min():.9f}, max rel {rel:.3g}")
        assert cos.min() >= COS_FLOAT
        return gpu_err[0]
    first = next((i for i in range(STEPS) if gpu[i] != cpu[i]), STEPS)
    if first < STEPS:
        row = rows[n_prompt - 1 + first]  # the logits token `first` was drawn from
        gap = float(row.max() - row[gpu[first]]) / float(np.abs(row).max())
        print(f"\n{model.stem} workers={workers}: tokens equal up to {first}; there the GPU's token is "
              f"{gap:.3g} * max|logit| below the CPU's best (<= {NEAR_TIE})")
        assert gap <= NEAR_TIE, (first, gap)
        assert int(row.argmax()) == cpu[first]  # the row it was drawn from: the CPU's greedy choice
    else:
        print(f"\n{model.stem} workers={workers}: all {STEPS} greedy tokens equal")
    # the routing logs agree in format: one record of k+2 int32 per token and MoE layer either way
    assert (tmp_path / "gpu.route").stat().st_size == (tmp_path / "cpu.route").stat().st_size
    return gpu_err[0]


SAMPLERS = {
    "top-k": ("--temp", "0.8", "--seed", "7", "--top-k", "40"),
    "top-k+penalties": ("--temp", "0.8", "--seed", "7", "--top-k", "40", "--top-p", "0.9", "--min-p", "0.02",
                        "--repeat-penalty", "1.3", "--repeat-last-n", "16", "--presence-penalty", "0.2",
                        "--frequency-penalty", "0.1"),
    "greedy+penalty": ("--temp", "0", "--repeat-penalty", "1.5", "--repeat-last-n", "8"),
    "top-p only (whole row)": ("--temp", "0.9", "--seed", "3", "--top-k", "0", "--top-p", "0.9"),
}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("model", [m for m in MODELS if is_float(m)], ids=lambda p: p.stem)
def test_sampling_gpu_vs_cpu(gpu_exe, model, sampler):
    """The GPU engine hands the sampler only the GPU's top (k + window) logits (the whole row without top-k):
    the same tokens as the CPU engine's draw from whole rows."""
    args = SAMPLERS[sampler]
    assert generate(gpu_exe, model, "0", "0", *args) == generate(gpu_exe, model, "none", "0", *args)


def perplexity(exe, model, gpu, *extra):
    p = run([exe, "perplexity", "-m", model, "-f", TEXT, "--ctx", "64", "--chunks", "6", "-t", "4",
             "--workers", "0", "--gpu", gpu, *extra], timeout=300)
    assert_clean(p)
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"^PPL = ([0-9.]+) \+/- ([0-9.]+) over (\d+) tokens", p.stdout, re.M)
    assert m, p.stdout
    return float(m.group(1)), int(m.group(3))


@pytest.mark.parametrize("experts", ["auto", "cpu", "split"])
@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.stem)
def test_perplexity_gpu_vs_cpu(gpu_exe, model, experts):
    """64-token windows, the routed experts where auto's measured threshold puts them (GPU or CPU) or on the
    host (cpu); both within the bound of the CPU engine's figure (the GPU-only path: test_cuda_forward's S)."""
    (cpu, n_cpu) = perplexity(gpu_exe, model, "none")
    (gpu, n_gpu) = perplexity(gpu_exe, model, "0", "--prefill-experts", experts)
    rel = abs(gpu / cpu - 1)
    bound = PPL_FLOAT if is_float(model) else PPL_QUANT["demo" if model.name.startswith("demo") else "tiny"]
    print(f"\n{model.stem} experts={experts}: PPL cpu {cpu} gpu {gpu}: rel {rel:.3g} (<= {bound})")
    assert n_cpu == n_gpu and rel <= bound


@pytest.mark.parametrize("workers", ["0", "1"])
def test_bench_gpu(gpu_exe, workers):
    p = run([gpu_exe, "bench", "-m", MODELS[0], "-p", "32", "-n", "16", "-r", "1", "--workers", workers, "--gpu", "0"],
            timeout=300)
    assert_clean(p)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(engine_lines(p.stderr)) == 1 and "GPU 0: " in engine_lines(p.stderr)[0]
    assert re.search(r"pp32", p.stdout) and re.search(r"tg16", p.stdout), p.stdout


PROMPTS = ["The engine reads", "A function returns the", "Modules are", "In the standard library"]


def complete(server, prompt):
    st, js, raw = post_json(server, "/v1/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0})
    assert st == 200, raw[:500]
    return js["choices"][0]["text"]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_serve_gpu_batched_equals_alone(gpu_exe, workers):
    model = ROOT / "tests" / "fixtures" / "models" / "demo-v3-F32.gguf"
    server = Server(gpu_exe, model, ["--gpu", "0", "--workers", workers, "-t", "4"]).start(timeout=180)
    try:
        alone = [complete(server, p) for p in PROMPTS]
        for _ in range(2):
            with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
                together = list(pool.map(lambda p: complete(server, p), PROMPTS))
            assert together == alone
        assert any(alone), alone
    finally:
        err = server.stop_and_check()
    assert len(engine_lines(err)) == 1 and "GPU 0: " in engine_lines(err)[0], err[-2000:]


@pytest.mark.parametrize("workers", ["0", "1"])
@pytest.mark.parametrize("model", [m for m in MODELS if is_float(m)], ids=lambda p: p.stem)
def test_cuda_graphs_same_tokens(gpu_exe, model, workers, monkeypatch):
    """Decode passes replayed as CUDA graphs (the default) give the same 64 greedy tokens as without them
    (NUMOE_CUDA_GRAPHS=0), and the engine line says which."""
    monkeypatch.setenv("NUMOE_CUDA_GRAPHS", "0")
    r = run([gpu_exe, "generate", "-m", model, "--tokens", PROMPT, "-n", STEPS, "--workers", workers, "-t", "4",
             "--gpu", "0"], timeout=300)
    assert r.returncode == 0 and "as CUDA graphs" not in engine_lines(r.stderr)[0], r.stderr[-2000:]
    ref = [int(t) for t in r.stdout.strip().split(",")]
    monkeypatch.delenv("NUMOE_CUDA_GRAPHS")
    p = run([gpu_exe, "generate", "-m", model, "--tokens", PROMPT, "-n", STEPS, "--workers", workers, "-t", "4",
             "--gpu", "0"], timeout=300)
    assert_clean(p)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "as CUDA graphs" in engine_lines(p.stderr)[0], p.stderr[-2000:]
    assert [int(t) for t in p.stdout.strip().split(",")] == ref


def test_upload_progress(gpu_exe, monkeypatch):
    """The copy of the weights to VRAM is a start-up step with progress (NUMOE_PROGRESS=lines shows it for a
    small model too): 10% lines that only grow, then the final line."""
    monkeypatch.setenv("NUMOE_PROGRESS", "lines")
    p = run([gpu_exe, "generate", "-m", MODEL, "--tokens", "1,2", "-n", "1", "--workers", "0", "--gpu", "0"],
            timeout=120)
    assert_clean(p)
    assert p.returncode == 0, p.stderr[-2000:]
    pct = [int(x) for x in re.findall(r"^numoe: copying the weights to VRAM: (\d+)%", p.stderr, re.M)]
    assert pct == sorted(pct) and pct, p.stderr[-2000:]
    assert re.search(r"^numoe: copying the weights to VRAM: done, ", p.stderr, re.M), p.stderr[-2000:]


def gpu_mem_used_mib():
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_serve_gpu_vram_flat(gpu_exe):
    """1000 requests (prompts of varied length, sampled and greedy, 4 at a time) through the GPU server: the
    device memory in use after them equals what it was after the first 40 (caches are freed with their
    requests, nothing grows per request; the CUDA graphs of every pass size are captured at the first decode
    step, so a batch size first seen later takes no new VRAM)."""
    model = ROOT / "tests" / "fixtures" / "models" / "demo-v3-Q8_0.gguf"
    server = Server(gpu_exe, model, ["--gpu", "0", "--workers", "0", "-t", "4"]).start(timeout=180)
    words = "the module returns a list of objects for each class in the standard library".split()

    def one(i):
        prompt = " ".join(words[: 1 + i % len(words)]) * (1 + i % 5)
        st, js, raw = post_json(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1 + i % 6,
                                                            "temperature": 0 if i % 2 else 0.8, "seed": i})
        assert st == 200, raw[:300]

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(40)))
            base = gpu_mem_used_mib()
            list(pool.map(one, range(40, 1000)))
        after = gpu_mem_used_mib()
    finally:
        err = server.stop_and_check()
    print(f"\nGPU memory in use: {base} MiB after 40 requests, {after} MiB after 1000")
    assert after <= base, (base, after)
    assert len(engine_lines(err)) == 1, err[-2000:]


@pytest.mark.parametrize("placement", ["split", "experts"])
@pytest.mark.parametrize("model", [m for m in MODELS if is_float(m)], ids=lambda p: p.stem)
def test_generate_gpu_two_workers(gpu_exe, model, placement):
    """Two workers, either placement, under the GPU engine (every routed expert on them, or 2 of every
    layer in VRAM): the tokens of the CPU engine with the experts in process."""
    ref = generate(gpu_exe, model, "none", "0")
    assert generate(gpu_exe, model, "0", "2", "--placement", placement) == ref
    assert generate(gpu_exe, model, "0", "2", "--placement", placement, "--gpu-experts", "2") == ref


@pytest.mark.parametrize("hot", ["0", "2"])
def test_kill_worker_mid_generation_gpu(gpu_exe, tmp_path, hot):
    """kill -9 of a worker while the GPU engine generates 64 greedy tokens, every routed expert on the
    workers or 2 of every layer in VRAM: the worker is restarted, the layer re-sent, and the tokens are
    those of an undisturbed run."""
    import os
    import signal
    from test_workers import assert_no_leftovers, children_named, read_until, restarted_pids, worker_pids
    model = ROOT / "tests" / "fixtures" / "models" / "deepseek-v3-tiny-F32-mla.gguf"
    args = [str(gpu_exe), "generate", "-m", str(model), "--tokens", "5,6,7,8,9", "-n", "64", "-t", "2", "--gpu", "0",
            "--gpu-experts", hot]
    ref = run(args + ["--workers", "0"])
    assert ref.returncode == 0, ref.stderr
    env = dict(os.environ, NUMOE_TEST_DELAY_US="10000")  # >= 20 ms a token: time to kill mid-way
    log = tmp_path / "stderr.txt"
    with open(log, "w") as f:
        p = subprocess.Popen([*args, "--workers", "2", "--placement", "experts"], stdout=subprocess.PIPE, stderr=f,
                             env=env)
    first = read_until(p.stdout, lambda b: b.count(b",") >= 3)
    pids = worker_pids(log.read_text())
    assert len(pids) == 2 and sorted(children_named(p.pid, "numoe-worker")) == sorted(pids), log.read_text()
    os.kill(pids[1], signal.SIGKILL)
    rest = p.stdout.read().decode()
    p.wait(timeout=120)
    err = log.read_text()
    assert p.returncode == 0, err
    assert (first + rest).strip() == ref.stdout.strip(), (first + rest, ref.stdout)
    assert re.search(r"^numoe: worker 1 restarted in [\d.]+ ms \(attempt 1, pid \d+\)$", err, re.M), err
    assert_no_leftovers(p.pid, pids + restarted_pids(err))
