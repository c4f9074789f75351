"""The README's two commands on a machine that has none of numoe's packages.

A fresh machine has no ZeroMQ, protobuf-c, hwloc, ... so pkg-config finds
nothing. `make demo` and `make test` must still reach the install step
(tests/setup.sh) before anything needs those packages; an early parse-time
check once stopped both before they installed anything (issue 11). Here
pkg-config is replaced by one that finds nothing and the install step by a
stub that records that it ran and then fails, so nothing is built or
installed. A run on a real fresh machine is the proof of the whole path; this test keeps the path from breaking."""
import os
import re
import stat
import subprocess

import pytest

from conftest import ROOT


def readme_commands():
    """The code block after the README heading that names 'two commands'."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^#+ .*[Tt]wo commands.*?^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    assert m, "README.md has no code block after a heading naming 'two commands'"
    return [re.sub(r"\s+#.*$", "", line).strip() for line in m.group(1).splitlines() if line.strip()]


def test_readme_names_make_demo_and_make_test():
    assert readme_commands() == ["make demo", "make test"]


@pytest.fixture
def no_packages(tmp_path):
    """PATH with a pkg-config that finds nothing, and a setup stub that leaves a mark."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "pkg-config"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    mark = tmp_path / "setup-ran"
    stub = tmp_path / "setup.sh"
    stub.write_text(f"#!/bin/sh\necho setup-stub-ran > {mark}\nexit 7\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    env.pop("MAKEFLAGS", None)
    env.pop("MAKELEVEL", None)
    return env, stub, mark


@pytest.mark.parametrize("goal", ["demo", "test"])
def test_readme_command_reaches_install_step(goal, no_packages):
    env, stub, mark = no_packages
    p = subprocess.run(["make", "-C", str(ROOT), goal, f"SETUP={stub}"], env=env,
                       capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert "pkg-config cannot find" not in out, out
    assert mark.read_text().strip() == "setup-stub-ran", f"make {goal} did not run the install step first:\n{out}"
    # the stub failed, so make must stop there with its status, having built nothing
    assert p.returncode != 0, out
    assert re.search(r"deps\] Error 7", out), out


def test_direct_build_names_the_fix(no_packages):
    """`make` alone (no install step) stops with a message that says what to run."""
    env, stub, mark = no_packages
    p = subprocess.run(["make", "-C", str(ROOT), "-n", "all", f"SETUP={stub}"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "pkg-config cannot find all of" in p.stderr and "make deps" in p.stderr, p.stderr
    assert not mark.exists()
