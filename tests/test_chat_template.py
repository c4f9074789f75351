"""The stored chat-template fixture still matches transformers.

tests/unit/test_chat_template.c (run by test_unit_binaries.py) compares numoe's C renderings
with tests/fixtures/chat/deepseek_chat.json; this re-renders that fixture with transformers'
apply_chat_template and the fixture GGUFs' templates, so the fixture cannot drift from what
transformers does. Skipped where transformers is not installed (CI)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "chat" / "deepseek_chat.json"


def test_fixture_shape():
    d = json.loads(FIXTURE.read_text(encoding="utf-8"))
    names = {c["name"] for c in d["cases"]}
    for fmt in ("deepseek3", "deepseek2"):
        for case in ("single_user", "system_user", "multi_turn", "multi_turn_system", "non_ascii"):
            assert f"{fmt}/{case}" in names
    assert any(c["force_think"] for c in d["cases"])
    assert {c["add_generation_prompt"] for c in d["cases"]} == {False, True}


def test_fixture_matches_transformers():
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    pytest.importorskip("gguf")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "make_chat_fixtures.py"), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
