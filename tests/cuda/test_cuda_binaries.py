"""Runs every CUDA test binary (build/bin/test_cuda_*, built from tests/cuda/*.cu
whenever nvcc exists) on a usable GPU, that is one `nvidia-smi -L` lists. Without
a GPU each built binary must still start and report that it found no device
(exit 77), and the test is skipped with that reason; without nvcc nothing is
built and the test is skipped saying so. tests/cuda/run.sh builds and runs the
same binaries on a GPU machine that lacks numoe's other build dependencies."""
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, assert_clean, gpus, run

SOURCES = sorted((ROOT / "tests" / "cuda").glob("test_cuda_*.cu"))


def nvcc():
    """The compiler the Makefile uses: /usr/local/cuda/bin/nvcc, else nvcc on PATH."""
    p = Path("/usr/local/cuda/bin/nvcc")
    return str(p) if p.exists() else shutil.which("nvcc")


def test_cuda_sources_exist():
    assert SOURCES, "tests/cuda has no test_cuda_*.cu"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_cuda_binary(src):
    exe = ROOT / "build" / "bin" / src.stem
    if not exe.exists():
        if nvcc():
            pytest.fail(f"{exe} is not built although nvcc exists ({nvcc()}): run `make`")
        pytest.skip(f"no nvcc: {src.name} not built (tests/cuda/run.sh builds and runs it on a GPU machine)")
    proc = run([exe], cwd=ROOT, timeout=600)
    assert_clean(proc)
    if not gpus():
        assert proc.returncode == 77 and "no CUDA device" in proc.stdout, (proc.returncode, proc.stdout[-2000:])
        pytest.skip(f"no GPU (nvidia-smi -L lists none): {exe.name} built, started, found no device; "
                    "tests/cuda/run.sh runs it on a GPU machine")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    last = [x for x in proc.stdout.splitlines() if x.startswith(f"{src.stem}: ")][-1]
    passed, failed = (int(w) for w in last.split(": ", 1)[1].replace(" passed,", "").replace(" failed", "").split())
    assert passed > 0 and failed == 0, last
    assert "FAIL" not in proc.stderr, proc.stderr[-4000:]
