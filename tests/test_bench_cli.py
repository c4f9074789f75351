"""`numoe bench` and `numoe bench kernels` produce their figures.

No speed limits (this machine is shared and the sanitizer tree is slow): the
tests check that every requested row is there, that each figure is a finite
positive number, and that the derived figures agree with the measured ones
(decode GB/s = the bytes one token reads x tokens/s, the bytes recomputed
here from the GGUF's tensor table)."""
import math
import re

import gguf
import pytest

from conftest import ROOT, assert_clean, run

FIX = ROOT / "tests" / "fixtures" / "models"
V3 = FIX / "deepseek-v3-tiny-Q8_0-mla.gguf"
V2 = FIX / "deepseek-v2-tiny-Q4_K-legacy.gguf"
HEADER = ["| model | threads | experts used | test | tokens/s |", "|---|---|---|---|---|"]
ROW = re.compile(r"^\| (\S+) \| (\d+) \| (\d+) \| (pp|tg)(\d+) \| (\S+) ± (\S+) \|$")
DECODE = re.compile(r"^decode reads (\S+) MB of weights per token \(dense \+ (\d+) of (\d+) experts per MoE layer\): "
                    r"(\S+) GB/s effective at the measured rate$")
KERNEL_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
ISAS = {"scalar", "avx2", "avx512", "avx512vnni"}


def positive(text):
    v = float(text)
    assert math.isfinite(v) and v > 0, text
    return v


def decode_bytes(model, k):
    """What one decode step reads: every tensor, k of the experts' share of the
    stacked expert tensors, one row of the embedding."""
    r = gguf.GGUFReader(str(model))
    n_exp = int(r.fields["deepseek2.expert_count"].contents())
    b = 0.0
    for t in r.tensors:
        if "_exps." in t.name:
            b += t.n_bytes * k / n_exp
        elif t.name == "token_embd.weight":
            b += t.n_bytes / int(t.shape[1])
        else:
            b += t.n_bytes
    return b


@pytest.mark.parametrize("model,args,want,k", [
    (V3, ["-p", "16", "-n", "8", "-r", "2", "--workers", "0"], ["pp16", "tg8"], 3),
    (V2, ["-p", "0", "-n", "6"], ["tg6"], 2),  # through the launcher and one numoe-worker
    (V2, ["-p", "8", "-n", "0", "-r", "3", "--experts-used", "1", "--workers", "0"], ["pp8"], 1),
], ids=["pp+tg", "tg-only-worker", "pp-only-k1"])
def test_bench_table(numoe, model, args, want, k):
    proc = run([numoe, "bench", "-m", model, "-t", "2", *args], cwd=ROOT)
    assert_clean(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[:2] == HEADER, proc.stdout
    rows = [ROW.match(x) for x in lines[2:2 + len(want)]]
    assert all(rows), proc.stdout
    reps = int(args[args.index("-r") + 1]) if "-r" in args else 1
    tg = None
    for m, test in zip(rows, want):
        path, threads, used, kind, count, mean, spread = m.groups()
        assert (path, int(threads), int(used), kind + count) == (str(model), 2, k, test), m.group(0)
        assert positive(mean) > 0
        sd = float(spread)
        assert math.isfinite(sd) and sd >= 0
        if reps == 1:
            assert sd == 0, "one repetition has no spread"
        if kind == "tg":
            tg = float(mean)
    rest = [x for x in lines[2 + len(want):] if x.strip()]
    if tg is None:
        assert rest == [], proc.stdout
        return
    assert len(rest) == 1, proc.stdout
    d = DECODE.match(rest[0])
    assert d, rest[0]
    mb, used, n_exp, gbs = d.groups()
    want_bytes = decode_bytes(model, k)
    assert (int(used), int(n_exp)) == (k, 8)
    assert float(mb) == round(want_bytes / 1e6, 1), (mb, want_bytes)
    # printed tokens/s carry 2 decimals and GB/s 2: equal up to that rounding
    assert abs(positive(gbs) - want_bytes * tg / 1e9) <= 0.006 + want_bytes * 0.006 / 1e9, (gbs, want_bytes, tg)


def kernels(numoe, *args, moe="none"):
    proc = run([numoe, "bench", "kernels", "--mb", "1", "--reps", "1", "--threads", "2", "--gemm-mb", "1",
                "--moe", moe, *args])
    assert_clean(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def type_rows(out):
    """{type: [dot, gbs 1 thread, gbs threads, %, (GEMM)]} of the GEMV table."""
    lines = out.splitlines()
    head = next(i for i, x in enumerate(lines) if x.split()[:2] == ["type", "dot"])
    rows = {}
    for x in lines[head + 1:]:
        if not x.strip():
            break
        f = x.split()
        assert f[0] not in rows, f"{f[0]} twice"
        rows[f[0]] = f[1:]
    return lines[head].split(), rows


def test_bench_kernels_every_type(numoe):
    out = kernels(numoe, "--gemm-tok", "4")
    bw = {x.split()[0]: x.split()[-2:] for x in out.splitlines() if x.strip().startswith(("read ", "memcpy "))}
    assert set(bw) == {"read", "memcpy"}, out
    for figures in bw.values():
        [positive(v) for v in figures]
    head, rows = type_rows(out)
    assert head == ["type", "dot", "1", "thread", "threads", "%", "GEMM"], out
    assert list(rows) == KERNEL_TYPES, out
    sanitized = "build-asan" in str(numoe)
    for t, (dot, one, allt, pct, gemm) in rows.items():
        assert dot in ISAS, (t, dot)
        assert pct.endswith("%"), (t, pct)
        for v in (one, allt, pct[:-1], gemm):
            # one decimal: the sanitizer tree's slowest kernels may print 0.0 on a busy machine
            assert float(v) >= 0 if sanitized else positive(v), (t, v)


def test_bench_kernels_types_and_isa(numoe):
    head, rows = type_rows(kernels(numoe, "--gemm-tok", "0", "--types", "Q6_K,Q4_0,BF16", "--isa", "scalar"))
    assert head == ["type", "dot", "1", "thread", "threads", "%"]  # no GEMM column with --gemm-tok 0
    assert list(rows) == ["Q6_K", "Q4_0", "BF16"]
    assert {r[0] for r in rows.values()} == {"scalar"}


def test_bench_kernels_moe_decode(numoe):
    """The routed-experts table: one decode token through the MoE kernel, per layout
    (rows in process, tiles as a worker's shard holds them) and schedule; the experts
    held follow --mb (at least one call's), flagged when they fit the cache."""
    out = kernels(numoe, "--types", "Q4_K", "--gemm-tok", "0", moe="v2-lite")
    lines = out.splitlines()
    i = next(i for i, x in enumerate(lines) if x.strip().startswith("v2-lite"))
    assert "Q4_K/Q4_K/Q5_0, 6 of 6 experts a call (31.36 MB read" in lines[i], lines[i]
    rows = [x.split() for x in lines[i + 1:i + 5]]
    got = [(" ".join(r[:-4]), r[-4]) for r in rows]
    assert got == [("rows (the GGUF's, in process)", "staged"), ("rows (the GGUF's, in process)", "fused"),
                   ("tiles (a worker's shard)", "staged"), ("tiles (a worker's shard)", "fused")], out
    for r in rows:
        positive(r[-3]), positive(r[-2])
        assert r[-1].endswith("%"), r
    assert not any(x.strip().startswith("v3 ") for x in lines), out
    p = run([numoe, "bench", "kernels", "--mb", "1", "--types", "Q4_0", "--moe", "v2-lite,v9"])
    assert p.returncode == 2 and "--moe: unknown shape 'v9' (v2-lite, v3, none)" in p.stderr, p.stderr


def test_bench_kernels_prefill(numoe):
    """The prefill table: one V3 expert matrix against a batch through the tile GEMMs, VNNI
    on 1 and 2 threads, AMX beside it with the tile unit's peak where the CPU has it (else
    one line says why), and both paths' bits equal; --prefill-tok 0 leaves it out."""
    out = kernels(numoe, "--types", "Q4_0", "--gemm-tok", "0", "--prefill-tok", "40")
    lines = out.splitlines()
    i = next(i for i, x in enumerate(lines) if x.startswith("prefill GEMM of one expert matrix"))
    assert "40 tokens x 2048 x 7168 Q4_K" in lines[i], lines[i]
    rows = {}
    for x in lines[i + 3:]:
        if not x.startswith("    "):
            break
        f = x.split()
        if f[0] == "path":
            continue
        rows[(" ".join(f[:-4]), f[-4])] = f[-3:]
    vnni = "VNNI tiles (nm_tile_gemm, 8 tokens)"
    assert (vnni, "1") in rows and (vnni, "2") in rows, out
    amx = ("AMX tiles (nm_tile_gemm_many)", "1") in rows
    for (path, _), (ms, tops, pct) in rows.items():
        if not path.startswith("AMX peak"):
            positive(ms)
        positive(tops)
        assert pct.endswith("%") if amx else pct == "-", (path, pct)
    if amx:
        assert "  AMX and VNNI outputs bit-identical: yes" in lines, out
    else:
        assert any(x.startswith("  AMX not available on this CPU: ") for x in lines), out
    assert "prefill GEMM" not in kernels(numoe, "--types", "Q4_0", "--gemm-tok", "0", "--prefill-tok", "0")


def test_bench_errors(numoe):
    p = run([numoe, "bench", "kernels", "--mb", "1", "--types", "Q4_0,XX"])
    assert p.returncode == 2 and "unknown or repeated type 'XX'" in p.stderr, p.stderr
    p = run([numoe, "bench", "kernels", "--isa", "avx9"])
    assert p.returncode == 2 and "bad value for --isa: 'avx9'" in p.stderr, p.stderr
    p = run([numoe, "bench", "-m", V3, "-p", "x"])
    assert p.returncode == 2 and "bad option or value" in p.stderr, p.stderr
    p = run([numoe, "bench", "-m", V3, "-p", "0", "-n", "0", "--workers", "0"])
    assert p.returncode == 2 and "nothing to measure: -p and -n are both 0" in p.stderr, p.stderr
    assert p.stdout == "", p.stdout
