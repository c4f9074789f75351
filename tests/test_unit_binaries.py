"""Runs every C unit-test binary (tests/unit/test_*.c) from every build tree,
so the same tests run optimised and under ASan/UBSan."""
import pytest

from conftest import ROOT, assert_clean, run

UNIT = sorted(p.stem for p in (ROOT / "tests" / "unit").glob("test_*.c"))


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
    assert " 0 failed" in proc.stdout
