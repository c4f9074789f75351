"""The stored chat-template fixture is transformers' rendering of the current inputs.

tests/fixtures/chat/deepseek_chat.json holds transformers' apply_chat_template output
(tests/make_chat_fixtures.py) for every conversation; tests/unit/test_chat_template.c (run by
test_unit_binaries.py) compares numoe's C renderings with it byte for byte, in every run. Here:
  * always: the fixture holds exactly the cases make_chat_fixtures.py defines today (names,
    messages, BOS/EOS texts, flags, order) and was rendered from today's templates (the
    fixture GGUFs' tokenizer.chat_template, recorded by sha256), so a changed conversation or
    template cannot leave a stale reference behind: regenerate it with transformers;
  * where transformers is installed: make_chat_fixtures.py --check renders every case again
    and compares (CI has no transformers; this skip is printed at the end of the run)."""
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import make_chat_fixtures as mcf  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "chat" / "deepseek_chat.json"


def stored():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_fixture_shape():
    d = stored()
    names = {c["name"] for c in d["cases"]}
    for fmt in ("deepseek3", "deepseek2"):
        for case in ("single_user", "system_user", "multi_turn", "multi_turn_system", "non_ascii"):
            assert f"{fmt}/{case}" in names
    assert any(c["force_think"] for c in d["cases"])
    assert {c["add_generation_prompt"] for c in d["cases"]} == {False, True}
    assert all(isinstance(c["expected"], str) and c["expected"].startswith(c["bos"]) for c in d["cases"])


def test_fixture_inputs_current():
    pytest.importorskip("gguf")  # the templates are read from the fixture GGUFs
    d = stored()
    tmpls = mcf.templates()
    for fmt, tmpl in tmpls.items():
        assert d["sources"][fmt]["template_sha256"] == mcf.template_sha256(tmpl), \
            f"{fmt}: the template changed since the fixture was rendered: run tests/make_chat_fixtures.py"
    want = [case for _, _, case in mcf.case_specs()]
    got = [{k: v for k, v in c.items() if k != "expected"} for c in d["cases"]]
    assert got == want, "the fixture's cases differ from make_chat_fixtures.py's: regenerate it"
    # force_think cases are their plain case with KTransformers' "<think>\n" appended
    plain = {(c["name"], c["add_generation_prompt"]): c["expected"] for c in d["cases"] if not c["force_think"]}
    for c in d["cases"]:
        if c["force_think"]:
            base = c["name"].removesuffix("/force_think")
            assert c["expected"] == plain[(base, c["add_generation_prompt"])] + "<think>\n", c["name"]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers not installed: the stored renderings stand in for it "
                           "(test_fixture_inputs_current checks they belong to today's inputs)")
def test_fixture_matches_transformers():
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "make_chat_fixtures.py"), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "0 differ" in proc.stdout, proc.stdout
