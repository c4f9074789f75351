"""numoe's C (de)quantisers against gguf-py, through ctypes.

Loads $NUMOE_BUILD/lib/libnumoe_kernels.so (NUMOE_BUILD defaults to build/,
relative to the repository root) and checks
  - nm_dequantize_row reproduces the stored expected output of
    tests/fixtures/quant (see tests/make_quant_fixtures.py) bit for bit, NaNs
    matched as NaNs and every other value by its bits (so -0 != +0);
  - the same against gguf-py's dequantize
    computed now on fresh random valid blocks (seed printed on failure;
    NUMOE_TEST_SEED fixes it), nm_quantize_row's bytes equal gguf-py's
    quantisers (Q8_0 - ggml's quantize_row_q8_0_ref - and Q4_0 Q4_1 Q5_0 Q5_1
    BF16 F16), and numoe's type names and sizes equal gguf's
    GGML_QUANT_SIZES (ids below 40; Q8_1 at ggml's 36 bytes).
"""
import ctypes
import json
import os
import pathlib
import secrets

import gguf  # tests/setup.sh installs it: without it these checks must fail, not pass
import numpy as np
import pytest

import make_quant_fixtures
from make_quant_fixtures import TYPES, random_blocks

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "quant"


class Traits(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("block_size", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("can_dequantize", ctypes.c_int), ("can_quantize", ctypes.c_int), ("vec_dot_type", ctypes.c_int)]


@pytest.fixture(scope="module")
def lib():
    path = ROOT / os.environ.get("NUMOE_BUILD", "build") / "lib" / "libnumoe_kernels.so"
    if not path.exists():
        pytest.fail(f"{path} is not built: run `make` (or set NUMOE_BUILD)")
    so = ctypes.CDLL(str(path))
    so.nm_dequantize_row.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    so.nm_dequantize_row.restype = ctypes.c_int
    so.nm_quantize_row.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    so.nm_quantize_row.restype = ctypes.c_int
    so.nm_type_traits_of.argtypes = [ctypes.c_int]
    so.nm_type_traits_of.restype = ctypes.POINTER(Traits)
    return so


@pytest.fixture(scope="module")
def seed():
    return int(os.environ.get("NUMOE_TEST_SEED", secrets.randbits(32)))


def dequantize(lib, name, data):
    type_id, block_size, type_size = TYPES[name]
    data = np.ascontiguousarray(data, dtype=np.uint8)
    n = data.size // type_size * block_size
    out = np.empty(n, dtype=np.float32)
    assert lib.nm_dequantize_row(type_id, data.ctypes.data, out.ctypes.data, n) == 0
    return out


def quantize(lib, name, x):
    type_id, block_size, type_size = TYPES[name]
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.size // block_size * type_size, dtype=np.uint8)
    assert lib.nm_quantize_row(type_id, x.ctypes.data, out.ctypes.data, x.size) == 0
    return out


def assert_bit_equal(got, want, what):
    """Equal as floats with NaN == NaN, and equal in bits where not NaN."""
    assert got.shape == want.shape, what
    assert np.array_equal(got, want, equal_nan=True), f"{what}: first differences at {np.flatnonzero(got != want)[:8]}"
    keep = ~np.isnan(want)
    bad = np.flatnonzero(got.view(np.uint32)[keep] != want.view(np.uint32)[keep])
    assert bad.size == 0, f"{what}: {bad.size} values differ in bits (signed zeros?), first {bad[:8]}"


def test_manifest_lists_every_type():
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    assert sorted(manifest["types"]) == sorted(TYPES)
    total = sum(p.stat().st_size for p in FIXTURES.iterdir())
    assert total < 300_000, f"fixtures grew to {total} bytes"


def test_fixtures_regenerate_identically(tmp_path):
    """The stored blocks and expected rows are what make_quant_fixtures.py makes now (gguf-py's
    quantisers and dequantize), byte for byte; and the comparison notices a changed byte."""
    assert make_quant_fixtures.check() == []
    for p in FIXTURES.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    blob = bytearray((tmp_path / "Q4_1.bin").read_bytes())
    blob[-1] ^= 1  # the last expected float
    (tmp_path / "Q4_1.bin").write_bytes(bytes(blob))
    assert make_quant_fixtures.check(tmp_path) == ["Q4_1.bin"]


@pytest.mark.parametrize("name", list(TYPES))
def test_fixture_dequantize_bit_exact(lib, name):
    info = json.loads((FIXTURES / "manifest.json").read_text())["types"][name]
    type_id, block_size, type_size = TYPES[name]
    assert (info["id"], info["block_size"], info["type_size"]) == (type_id, block_size, type_size)
    n_blocks = info["random_blocks"] + info["quantized_blocks"]
    blob = (FIXTURES / f"{name}.bin").read_bytes()
    assert len(blob) == n_blocks * (type_size + 4 * block_size)
    data = np.frombuffer(blob, dtype=np.uint8, count=n_blocks * type_size)
    want = np.frombuffer(blob, dtype="<f4", offset=n_blocks * type_size)
    assert_bit_equal(dequantize(lib, name, data), want, f"{name} fixture")


@pytest.mark.parametrize("name", [t for t in TYPES if t != "Q8_K"])  # gguf-py has no Q8_K
def test_live_dequantize_vs_gguf(lib, seed, name):
    rng = np.random.default_rng(seed)
    n_blocks = 4096 // TYPES[name][1] if TYPES[name][1] > 1 else 4096
    data = random_blocks(name, n_blocks, rng)
    want = np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name]), dtype=np.float32).reshape(-1)
    assert_bit_equal(dequantize(lib, name, data), want, f"{name}, seed {seed}")


def quantizer_inputs(rng):
    """Rows to quantise: N(0,1), a dynamic range from fp16 underflow to
    overflow, small integers (rounding ties), an all-zero and a constant
    block, one block with a lone outlier."""
    n = 64 * 32
    rows = [rng.standard_normal(n), rng.standard_normal(n) * np.exp2(rng.uniform(-30, 17, n)),
            rng.integers(-40, 40, n) / 4.0, np.zeros(n), np.full(n, -1.25)]
    spike = rng.standard_normal(n) * 1e-3
    spike[::32] = 50.0
    rows.append(spike)
    return [np.asarray(r, dtype=np.float32) for r in rows]


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16"])
def test_quantize_bytes_equal_gguf(lib, seed, name):
    rng = np.random.default_rng(seed)
    for i, x in enumerate(quantizer_inputs(rng)):
        with np.errstate(over="ignore"):  # the wide row overflows fp16 on purpose
            want = np.asarray(gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])).view(np.uint8).reshape(-1)
        got = quantize(lib, name, x)
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, f"{name} row {i}, seed {seed}: {bad.size} bytes differ, first at {bad[:8]}"


def test_type_sizes_equal_gguf(lib):
    for qt, (block_size, type_size) in gguf.GGML_QUANT_SIZES.items():
        if qt.value >= 40:
            continue  # beyond NM_TYPE_COUNT: newer than numoe's table
        if qt.name == "Q8_1":
            block_size, type_size = 32, 36  # gguf-py keeps an outdated 40; ggml's block_q8_1 is 2 halves + 32
        t = lib.nm_type_traits_of(qt.value)
        assert t, f"{qt.name} ({qt.value}) unknown to numoe"
        t = t.contents
        assert (t.name.decode(), t.block_size, t.type_size) == (qt.name, block_size, type_size)
