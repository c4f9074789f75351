"""The CPU forward pass against independent references on the same weights.

References:
  * tests/ref_deepseek.py - float64 numpy, un-absorbed attention, gguf-py
    dequantisation: runs in CI for every fixture, float and quantised.
  * HF transformers' DeepseekV2/V3 modeling code (float32), stored as golden
    outputs in tests/fixtures/golden/ by tests/make_golden.py (see there).

Models: the committed fixtures (tests/fixtures/models/deepseek-*.gguf: F32, F16,
Q8_0, Q4_K) and, generated once per session by tests/gen_deepseek.py into a
temporary folder (0.3 s each), both styles in every other weight type real
mixes use (Q2_K, Q3_K, Q5_K, Q4_0, Q4_1, Q5_1, BF16; each K type's short rows
fall back to Q4_0 / Q5_0 / Q5_1 and output.weight is Q6_K, as llama-quantize
does), so every dot-product kernel runs through the whole forward pass.

Error measures per position (row of logits): rel = max|ours - ref| / max|ref|,
cos = cosine similarity; top-1 = argmax agreement; gap = how much lower the
reference scores numoe's argmax than its own, in units of the row's std.
The bounds below are a small margin over the worst figure measured over every
model, mode and build tree, on the scalar, AVX2 and AVX-512 kernels alike
(NUMOE_ISA); the end of the run prints the worst figure of this run next to
each bound.

Routing: numoe's --dump-routing is fed to the reference (`force`), so both run
the same experts everywhere and are compared over the whole sequence, prompt
and free-running greedy continuation alike. Where numoe's choice differs from
the one the reference would have made on that same history, the two
candidates' selection scores must be a near-tie (TIE_* below); float GGUFs
must route exactly as the reference does, everywhere."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import ref_deepseek  # needs gguf (tests/setup.sh installs it): missing, this module errors rather than skips
from conftest import ROOT, assert_clean, run, sanitizer_env

FIX = ROOT / "tests" / "fixtures" / "models"
GOLDEN = ROOT / "tests" / "fixtures" / "golden"
FLOAT_TYPES = ("F32", "F16", "BF16")
SEQ = [0, 17, 200, 45, 3, 99, 150, 12, 8, 77, 240, 31, 5, 64, 128, 250, 33, 2, 190, 101, 11, 60, 7, 222]

# Weight types no committed fixture has, generated per session in both styles.
GEN_TYPES = ("Q2_K", "Q3_K", "Q5_K", "Q4_0", "Q4_1", "Q5_1", "BF16")
STYLE_LAYOUT = {"v2": "legacy", "v3": "mla"}
COMMITTED = sorted(FIX.glob("deepseek-*.gguf"))
GENERATED = {f"deepseek-{st}-tiny-{t}-{lay}": (st, lay, t) for t in GEN_TYPES for st, lay in STYLE_LAYOUT.items()}
MODEL_NAMES = [p.stem for p in COMMITTED] + list(GENERATED)

# --- bounds; in the comments the worst figure measured over every test below (21 models,
# 3 evaluation modes and the greedy run, both build trees, NUMOE_ISA scalar, avx2, avx512) ---
# Float GGUFs vs the float64 reference, every position: rel 7.3e-7, 1 - cos 3.1e-13.
FLOAT_REL, FLOAT_1MCOS = 2e-6, 1e-11
# Float GGUFs vs transformers' float32 golden logits: rel 1.26e-6, 1 - cos 5.8e-13.
HF_REL, HF_1MCOS = 3e-6, 1e-11
# Quantised GGUFs vs the reference routed like numoe (activations are quantised to
# Q8_0 / Q8_K as in llama.cpp, the reference keeps them in float64): rel 0.049,
# 1 - cos 7.9e-4 at the worst position and 2.55e-4 on average over a sequence,
# top-1 agreement >= 0.886 of the positions (AVX2; 0.914 AVX-512), gap <= 0.064.
Q_REL, Q_1MCOS_MAX, Q_1MCOS_MEAN, Q_TOP1, Q_GAP = 0.06, 1e-3, 3e-4, 0.85, 0.08
# Routing near-ties, as a fraction of the token's range, in the space the choice is
# made in: softmax (v2) compares router logits (= log-probabilities + a constant):
# 0.0274; sigmoid + bias (v3) compares the biased scores: 0.0250; a different kept
# group (v3), its top-2-sum score relative to the largest group score: 0.0162.
# These are the figures of the sequences below over both attention forms (the
# absorbed form alone: 0.0254 / 0.0090 / 0.0083; the decompressed one rounds other
# products to 8 bits - the latent rows instead of q_nope and o_c - so other
# decisions come near ties); other random sequences reach 0.026 / 0.049 / 0.018
# (long tails of 4-bit models' activations): re-measure when SEQ or the generator
# changes. A routing bug moves whole experts: margins of 0.1 and more.
TIE_SOFTMAX, TIE_SIGMOID, TIE_GROUP = 0.03, 0.03, 0.02
# The evaluation modes against each other: bit-identical (0) on every ISA measured.
MODES_REL = 1e-6

_ref_cache = {}
_fwd_cache = {}


def ref_model(path):
    if path not in _ref_cache:
        _ref_cache[path] = ref_deepseek.Model(str(path))
    return _ref_cache[path]


def ref_forward(path, seq, force=None):
    """Reference logits and routing log, cached: the same sequence and routing
    come back from every mode and build tree."""
    key = (str(path), tuple(seq), None if force is None else tuple(sorted((k, tuple(v)) for k, v in force.items())))
    if key not in _fwd_cache:
        log = []
        _fwd_cache[key] = (ref_model(path).forward(np.array(seq), force=force, log=log), log)
    return _fwd_cache[key]


def is_float(path):
    return any(re.search(rf"-{t}(-|$)", path.stem) for t in FLOAT_TYPES)


@pytest.fixture(scope="session")
def type_models(tmp_path_factory):
    """name -> path of a generated model, written on first use."""
    d = tmp_path_factory.mktemp("type-models")
    made = {}

    def get(name):
        if name not in made:
            style, layout, typ = GENERATED[name]
            out = d / f"{name}.gguf"
            proc = subprocess.run([sys.executable, str(ROOT / "tests" / "gen_deepseek.py"), "-q", "--seed", "1234",
                                   "--style", style, "--attn-layout", layout, "--type", typ, "-o", str(out)],
                                  capture_output=True, text=True, cwd=ROOT, timeout=300)
            assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
            made[name] = out
        return made[name]

    return get


@pytest.fixture
def model(request, type_models):
    return type_models(request.param) if request.param in GENERATED else FIX / f"{request.param}.gguf"


def numoe_logits(exe, model, tokens, tmp_path, extra=(), tag="x", n=0, attn=None, env_extra=None):
    """Logits of every prompt position (then of every generated token fed back) and,
    with n > 0, the generated ids. attn forces the CPU engine's attention form
    (NUMOE_CPU_ATTN: absorbed or decompressed; None: its own choice per run);
    env_extra adds environment variables."""
    out = tmp_path / f"{model.stem}-{tag}.bin"
    env = sanitizer_env()
    if attn:
        env["NUMOE_CPU_ATTN"] = attn
    env.update(env_extra or {})
    proc = run([exe, "generate", "-m", model, "--tokens", ",".join(map(str, tokens)), "-n", str(n), "-t", "2",
                "--dump-logits", out, *extra], env=env)
    assert_clean(proc)
    assert proc.returncode == 0, proc.stderr
    logits = np.fromfile(out, dtype=np.float32).reshape(len(tokens) + n, -1).astype(np.float64)
    if n == 0:
        return logits
    gen = [int(x) for x in proc.stdout.strip().split(",")]
    assert len(gen) == n, proc.stdout
    return logits, gen


def measures(ours, ref):
    rel = np.abs(ours - ref).max(1) / np.abs(ref).max(1)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    top1 = ours.argmax(1) == ref.argmax(1)
    return rel, cos, top1


def check_against(ours, ref, model, what, measured, hf=False):
    """Float GGUFs: rel and cosine at every position. Quantised GGUFs (reference
    routed like numoe): rel and cosine at every position, mean cosine, top-1
    agreement, and every top-1 difference a near-tie of the reference's."""
    rel, cos, top1 = measures(ours, ref)
    if is_float(model):
        b_rel, b_cos = (HF_REL, HF_1MCOS) if hf else (FLOAT_REL, FLOAT_1MCOS)
        tag = "hf" if hf else "float"
        measured(f"forward {tag} rel", rel.max(), b_rel)
        measured(f"forward {tag} 1-cos", 1 - cos.min(), b_cos)
        assert rel.max() <= b_rel and 1 - cos.min() <= b_cos, (what, rel.max(), 1 - cos.min())
        return
    rows = np.arange(len(ref))
    gap = (ref[rows, ref.argmax(1)] - ref[rows, ours.argmax(1)]) / ref.std(1)
    measured("forward quant rel", rel.max(), Q_REL)
    measured("forward quant 1-cos (worst position)", 1 - cos.min(), Q_1MCOS_MAX)
    measured("forward quant 1-cos (mean)", 1 - cos.mean(), Q_1MCOS_MEAN)
    measured("forward quant 1-top1", 1 - top1.mean(), 1 - Q_TOP1)
    measured("forward quant top-1 gap", gap.max(), Q_GAP)
    assert rel.max() <= Q_REL, (what, "rel", rel.max(), int(rel.argmax()))
    assert 1 - cos.min() <= Q_1MCOS_MAX, (what, "1 - cos", 1 - cos.min(), int(cos.argmin()))
    assert 1 - cos.mean() <= Q_1MCOS_MEAN, (what, "1 - mean cos", 1 - cos.mean())
    assert top1.mean() >= Q_TOP1, (what, "top-1", top1.mean())
    assert gap.max() <= Q_GAP, (what, "top-1 differences that are not near-ties (position, gap)",
                                [(int(t), round(float(gap[t]), 4)) for t in np.nonzero(gap > Q_GAP)[0]])


def routing_of(path, k):
    """numoe's --dump-routing file as {(layer, position): ids}."""
    r = np.fromfile(path, dtype=np.int32).reshape(-1, 2 + k)
    return {(int(a[1]), int(a[0])): [int(x) for x in a[2:]] for a in r}


def tie_margin(dec, ours):
    """How far apart, as a fraction of the token's range, the reference's scores of
    what it chose and of what numoe chose instead are: (kind, margin, bound). An
    expert of a group the reference did not keep (group-limited routing) is judged
    by the group scores: the lowest kept group's against that group's; otherwise
    the swapped experts, the best of each side paired, then the next."""
    s, top = dec["scores"], list(dec["top"])
    g = dec["group_scores"]
    if g is not None:
        per = len(s) // len(g)
        kept = {int(x) for x in dec["kept"]}
        foreign = sorted({e // per for e in ours} - kept)
        if foreign:  # with few groups their range says nothing; compare with the scores' size
            low = min(g[k] for k in kept)
            return "group", max(low - g[f] for f in foreign) / np.abs(g).max(), TIE_GROUP
    softmax = dec["gating"] == 1
    if softmax:  # the logits order the experts as the probabilities do, and spread them evenly
        s = dec["logits"]
    missing = sorted((s[e] for e in top if e not in ours), reverse=True)
    extra = sorted((s[e] for e in ours if e not in top), reverse=True)
    bound = TIE_SOFTMAX if softmax else TIE_SIGMOID
    return "expert", max(a - b for a, b in zip(missing, extra)) / (s.max() - s.min()), bound


def check_routing(model, force, log, measured):
    """Every decision of the reference (made on numoe's routing history) equals
    numoe's, or is a near-tie; float GGUFs: equal everywhere."""
    assert {(d["layer"], d["t"]) for d in log} == set(force), "numoe's routing dump misses decisions"
    flips = [d for d in log if set(d["top"]) != set(force[(d["layer"], d["t"])])]
    if is_float(model):
        assert not flips, ("routing differs from the reference", [(d["layer"], d["t"]) for d in flips])
        return
    bad = []
    for d in flips:
        kind, margin, bound = tie_margin(d, force[(d["layer"], d["t"])])
        measured(f"routing near-tie ({kind}, {'softmax' if d['gating'] == 1 else 'sigmoid'})", margin, bound)
        if margin > bound:
            bad.append((d["layer"], d["t"], kind, round(float(margin), 4)))
    assert not bad, ("routing differences that are not near-ties (layer, position, kind, margin)", bad)


def check_run(exe, model, seq, tmp_path, measured, extra=(), tag="q", n=0, attn=None):
    """numoe on seq (and n greedy tokens after it) against the reference routed
    exactly as numoe routed, over every position."""
    m = ref_model(model)
    rpath = tmp_path / f"{model.stem}-{tag}.route"
    got = numoe_logits(exe, model, seq, tmp_path, [*extra, "--dump-routing", rpath], tag=tag, n=n, attn=attn)
    ours, gen = (got, []) if n == 0 else got
    force = routing_of(rpath, m.k)
    full = list(seq) + gen
    # float GGUFs: the reference routes by itself and must agree with numoe everywhere
    ref, log = ref_forward(model, full, None if is_float(model) else force)
    check_routing(model, force, log, measured)
    check_against(ours, ref, model, tag, measured)
    return ours, gen, ref


@pytest.fixture(scope="module", params=["build", "build-asan"])
def exe(request):
    """numoe from the optimised tree and from the ASan/UBSan tree."""
    path = ROOT / request.param / "bin" / "numoe"
    if not path.exists():
        if request.param == "build":
            pytest.fail("build/bin/numoe not built")
        pytest.skip("no sanitizer build")
    return path


def test_fixtures_exist():
    assert {p.name.split("-")[3] for p in COMMITTED} >= {"F32", "F16", "Q8_0", "Q4_K"}, COMMITTED
    assert len(COMMITTED) >= 7, COMMITTED


@pytest.mark.parametrize("attn", ["absorbed", "decompressed"])
@pytest.mark.parametrize("model", MODEL_NAMES, indirect=True)
def test_teacher_forced_modes(exe, model, attn, tmp_path, measured):
    """Prefill in one batch, token-by-token decode and prefill-then-decode
    against the numpy reference and against each other, in each attention form
    (docs/MODEL.md §5.1): within one form the modes agree bit for bit."""
    modes = {"batch": [], "token": ["--decode-from", "0"], "prefill+decode": ["--decode-from", "10", "-b", "4"]}
    seq = SEQ if is_float(model) else SEQ * 3  # more positions for the statistical bounds
    got = {name: check_run(exe, model, seq, tmp_path, measured, extra, tag=name.replace("+", "-"), attn=attn)[0]
           for name, extra in modes.items()}
    for name in ("token", "prefill+decode"):
        rel, _, _ = measures(got["batch"], got[name])
        measured("forward modes rel", rel.max(), MODES_REL)
        assert rel.max() <= MODES_REL, (name, rel.max())


@pytest.mark.parametrize("model", MODEL_NAMES, indirect=True)
def test_greedy_64(exe, model, tmp_path, measured):
    """64 greedy tokens, compared with the reference over the whole run: float
    GGUFs give the reference's own greedy continuation token for token (every
    token is its argmax after the tokens before it, with the same routing);
    quantised GGUFs, with the reference routed like numoe, keep every logit
    bound and pick the reference's argmax or a near-tie of it at every step."""
    prompt = SEQ[:6]
    ours, gen, ref = check_run(exe, model, prompt, tmp_path, measured, tag="greedy", n=64)
    steps = ours[len(prompt) - 1:-1]
    assert gen == [int(x) for x in steps.argmax(1)], "the generated ids are not the argmax of numoe's own logits"
    if is_float(model):
        assert gen == [int(x) for x in ref[len(prompt) - 1:-1].argmax(1)]
    assert len(set(gen)) > 8, gen  # a real continuation, not one token repeated


@pytest.mark.parametrize("golden", sorted(GOLDEN.glob("*/meta.json")), ids=lambda p: p.parent.name)
def test_hf_golden(exe, golden, tmp_path, measured):
    """Teacher-forced logits and greedy tokens of HF transformers (float32)."""
    meta = json.loads(golden.read_text())
    model = ROOT / meta["gguf"]
    ids = meta["input_ids"]
    ref = np.load(golden.parent / meta["logits"]).astype(np.float64)
    ours = numoe_logits(exe, model, ids, tmp_path, tag="hf")
    check_against(ours, ref, model, "hf-batch", measured, hf=True)
    ours = numoe_logits(exe, model, ids, tmp_path, ["--decode-from", "0"], tag="hf-token")
    check_against(ours, ref, model, "hf-token", measured, hf=True)
    p = meta["greedy_prompt"]
    proc = run([exe, "generate", "-m", model, "--tokens", ",".join(map(str, p)), "-n",
                str(len(meta["greedy_tokens"])), "-t", "2"])
    assert_clean(proc)
    assert proc.returncode == 0, proc.stderr
    assert [int(x) for x in proc.stdout.strip().split(",")] == meta["greedy_tokens"]


@pytest.mark.parametrize("model", ["deepseek-v3-tiny-Q4_K-mla", "deepseek-v2-tiny-F32-legacy"])
def test_attention_form_choice(exe, model, tmp_path):
    """Left to choose, the engine decompresses a prompt from an empty cache (a run
    of >= 16 tokens whose heads are narrower than the latent: 2 kv_lora > d_nope +
    d_v on the fixtures) and keeps decode tokens and short runs absorbed: its logits
    equal the forced form's bit for bit in each case."""
    path = FIX / f"{model}.gguf"
    seq = SEQ * 2
    auto = numoe_logits(exe, path, seq, tmp_path, tag="auto")
    assert np.array_equal(auto, numoe_logits(exe, path, seq, tmp_path, tag="dec", attn="decompressed"))
    assert not np.array_equal(auto, numoe_logits(exe, path, seq, tmp_path, tag="abs", attn="absorbed"))
    short = ["-b", "8"]  # the prompt in chunks of 8 tokens: absorbed
    auto = numoe_logits(exe, path, seq, tmp_path, short, tag="auto8")
    assert np.array_equal(auto, numoe_logits(exe, path, seq, tmp_path, short, tag="abs8", attn="absorbed"))
    proc = run([exe, "generate", "-m", path, "--tokens", "1,2", "-n", "1"],
               env={**sanitizer_env(), "NUMOE_CPU_ATTN": "sideways"})
    assert proc.returncode != 0 and "NUMOE_CPU_ATTN=sideways: use auto" in proc.stderr, proc.stderr


@pytest.mark.parametrize("model", ["deepseek-v3-tiny-Q4_K-mla", "deepseek-v2-tiny-Q8_0-legacy"])
def test_moe_schedule(exe, model, tmp_path):
    """The MoE kernel's two orders of work (kernels/moe.h: staged, fused; auto takes
    fused up to 8 tokens) give the same logits bit for bit, for a prompt (one
    batch: staged under auto) and token by token (fused under auto); a name that
    is neither is refused."""
    path = FIX / f"{model}.gguf"
    for extra, tag in (((), "batch"), (("--decode-from", "0"), "token")):
        got = {s: numoe_logits(exe, path, SEQ, tmp_path, extra, tag=f"{tag}-{s}", env_extra={"NUMOE_MOE_SCHEDULE": s})
               for s in ("auto", "staged", "fused")}
        assert np.array_equal(got["auto"], got["staged"]) and np.array_equal(got["auto"], got["fused"]), tag
    proc = run([exe, "generate", "-m", path, "--tokens", "1,2", "-n", "1"],
               env={**sanitizer_env(), "NUMOE_MOE_SCHEDULE": "sideways"})
    assert proc.returncode != 0 and "NUMOE_MOE_SCHEDULE=sideways: expected auto, staged or fused" in proc.stderr, \
        proc.stderr


def test_isa_typo_refused(exe):
    """NUMOE_ISA names a CPU level; a value that is none (a typo) stops the command before it loads anything,
    naming the levels, where the kernels library alone would only warn and run the best level."""
    path = FIX / "deepseek-v2-tiny-F32-legacy.gguf"
    proc = run([exe, "generate", "-m", path, "--tokens", "1,2", "-n", "1"], env={**sanitizer_env(), "NUMOE_ISA": "avx-512"})
    assert proc.returncode == 2 and "NUMOE_ISA=avx-512: unknown level" in proc.stderr \
        and "avx512vnni or amx" in proc.stderr, proc.stderr
    ok = run([exe, "generate", "-m", path, "--tokens", "1,2", "-n", "1", "--workers", "0"],
             env={**sanitizer_env(), "NUMOE_ISA": "Scalar"})
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_hf_golden_present():
    assert {p.parent.name for p in GOLDEN.glob("*/meta.json")} == {"deepseek-v2-tiny", "deepseek-v3-tiny"}


def test_experts_used_lowered(exe, tmp_path, measured):
    """--experts-used below the model's count equals the reference with that top-k."""
    model = FIX / "deepseek-v3-tiny-F32-mla.gguf"
    rm = ref_model(model)
    k = rm.k
    rm.k = k - 1
    try:
        ref = rm.forward(np.array(SEQ[:12]))
    finally:
        rm.k = k
    ours = numoe_logits(exe, model, SEQ[:12], tmp_path, ["--experts-used", str(k - 1)], tag="k")
    check_against(ours, ref, model, "experts-used", measured)
    full = numoe_logits(exe, model, SEQ[:12], tmp_path, tag="full")
    # it really routed to fewer experts: every position changes (measured: rel >= 0.199)
    assert measures(full, ours)[0].min() > 0.1


def test_bad_inputs(numoe, tmp_path):
    model = COMMITTED[0]
    proc = run([numoe, "generate", "-m", model, "--tokens", "1,2,3,4,5,6,7,8,9,10", "-n", "4", "-c", "8"])
    assert_clean(proc)
    assert proc.returncode == 1 and "context full" in proc.stderr, proc.stderr
    proc = run([numoe, "generate", "-m", model, "--tokens", "1,999999", "-n", "1"])
    assert proc.returncode == 1 and "token id 999999 at input position 1 is outside the vocabulary" in proc.stderr
    proc = run([numoe, "generate", "-m", model, "--tokens", "1,x"])
    assert proc.returncode == 2 and "comma-separated integers" in proc.stderr
    proc = run([numoe, "generate", "-m", model, "--tokens", "1", "--experts-used", "100"])
    assert proc.returncode == 1 and "can lower it, not raise it" in proc.stderr
    proc = run([numoe, "generate", "-m", tmp_path / "missing.gguf", "--tokens", "1"])
    assert proc.returncode == 1 and "missing.gguf: cannot open" in proc.stderr
