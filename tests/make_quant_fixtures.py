#!/usr/bin/env python3
"""make_quant_fixtures.py - dequantisation fixtures for numoe's quant formats.

Regenerate (from the repository root; deterministic, the output is identical on
every run with the same gguf/numpy):

    python3 tests/make_quant_fixtures.py
    python3 tests/make_quant_fixtures.py --check   # regenerate in memory, compare with the stored files

Writes tests/fixtures/quant/<TYPE>.bin for F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1
Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K, and tests/fixtures/quant/manifest.json
describing them. Each .bin is the blocks (n_blocks * type_size bytes) followed
by the expected dequantised row (n_blocks * block_size little-endian float32).
The blocks are
  (a) `random_blocks` blocks: random bytes with valid scales - every fp16
      d/dmin/m finite, magnitude log-uniform in [2^-20, 2^-2] (so fp16
      subnormals occur), random sign; for F32/F16/BF16 random bit patterns
      after a fixed list of special ones (zeros, infinities, NaNs,
      subnormals, extremes); then
  (b) `quantized_blocks` blocks: the gguf package's own quantisers applied to
      N(0,1) data with a zero block and a constant block, for the types gguf
      can quantise (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 BF16).
The expected output is gguf-py's numpy dequantize (gguf.quants.dequantize),
except for Q8_K, which gguf-py lacks: there it is float32(d) * float32(q),
ggml's dequantize_row_q8_K, computed with numpy.

tests/test_quant_fixtures.py imports TYPES and random_blocks from here, so
this module needs only numpy at import time.
"""
import argparse
import json
import pathlib
import sys

import numpy as np

SEED = 20240611
OUT = pathlib.Path(__file__).resolve().parent / "fixtures" / "quant"

# name: (ggml id, elements per block, bytes per block)
TYPES = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "BF16": (30, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84),
    "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "Q8_K": (15, 256, 292),
}

# Byte offsets of each format's fp16 scale fields (ggml-common.h block structs).
FP16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}

GGUF_QUANTIZERS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16")

# blocks of kind (a) and (b) per type; fixtures stay ~120 KB in all
COUNTS = {"F32": (256, 0), "F16": (1024, 0), "BF16": (512, 512), "Q8_K": (8, 0)}
for _t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
    COUNTS[_t] = (32, 32)
for _t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
    COUNTS[_t] = (8, 0)


def random_scales(rng, n):
    """n realistic float32 scales: |s| log-uniform in [2^-20, 2^-2], random sign."""
    mag = np.exp2(rng.uniform(-20.0, -2.0, n))
    return (mag * rng.choice([-1.0, 1.0], n)).astype(np.float32)


# Bit patterns every float fixture starts with: +-0, +-inf, quiet and
# signalling NaNs, smallest and largest subnormal, smallest normal, largest.
SPECIALS = {
    "F32": (0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF,
            0x00000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF),
    "F16": (0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF, 0x0001, 0x03FF, 0x0400, 0x7BFF),
    "BF16": (0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF, 0x0001, 0x007F, 0x0080, 0x7F7F),
}


def random_blocks(name, n_blocks, rng):
    """n_blocks valid random blocks of type `name` as a flat uint8 array."""
    _, _, type_size = TYPES[name]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    if name in SPECIALS:
        special = np.array(SPECIALS[name], dtype="<u4" if type_size == 4 else "<u2")[:n_blocks]
        blocks[:special.size] = special.view(np.uint8).reshape(-1, type_size)
    for off in FP16_FIELDS.get(name, ()):
        blocks[:, off:off + 2] = random_scales(rng, n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if name == "Q8_K":  # float d; bsums consistent with the quants
        blocks[:, 0:4] = random_scales(rng, n_blocks).view(np.uint8).reshape(n_blocks, 4)
        qs = blocks[:, 4:260].view(np.int8).astype(np.int16)
        blocks[:, 260:292] = qs.reshape(n_blocks, 16, 16).sum(axis=2).astype("<i2").view(np.uint8)
    return blocks.reshape(-1)


def gauss_rows(rng, n_blocks, block_size):
    """N(0,1) data for the gguf quantisers, with one all-zero and one constant block."""
    x = rng.standard_normal((n_blocks, block_size)).astype(np.float32)
    if n_blocks >= 2 and block_size > 1:
        x[0] = 0.0
        x[1] = 0.75
    return x.reshape(-1)


def reference_dequantize(name, data):
    """Expected float32 output: gguf-py's dequantize (numpy for Q8_K)."""
    import gguf

    if name == "Q8_K":
        b = data.reshape(-1, 292)
        d = b[:, 0:4].copy().view(np.float32)
        q = b[:, 4:260].view(np.int8).astype(np.float32)
        return (d * q).reshape(-1)
    out = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name])
    return np.ascontiguousarray(out, dtype=np.float32).reshape(-1)


def gguf_quantize(name, x):
    import gguf

    return np.asarray(gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])).view(np.uint8).reshape(-1)


def build():
    """{file name: bytes} of every fixture and the manifest, deterministic."""
    rng = np.random.default_rng(SEED)
    manifest = {
        "command": "python3 tests/make_quant_fixtures.py",
        "seed": SEED,
        "layout": "blocks (n_blocks*type_size bytes) then expected float32 (n_blocks*block_size, little-endian)",
        "types": {},
    }
    files = {}
    for name, (type_id, block_size, type_size) in TYPES.items():
        n_rand, n_quant = COUNTS[name]
        parts = [random_blocks(name, n_rand, rng)]
        if n_quant:
            q = gguf_quantize(name, gauss_rows(rng, n_quant, block_size))
            if q.size != n_quant * type_size:
                raise SystemExit(f"{name}: gguf quantised {n_quant} blocks into {q.size} bytes, "
                                 f"not {n_quant * type_size}")
            parts.append(q)
        data = np.concatenate(parts)
        expected = reference_dequantize(name, data).astype("<f4")
        n_blocks = n_rand + n_quant
        if data.size != n_blocks * type_size or expected.size != n_blocks * block_size:
            raise SystemExit(f"{name}: {data.size} bytes / {expected.size} values for {n_blocks} blocks")
        files[f"{name}.bin"] = data.tobytes() + expected.tobytes()
        manifest["types"][name] = {
            "id": type_id,
            "block_size": block_size,
            "type_size": type_size,
            "random_blocks": n_rand,
            "quantized_blocks": n_quant,
            "expected": "numpy d*q (gguf-py has no Q8_K)" if name == "Q8_K" else "gguf.quants.dequantize",
        }
    files["manifest.json"] = (json.dumps(manifest, indent=1) + "\n").encode()
    return files


def check(out=OUT):
    """Names of the stored files that differ from (or are missing against) build()."""
    want = build()
    have = {p.name for p in out.iterdir()} if out.is_dir() else set()
    bad = sorted(n for n in want if n not in have or (out / n).read_bytes() != want[n])
    return bad + sorted(have - set(want))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the stored fixtures instead of writing them")
    args = ap.parse_args()
    if args.check:
        bad = check()
        print(f"{len(TYPES)} fixtures regenerated, {len(bad)} differ from {OUT}{': ' + ', '.join(bad) if bad else ''}")
        return 1 if bad else 0
    OUT.mkdir(parents=True, exist_ok=True)
    total = 0
    for n, blob in build().items():
        if (OUT / n).write_bytes(blob) != len(blob):
            raise SystemExit(f"{OUT / n}: short write")
        total += len(blob)
    print(f"wrote {len(TYPES)} fixtures and the manifest, {total} bytes, to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
