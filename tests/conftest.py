"""Shared pytest helpers: where the built binaries are.

`make test` builds two trees: build/ (optimised) and build-asan/ (AddressSanitizer
+ UBSan). Tests that run a binary run it from every tree that exists, so each
suite passes under the sanitizers at least once per CI run."""
import os
import pathlib
import shutil
import signal
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD_DIRS = [ROOT / d for d in ("build", "build-asan")]


# A run started in the background of a non-interactive shell (`make test &`, nohup) inherits SIGINT
# and SIGQUIT ignored, and an ignored signal stays ignored across exec: every numoe the tests start
# would then ignore the SIGINT the shutdown tests send it (seen in session 14: the coordinators ran
# on, and the tests after them slowed on a machine full of leftovers). The tests stand for a user at
# a terminal, so their children get the default dispositions back.
for _sig in (signal.SIGINT, signal.SIGQUIT):
    if signal.getsignal(_sig) == signal.SIG_IGN:
        signal.signal(_sig, signal.default_int_handler if _sig == signal.SIGINT else signal.SIG_DFL)


def built(rel):
    """Paths of `rel` (e.g. 'bin/numoe') in every build tree that has it."""
    found = [d / rel for d in BUILD_DIRS if (d / rel).exists()]
    if not found:
        pytest.fail(f"{rel} is not built: run `make` (or `make test`) first")
    return found


def gpus():
    """The GPUs `nvidia-smi -L` lists ([] without nvidia-smi or a driver): where the GPU
    tests (tests/test_gpu_engine.py, tests/cuda/test_cuda_binaries.py) run."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [x for x in out.splitlines() if x.startswith("GPU ")]


def sanitizer_env():
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    return env


def run(cmd, **kw):
    """Runs a command, returns CompletedProcess with text output."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("errors", "replace")
    kw.setdefault("env", sanitizer_env())
    kw.setdefault("timeout", 600)
    return subprocess.run([str(c) for c in cmd], **kw)


def assert_clean(proc):
    """No sanitizer report and no death by signal."""
    out = proc.stdout + proc.stderr
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}\n{out[-3000:]}"
    for marker in ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer"):
        assert marker not in out, out[-3000:]


@pytest.fixture(params=["build", "build-asan"])
def numoe(request):
    path = ROOT / request.param / "bin" / "numoe"
    if not path.exists():
        if request.param == "build":
            pytest.fail("build/bin/numoe is not built: run `make`")
        pytest.skip("no sanitizer build (make BUILD=build-asan SAN=1)")
    return path


# The tiny fixture models the worker tests run (tests/test_workers*.py), the prompt they
# feed, and how close their logits must be to the in-process ones.
FIX_MODELS = ROOT / "tests" / "fixtures" / "models"
WORKER_MODELS = {
    "v2-F32": FIX_MODELS / "deepseek-v2-tiny-F32-legacy.gguf",
    "v2-Q8_0": FIX_MODELS / "deepseek-v2-tiny-Q8_0-legacy.gguf",
    "v3-F32": FIX_MODELS / "deepseek-v3-tiny-F32-mla.gguf",
    "v3-Q8_0": FIX_MODELS / "deepseek-v3-tiny-Q8_0-mla.gguf",
}
WORKER_SEQ = [0, 17, 200, 45, 3, 99, 150, 12, 8, 77, 240, 31, 5, 64, 128, 250, 33, 2, 190, 101]
# Measured (both trees, split and whole-expert placements, 1-3 workers): 0 with one
# worker (same order of additions), <= 3.2e-7 with two split workers (partial dots
# added in another order). 3e-6 is ten times the worst seen.
WORKER_TOL = 3e-6


@pytest.fixture(scope="module", params=["build", "build-asan"])
def exe_and_worker(request):
    """numoe of a build tree that also has numoe-worker."""
    path = ROOT / request.param / "bin" / "numoe"
    if not path.exists() or not (path.parent / "numoe-worker").exists():
        if request.param == "build":
            pytest.fail("build/bin/numoe and build/bin/numoe-worker are not built: run `make`")
        pytest.skip("no sanitizer build of numoe + numoe-worker")
    return path


# ---- what a run did not check, and how close the numeric checks came to their bounds ----

_MEASURED = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def measured(request):
    """record(name, value, bound): keeps the worst value of a bounded figure
    (value <= bound is the pass condition) so the end of the run prints how much
    headroom each tolerance has; the test still asserts the bound itself."""
    table = request.config.stash.setdefault(_MEASURED, {})

    def record(name, value, bound):
        worst = table.get(name)
        table[name] = (max(value, worst[0]) if worst else value, bound)
        return value

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After the test reports and before pytest's own last line: every skip of
    this run counted and grouped by its reason (a skip is a check that did not
    run, so CI must show it), then the measured-vs-bound table."""
    skipped = terminalreporter.stats.get("skipped", [])
    reasons = {}
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons.setdefault(reason, []).append(rep.nodeid)
    terminalreporter.write_line(f"skipped in this run: {len(skipped)}")
    for reason, ids in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        terminalreporter.write_line(f"  {len(ids):4d} x {reason}  (e.g. {ids[0]})")
    table = config.stash.get(_MEASURED, {})
    if table:
        terminalreporter.write_line("measured figures (worst in this run <= bound):")
        for name, (value, bound) in sorted(table.items()):
            terminalreporter.write_line(f"  {name}: {value:.3g} <= {bound:.3g}")
