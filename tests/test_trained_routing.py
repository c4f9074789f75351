"""Routing statistics and the placement balancer on a real routing profile: the trained demo
model's (tests/train_demo.py), recorded with `numoe generate --dump-routing` on held-out text.

What training did to the routing (checked in test_trained_routing_statistics): the aux-loss-free
bias keeps every expert's share of the picks near 1/8 (DeepSeek-V3's balancing works, so per-expert
load is not what a placement can gain on), while the pairs of experts a token gets are strongly
peaked (the best pair of each layer is picked 2.5-3.3 times as often as a uniform pair would
be): experts that work together, which whole-expert placement should put on different workers.

The figure of merit is the tool's: the expected busiest-worker active experts per token over the
profile (k=2 on 2 workers: 1.0 when a token's two experts sit on different workers, 2.0 when on
the same). Measured on this profile (build and build-asan alike; MEASURED):
    contiguous blocks (--placement experts)       1.463
    round-robin (--placement experts-rr)           1.349
    greedy alone (no swap refinement)              1.356
    `numoe placement --profile` (greedy + swaps)   1.311
    best bisection (all 35, computed here)         1.311
The greedy (experts by decreasing frequency, each to the worker with the least load + pairwise
co-activation so far) alone was no better than round-robin, which already splits the expert pairs
of each routing group (2g, 2g+1); the swap refinement after it, judged on the figure itself,
reaches the exhaustive optimum. The test pins the figures so that a change in routing shows up,
and asserts the balancer's margins over both fixed placements and its distance to the optimum.
"""
import itertools
import re
import struct
from collections import Counter

import pytest

from conftest import ROOT, assert_clean, run

MODEL = ROOT / "tests" / "fixtures" / "models" / "demo-v3-Q8_0.gguf"
TEXT = ROOT / "tests" / "fixtures" / "text" / "python-docs-heldout.txt"
N_EXPERT, K, MOE_LAYERS = 8, 2, (1, 2, 3)
N_PIECES, PIECE = 8, 560  # 8 prompts of ~190 tokens (the model's context is 256)
MEASURED = {"contiguous": 1.463, "round_robin": 1.349, "balanced": 1.311, "best": 1.311}
MARGIN = 0.01


@pytest.fixture
def profile(numoe, tmp_path):
    """Routing records of the prompt tokens of N_PIECES consecutive pieces of the held-out text."""
    text = TEXT.read_text()
    prof = tmp_path / "routing.bin"
    raw = b""
    for i in range(N_PIECES):
        piece = text[i * PIECE:(i + 1) * PIECE]
        part = tmp_path / f"r{i}.bin"
        p = run([numoe, "generate", "-m", MODEL, "--prompt", piece[:piece.rfind(" ")], "-n", "0",
                 "--dump-routing", part, "--workers", "0", "-t", "2"])
        assert_clean(p)
        assert p.returncode == 0, p.stderr[-3000:]
        raw += part.read_bytes()
    prof.write_bytes(raw)
    rl = 4 * (K + 2)
    assert raw and len(raw) % rl == 0
    return prof, [struct.unpack_from(f"<{K + 2}i", raw, o) for o in range(0, len(raw), rl)]


def busiest_py(recs, where):
    """The tool's figure, computed here: mean over records of the busiest worker's experts."""
    return sum(max(Counter(where[r[1]][e] for e in r[2:]).values()) for r in recs) / len(recs)


def map_of(path):
    where = {}
    for line in path.read_text().splitlines():
        if line.startswith("layer "):
            layer, ws = line[6:].split(":")
            where[int(layer)] = [int(w) for w in ws.split()]
    return where


def test_trained_routing_statistics(profile):
    _, recs = profile
    assert {r[1] for r in recs} == set(MOE_LAYERS)
    for layer in MOE_LAYERS:
        lr = [r for r in recs if r[1] == layer]
        use = Counter(e for r in lr for e in r[2:])
        shares = [use[e] / (K * len(lr)) for e in range(N_EXPERT)]
        pairs = Counter(tuple(sorted(r[2:])) for r in lr)
        top_pair, n_top = pairs.most_common(1)[0]
        peak = n_top / len(lr) * (N_EXPERT * (N_EXPERT - 1) // 2)
        print(f"\nlayer {layer}: {len(lr)} tokens, expert shares {[round(s, 3) for s in shares]}, "
              f"top pair {top_pair} x{peak:.2f} a uniform pair")
        assert all(0.06 < s < 0.2 for s in shares), shares  # bias-balanced: 1/8 = 0.125 each
        assert peak >= 2.0, pairs.most_common(4)  # peaked co-activation


def test_balancer_on_trained_profile(numoe, profile, tmp_path):
    prof, recs = profile
    rr = tmp_path / "rr.txt"
    rr.write_text("workers 2\n" + "".join(f"layer {l}: " + " ".join(str(e % 2) for e in range(N_EXPERT)) + "\n"
                                          for l in MOE_LAYERS))
    p = run([numoe, "placement", "--model", MODEL, "--check", rr, "--profile", prof])
    assert_clean(p)
    assert p.returncode == 0, p.stderr
    round_robin = float(re.search(r"busiest-worker active experts per token: ([0-9.]+)", p.stdout).group(1))

    bal = tmp_path / "balanced.txt"
    p = run([numoe, "placement", "--model", MODEL, "--workers", "2", "--profile", prof, "-o", bal])
    assert_clean(p)
    assert p.returncode == 0, p.stderr
    contiguous = float(re.search(r"contiguous blocks: ([0-9.]+)", p.stdout).group(1))
    balanced = float(re.search(r"balanced: +([0-9.]+)", p.stdout).group(1))
    where = map_of(bal)
    assert sorted(where) == list(MOE_LAYERS)
    assert all(ws.count(0) == ws.count(1) == N_EXPERT // 2 for ws in where.values()), where

    # the tool's figures, recomputed from the records and the maps
    assert abs(busiest_py(recs, {l: [e % 2 for e in range(N_EXPERT)] for l in MOE_LAYERS}) - round_robin) < 1e-3
    assert abs(busiest_py(recs, {l: [e * 2 // N_EXPERT for e in range(N_EXPERT)] for l in MOE_LAYERS})
               - contiguous) < 1e-3
    assert abs(busiest_py(recs, where) - balanced) < 1e-3
    # the best whole-expert bisection of each layer, for comparison (layers are independent)
    best = 0.0
    for layer in MOE_LAYERS:
        lr = [r for r in recs if r[1] == layer]
        best += min(busiest_py(lr, {layer: [int(e in half) for e in range(N_EXPERT)]})
                    for half in itertools.combinations(range(N_EXPERT), N_EXPERT // 2)) * len(lr)
    best /= len(recs)

    got = {"contiguous": contiguous, "round_robin": round_robin, "balanced": balanced, "best": best}
    print("\nbusiest-worker active experts per token (ideal 1.0): " +
          ", ".join(f"{k} {v:.3f}" for k, v in got.items()))
    # measured: balanced 1.311 vs contiguous 1.463 (-0.152) and round-robin 1.349 (-0.038); the
    # greedy alone (1.356) fails the round-robin margin, so these catch a lost refinement
    assert balanced <= contiguous - 0.10, got  # the balancer's gain over --placement experts
    assert balanced <= round_robin - 0.025, got  # ... and over --placement experts-rr
    assert balanced <= best + 0.005, got  # within a small margin of the exhaustive best (measured: equal)
    assert best <= round_robin - 0.02, got  # room that round-robin leaves on this profile
    for k, v in MEASURED.items():
        assert abs(got[k] - v) <= MARGIN, f"{k}: {got[k]:.3f}, measured {v} (all: {got})"
