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

MODEL = ROOT / "tests" / "fixtures" / "models" / "deepseek-v3-tiny-Q8_0-mla.gguf"
STATS = re.compile(r"\[prompt (\d+) tokens \((\d+) new\)")


class Tty:
    def __init__(self, argv):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=sanitizer_env(),
                                     close_fds=True)
        os.close(slave)
        self.buf = ""

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
                self.buf += data.decode("utf-8", "replace")
        out, self.buf = self.buf, ""
        return out

    def send(self, text):
        os.write(self.master, text.encode())

    def close(self):
        os.close(self.master)
        return self.proc.wait(timeout=30)


@pytest.mark.parametrize("tree", ["build", "build-asan"])
def test_chat_through_a_terminal(tree):
    exe = ROOT / tree / "bin" / "numoe"
    if not exe.exists():
        pytest.skip(f"{exe} not built")
    t = Tty([str(exe), "chat", "-m", str(MODEL), "-n", "6", "--temp", "0", "-t", "2"])
    t.read_until(r"> $")
    t.send("What is the answer\nto this two-line question?\n")
    time.sleep(0.5)
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
