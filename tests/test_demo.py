"""`make demo`: the README's first command shows the main job on the committed trained model.

Runs `make demo SETUP=true` (the install step skipped: the packages are there when the suite
runs) and checks what a user sees: the greedy continuation of the committed demo model
(tests/fixtures/models/demo-v3-Q8_0.gguf, trained by tests/train_demo.py) exactly, that it is
made of real English words, and the command line that serves the model. "Real words" are words
of the held-out English prose in tests/fixtures/text (documentation the model never trained on);
the random-weight model the demo used to run printed byte soup, which fails that check.
"""
import os
import re
import subprocess

from conftest import ROOT, assert_clean, run

DEMO_MODEL = "tests/fixtures/models/demo-v3-Q8_0.gguf"
PROMPT = "The function returns"
GEN_ARGS = ["--prompt", PROMPT, "-n", "48", "--repeat-penalty", "1.2"]  # as the Makefile's demo target
# what the committed model continues PROMPT with (greedy + repetition penalty, at most 48 tokens)
CONTINUATION = (" a string object, or the object is returned by the object's __getitem__ method. If the class "
                "has an instance of the class name, it will be called with the class attribute.\n\n"
                "If the class is not None,")
HELDOUT = ROOT / "tests" / "fixtures" / "text" / "python-docs-heldout.txt"


def make_demo():
    env = dict(os.environ)
    env.pop("MAKEFLAGS", None)  # under `make test` the outer make's flags must not leak in
    env.pop("MAKELEVEL", None)
    p = subprocess.run(["make", "-C", str(ROOT), "demo", "SETUP=true"], env=env, capture_output=True, text=True,
                       errors="replace", timeout=1200)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout, p.stderr


def test_make_demo_prints_readable_text_and_serve_hint():
    out, err = make_demo()
    assert f"numoe generate --model {DEMO_MODEL} --prompt \"{PROMPT}\" -n 48 --repeat-penalty 1.2" in out, out
    # numoe generate prints the continuation (without the prompt) to stdout, then a newline
    assert CONTINUATION + "\n" in out, f"continuation not found; the demo printed:\n{out}\n{err[-2000:]}"
    words = re.findall(r"[A-Za-z]+", CONTINUATION)
    known = set(re.findall(r"[a-z]+", HELDOUT.read_text().lower()))
    real = [w for w in words if w.lower() in known]
    print(f"\ncontinuation: {CONTINUATION!r}\n{len(real)} of {len(words)} words occur in the held-out prose")
    assert len(words) >= 20 and len(set(w.lower() for w in words)) >= 12, CONTINUATION
    assert len(real) >= 0.9 * len(words), sorted(set(words) - set(real))
    assert f"build/bin/numoe serve -m {DEMO_MODEL} --port 10002" in out, out


def test_continuation_is_the_models(numoe):
    """The text the demo test expects is what numoe makes of PROMPT, from both build trees,
    in-process as well as with the worker the demo starts (so it is not a property of one backend)."""
    for workers in ("0", "1"):
        p = run([numoe, "generate", "--model", ROOT / DEMO_MODEL, *GEN_ARGS, "--workers", workers, "-t", "2"],
                timeout=300)
        assert_clean(p)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout == CONTINUATION + "\n", (workers, p.stdout)
