"""Runs every C unit-test binary (tests/unit/test_*.c) from every build tree,
so the same tests run optimised and under ASan/UBSan. Each binary must exit 0,
report exactly as many passed tests as its main() RUN()s, none failed, and
name every one of them as ok: a binary that stops early or runs nothing fails."""
import re

import pytest

from conftest import ROOT, assert_clean, run

UNIT = sorted(p.stem for p in (ROOT / "tests" / "unit").glob("test_*.c"))


def runs_of(name):
    src = (ROOT / "tests" / "unit" / f"{name}.c").read_text(encoding="utf-8")
    return re.findall(r"^\s*RUN\((\w+)\);", src, re.M)


@pytest.mark.parametrize("tree", ["build", "build-asan"])
@pytest.mark.parametrize("name", UNIT)
def test_unit(tree, name):
    exe = ROOT / tree / "bin" / name
    if not exe.exists():
        if tree == "build":
            pytest.fail(f"{exe} not built: run `make`")
        pytest.skip("no sanitizer build")
    proc = run([exe], cwd=ROOT)
    assert_clean(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    tests = runs_of(name)
    assert tests, f"no RUN() in tests/unit/{name}.c"
    assert proc.stdout.splitlines()[-1] == f"{name}: {len(tests)} passed, 0 failed", proc.stdout + proc.stderr[-4000:]
    ok = re.findall(r"^ok   (\w+)$", proc.stderr, re.M)
    assert ok == tests, (ok, tests)
