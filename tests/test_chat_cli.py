"""`numoe chat` driven through a pseudo-terminal, as a person would use it:
a two-line message gives one answer (KTransformers' local_chat would answer
the first line alone), the conversation is kept between turns, /reset clears
it, /exit leaves."""
import os
import pty
import re
import select
import subprocess
import time

import pytest

from conftest import ROOT, sanitizer_env

SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer")

MODEL = ROOT / "tests" / "fixtures" / "models" / "deepseek-v3-tiny-Q8_0-mla.gguf"
STATS = re.compile(r"\[prompt (\d+) tokens \((\d+) new\)")


class Tty:
    def __init__(self, argv):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=sanitizer_env(),
                                     close_fds=True)
        os.close(slave)
        self.buf = ""
        self.log = ""  # everything the terminal showed, for the sanitizer check at the end

    def read_until(self, pattern, timeout=60):
        end = time.time() + timeout
        while not re.search(pattern, self.buf):
            left = end - time.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; got:\n{self.buf[-2000:]}")
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"program ended waiting for {pattern!r}; got:\n{self.buf[-2000:]}")
                text = data.decode("utf-8", "replace")
                self.buf += text
                self.log += text
        out, self.buf = self.buf, ""
        return out

    def send(self, text):
        os.write(self.master, text.encode())

    def close(self):
        """Exit status; the rest of the output is read first (a sanitizer report comes at exit)."""
        rc = self.proc.wait(timeout=30)
        while select.select([self.master], [], [], 0)[0]:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                break
            if not data:
                break
            self.log += data.decode("utf-8", "replace")
        os.close(self.master)
        for marker in SANITIZER_MARKERS:
            assert marker not in self.log, self.log[-3000:]
        return rc


@pytest.mark.parametrize("tree", ["build", "build-asan"])
def test_chat_through_a_terminal(tree):
    exe = ROOT / tree / "bin" / "numoe"
    if not exe.exists():
        if tree == "build":
            pytest.fail(f"{exe} not built: run `make`")
        pytest.skip("no sanitizer build")
    t = Tty([str(exe), "chat", "-m", str(MODEL), "-n", "6", "--temp", "0", "-t", "2"])
    t.read_until(r"> $")
    t.send("What is the answer\nto this two-line question?\n")
    t.read_until(r"two-line question\?\r?\n")  # the terminal's echo: both lines are in before the empty one
    t.send("\n")
    out = t.read_until(r"\n> $")
    turns = STATS.findall(out)
    assert len(turns) == 1, out  # one answer for the two lines
    first_total, first_new = map(int, turns[0])
    assert first_total == first_new

    t.send("And a follow-up.\n\n")
    out = t.read_until(r"\n> $")
    (total, new), = [tuple(map(int, m)) for m in STATS.findall(out)]
    assert total > first_total and new < total  # history kept, its KV reused

    t.send("/reset\n")
    t.read_until(r"conversation reset[\s\S]*> $")
    t.send("And a follow-up.\n\n")
    out = t.read_until(r"\n> $")
    (total2, new2), = [tuple(map(int, m)) for m in STATS.findall(out)]
    assert total2 == new2 and total2 < total  # only this message now

    t.send("/exit\n")
    assert t.close() == 0
