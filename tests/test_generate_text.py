"""`numoe generate --prompt`: text goes through the model's tokenizer exactly as
`numoe tokenize` does, continues exactly as the token-id path, and --stop
ends the output before the stop string."""
from conftest import ROOT, assert_clean, run

MODEL = ROOT / "tests" / "fixtures" / "models" / "deepseek-v3-tiny-F32-mla.gguf"
TEXT = "The engine reads the weights of the model."


def test_prompt_equals_token_path(numoe):
    ids = run([numoe, "tokenize", "-m", MODEL, "--ids", "--special", "-q", TEXT])
    assert_clean(ids)
    assert ids.returncode == 0, ids.stderr
    assert len(ids.stdout.strip().split(",")) > 5, ids.stdout  # BOS and the text's tokens
    a = run([numoe, "generate", "-m", MODEL, "--prompt", TEXT, "--print-ids", "--ignore-eos", "-n", "16"])
    b = run([numoe, "generate", "-m", MODEL, "--tokens", ids.stdout.strip(), "-n", "16"])
    for p in (a, b):
        assert_clean(p)
        assert p.returncode == 0, p.stderr
    assert a.stdout == b.stdout and len(a.stdout.split(",")) == 16


def test_stop_string(numoe):
    full = run([numoe, "generate", "-m", MODEL, "--prompt", TEXT, "--ignore-eos", "-n", "40"])
    assert_clean(full)
    assert full.returncode == 0, full.stderr
    text = full.stdout.rstrip("\n")
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip() and "\ufffd" not in stop
    cut = run([numoe, "generate", "-m", MODEL, "--prompt", TEXT, "--ignore-eos", "-n", "40", "--stop", stop])
    assert_clean(cut)
    assert cut.returncode == 0, cut.stderr
    assert cut.stdout.rstrip("\n") == text[: text.index(stop)]


def test_prompt_errors(numoe):
    p = run([numoe, "generate", "-m", MODEL, "--prompt", "x", "--tokens", "1"])
    assert_clean(p)
    assert p.returncode == 2 and "exactly one of --tokens and --prompt" in p.stderr, p.stderr
