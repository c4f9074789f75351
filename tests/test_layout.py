"""The source layout keeps its shape (docs/LAYOUT.md): top-level folders
include only lower layers, no include cycle between folders, sub-folders or
modules, and no two files that call each other (tests/layout_graph.py has the
rules). The checker is also run on small made-up trees that break each rule,
so a checker that stopped seeing a cycle would fail here too."""
import pytest

from conftest import ROOT
from layout_graph import violations


def test_repository_layout_has_no_cycles():
    v = violations(ROOT)
    assert not v, "\n".join(v)


def write(root, files):
    for path, text in files.items():
        p = root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


GOOD = {
    "common/a.h": "int nm_a(void);\n",
    "common/a.c": '#include "common/a.h"\nint nm_a(void) {\n    return 1;\n}\n',
    "model/m.h": '#include "common/a.h"\nint nm_m(void);\n',
    "model/m.c": '#include "model/m.h"\nint nm_m(void) {\n    return nm_a();\n}\n',
    "coordinator/x/x.c": '#include "model/m.h"\nstatic int f(void) {\n    return nm_m();\n}\n',
}


def test_checker_accepts_a_layered_tree(tmp_path):
    write(tmp_path, GOOD)
    assert violations(tmp_path) == []


@pytest.mark.parametrize("case,files,expect", [
    ("lower layer includes a higher one", {"common/b.c": '#include "model/m.h"\n'},
     "common/ (layer 0) includes model/ (layer 2): common/b.c includes model/m.h"),
    ("folder cycle between equal layers", {"worker/w.h": "int nm_w(void);\n",
                                          "worker/w.c": '#include "coordinator/x/y.h"\n',
                                          "coordinator/x/y.h": '#include "worker/w.h"\n'},
     "top-level folder include cycle: coordinator -> worker -> coordinator"),
    ("sub-folder cycle", {"coordinator/x/p.h": '#include "coordinator/y/q.h"\n',
                          "coordinator/y/q.h": '#include "coordinator/x/p.h"\n'},
     "folder include cycle: coordinator/x -> coordinator/y -> coordinator/x"),
    ("two files include each other's headers", {"model/p.h": "int nm_p(void);\n",
                                                "model/p.c": '#include "model/q.h"\n',
                                                "model/q.h": "int nm_q(void);\n",
                                                "model/q.c": '#include "model/p.h"\n'},
     "module include cycle: model/p -> model/q -> model/p"),
    ("a private header used outside its folder",
     {"coordinator/engine/cpu/forward.h": "int nm_fwd(void);\n",
      "coordinator/serve/s.c": '#include "coordinator/engine/cpu/forward.h"\n'},
     "coordinator/serve/s.c includes coordinator/engine/cpu/forward.h, which is private to coordinator/engine/cpu/"),
    ("two halves of a module through one private header",
     {"model/int.h": "int nm_left(void);\nint nm_right(void);\n",
      "model/left.c": '#include "model/int.h"\nint nm_left(void) {\n    return nm_right();\n}\n',
      "model/right.c": '#include "model/int.h"\nint nm_right(void) {\n    return 0;\n}\n'
                       'static int g(void) {\n    return nm_left();\n}\n'},
     "model/left.c and model/right.c call each other"),
])
def test_checker_finds_each_violation(tmp_path, case, files, expect):
    write(tmp_path, {**GOOD, **files})
    v = violations(tmp_path)
    assert any(expect in line for line in v), f"{case}: {v}"
