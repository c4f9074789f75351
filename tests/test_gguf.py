"""GGUF reader through `numoe inspect`: every value type, v2 and v3,
alignment, split models, and a corpus of hostile files (each must give a
clear error naming the file and the field, never a crash)."""
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from conftest import ROOT, assert_clean, run  # noqa: E402
import gguf_mutate  # noqa: E402

Q = gguf.GGMLQuantizationType


def raw_blocks(qtype, rows, cols, rng):
    """Random bytes for a quantised tensor with finite fp16 scales, via the
    gguf package's own quantiser where it has one."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    return gguf.quants.quantize(x, qtype)


def write_all_types(path, alignment=None, version=3, split_max_tensors=0):
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(path), "deepseek2", split_max_tensors=split_max_tensors)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 0.15625)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo\nworld")
    w.add_uint64("test.u64", 1 << 60)
    w.add_int64("test.i64", -(1 << 60))
    w.add_float64("test.f64", 2.5e-300)
    w.add_array("test.arr_i32", [1, -2, 3])
    w.add_array("test.arr_f32", [0.5, 1.5])
    w.add_array("test.arr_str", ["a", "", "日本語", "<｜begin▁of▁sentence｜>"])
    w.add_block_count(3)
    w.add_embedding_length(256)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "Ġc"])
    w.add_bos_token_id(1)
    w.add_tensor("f32.weight", rng.standard_normal((3, 8)).astype(np.float32))
    w.add_tensor("f16.weight", rng.standard_normal((2, 16)).astype(np.float16))
    q8 = raw_blocks(Q.Q8_0, 2, 64, rng)
    w.add_tensor("q8.weight", q8, raw_shape=q8.shape, raw_dtype=Q.Q8_0)
    w.add_tensor("blk.1.ffn_up_exps.weight", rng.standard_normal((4, 2, 32)).astype(np.float32))
    w.add_tensor("blk.1.ffn_down_exps.weight", rng.standard_normal((4, 32, 2)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if version != 3:
        b = bytearray(Path(path).read_bytes())
        b[4:8] = version.to_bytes(4, "little")
        Path(path).write_bytes(bytes(b))


def tensor_table(out):
    """(name, type, shape, bytes) rows of the inspect table."""
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s+\d+\s+(\S+)\s+(\S+)\s+(\[[^\]]*\])\s+(\d+)", line)
        if m:
            rows.append(m.groups())
    return rows


def test_all_value_types(numoe, tmp_path):
    p = tmp_path / "all.gguf"
    write_all_types(p)
    proc = run([numoe, "inspect", p, "--keys"])
    assert_clean(proc)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for key, val in [("test.u8", "200"), ("test.i8", "-100"), ("test.u16", "60000"), ("test.i16", "-30000"),
                     ("test.u32", "4000000000"), ("test.i32", "-2000000000"), ("test.f32", "0.15625"),
                     ("test.bool", "true"), ("test.string", '"héllo\\nworld"'), ("test.u64", str(1 << 60)),
                     ("test.i64", str(-(1 << 60))), ("test.f64", "2.5e-300"),
                     ("test.arr_i32", "[3 x i32] [1, -2, 3]"), ("test.arr_f32", "[2 x f32] [0.5, 1.5]"),
                     ("test.arr_str", '[4 x string] ["a", "", "日本語", "<｜begin▁of▁sentence｜>"]')]:
        assert re.search(re.escape(key) + r"\s+= " + re.escape(val), out), (key, val, out)
    assert "GGUF v3" in out
    rows = tensor_table(out)
    assert ("f32.weight", "F32", "[8, 3]", str(8 * 3 * 4)) in rows
    assert ("f16.weight", "F16", "[16, 2]", str(16 * 2 * 2)) in rows
    assert ("q8.weight", "Q8_0", "[64, 2]", str(2 * 2 * 34)) in rows
    assert ("blk.1.ffn_up_exps.weight", "F32", "[32, 2, 4]", str(32 * 2 * 4 * 4)) in rows
    # routed experts are the two *_exps tensors
    routed = 2 * 32 * 2 * 4 * 4
    assert re.search(rf"routed experts :\s+{routed} bytes", out), out
    assert "model gpt2" in out and "3 tokens" in out and 'bos      1 "b"' in out


def test_version2_and_alignment(numoe, tmp_path):
    p = tmp_path / "v2.gguf"
    write_all_types(p, version=2, alignment=64)
    proc = run([numoe, "inspect", p])
    assert_clean(proc)
    assert proc.returncode == 0, proc.stderr
    assert "GGUF v2, alignment 64" in proc.stdout
    # the gguf package agrees on where every tensor starts
    r = gguf.GGUFReader(str(p))
    assert all(t.data_offset % 64 == 0 for t in r.tensors)


def test_bad_alignment(numoe, tmp_path):
    p = tmp_path / "a.gguf"
    write_all_types(p, alignment=64)
    b = bytearray(p.read_bytes())
    at = b.index(b"general.alignment") + len("general.alignment") + 4  # skip the u32 type
    assert int.from_bytes(b[at:at + 4], "little") == 64
    b[at:at + 4] = (48).to_bytes(4, "little")
    p.write_bytes(bytes(b))
    proc = run([numoe, "inspect", p])
    assert_clean(proc)
    assert proc.returncode == 1 and "general.alignment must be a non-zero power of two" in proc.stderr


def test_split_model(numoe, tmp_path):
    whole = tmp_path / "whole.gguf"
    write_all_types(whole)
    split = tmp_path / "m.gguf"
    write_all_types(split, split_max_tensors=2)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(parts) == 3, parts
    a = run([numoe, "inspect", whole])
    b = run([numoe, "inspect", parts[0]])
    assert_clean(a), assert_clean(b)
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    assert "(+2 more parts)" in b.stdout
    assert tensor_table(a.stdout) == tensor_table(b.stdout)
    tot = lambda s: re.search(r"total\s+:\s+(\d+)", s).group(1)  # noqa: E731
    assert tot(a.stdout) == tot(b.stdout)
    # not the first part
    c = run([numoe, "inspect", parts[1]])
    assert c.returncode == 1 and "open the first part" in c.stderr, c.stderr
    # a missing part names the file it looked for
    parts[2].unlink()
    d = run([numoe, "inspect", parts[0]])
    assert_clean(d)
    assert d.returncode == 1 and "m-00003-of-00003.gguf: cannot open" in d.stderr, d.stderr
    # a part from another split set
    write_all_types(tmp_path / "m.gguf", split_max_tensors=2)
    other = tmp_path / "o"
    other.mkdir()
    write_all_types(other / "m.gguf", split_max_tensors=3)
    shutil.copy(sorted(other.glob("m-00002-*"))[0], tmp_path / "m-00002-of-00003.gguf")
    e = run([numoe, "inspect", parts[0]])
    assert_clean(e)
    assert e.returncode == 1 and "parts from different models" in e.stderr, e.stderr


def test_missing_and_not_gguf(numoe, tmp_path):
    proc = run([numoe, "inspect", tmp_path / "nope.gguf"])
    assert proc.returncode == 1 and "nope.gguf: cannot open" in proc.stderr
    txt = tmp_path / "x.gguf"
    txt.write_text("hello world, this is not a model")
    proc = run([numoe, "inspect", txt])
    assert proc.returncode == 1 and "x.gguf: not a GGUF file" in proc.stderr
    proc = run([numoe, "inspect"])
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_hostile_corpus(tmp_path):
    """Every mutation: exit 0 or 1 (1 with a one-line error naming the file),
    no sanitizer report. Runs the ASan build when there is one."""
    exe = ROOT / "build-asan" / "bin" / "numoe"
    if not exe.exists():
        exe = ROOT / "build" / "bin" / "numoe"
    base = tmp_path / "base.gguf"
    write_all_types(base)
    failures = []
    for name, data, expect in gguf_mutate.mutations(base.read_bytes()):
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(data)
        proc = run([exe, "inspect", p, "--keys"], timeout=60)
        assert_clean(proc)
        if expect is None:
            ok = proc.returncode in (0, 1)
        else:
            ok = proc.returncode == 1 and f"{name}.gguf" in proc.stderr and expect in proc.stderr
        if not ok:
            failures.append((name, proc.returncode, proc.stderr.strip()[-300:]))
        p.unlink()
    assert not failures, failures


def test_fuzz_smoke(tmp_path):
    """libFuzzer over the seed corpus plus a short mutation run (CI smoke)."""
    fuzz = ROOT / "build" / "fuzz" / "fuzz_gguf"
    if not fuzz.exists():
        pytest.fail("build/fuzz/fuzz_gguf not built: run `make fuzz`")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    base = tmp_path / "base.gguf"
    write_all_types(base)
    shutil.copy(base, corpus / "base.gguf")
    for name, data, _ in gguf_mutate.mutations(base.read_bytes(), n_random=40):
        (corpus / f"{name}.gguf").write_bytes(data)
    proc = subprocess.run([str(fuzz), "-max_total_time=30", "-max_len=8192", "-timeout=10", "-rss_limit_mb=2048",
                           str(corpus)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done" in proc.stderr


def split_copy(src, dst, max_tensors):
    """Rewrites a GGUF as a split model (gguf-py names the parts like
    llama.cpp's gguf-split: dst-0000k-of-0000N.gguf)."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents(), split_max_tensors=max_tensors)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), vt)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_split_fixture_model(numoe, tmp_path):
    """A fixture model split in three parts inspects and runs exactly as the whole file."""
    src = ROOT / "tests" / "fixtures" / "models" / "deepseek-v3-tiny-Q8_0-mla.gguf"
    split_copy(src, tmp_path / "m.gguf", 20)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(parts) == 3, parts
    a, b = run([numoe, "inspect", src]), run([numoe, "inspect", parts[0]])
    assert_clean(b)
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    assert tensor_table(a.stdout) == tensor_table(b.stdout) and len(tensor_table(a.stdout)) > 40
    gen = ["generate", "--tokens", "0,17,200,45", "-n", "12"]
    a, b = run([numoe, *gen, "-m", src]), run([numoe, *gen, "-m", parts[0]])
    assert_clean(b)
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    assert a.stdout == b.stdout and len(a.stdout.split(",")) == 12
