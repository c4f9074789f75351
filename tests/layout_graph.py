"""The include and call structure of numoe's C sources, as docs/LAYOUT.md
describes it, for tests/test_layout.py (and by hand:
`python3 tests/layout_graph.py [ROOT]` prints the folder graph and any
violation).

Nodes:
  file     every .c / .h / .cu / .cuh under the source folders
  folder   a file's directory (coordinator/engine/cpu, common, ...), and the
           top-level folder (coordinator, common, ...)
  module   a file path without its extension: foo.c + foo.h are one module
Edges: an #include "x" line (x is a path from the repository root, as the
Makefile's -I. makes it; "proto/numoe.pb-c.h" is generated into the build
tree and belongs to proto/). Calls: .c file A calls .c file B when A uses
(as an identifier followed by "(") a function B defines without static.

Rules:
  0. a top-level folder includes only folders of a lower layer (LAYERS, the
     table in docs/LAYOUT.md): common/ includes nothing else, so the GGUF
     reader cannot depend on the kernels;
  1. the top-level folder graph has no cycle;
  2. the sub-folder graph has no cycle;
  3. the module graph has no cycle (so no two files include each other's
     headers);
  4. no two files call each other (two halves of one module sharing a
     private header, as serve_http.c / serve_gen.c once did, show up here
     even though their includes look one-way);
  5. a folder's private headers (PRIVATE) are included only from that
     folder: nothing outside the CPU engine sees its forward-pass scratch or
     its caches, nothing outside the expert backends their transports.
"""
import re
import sys
from pathlib import Path

SOURCE_DIRS = ("common", "kernels", "proto", "model", "coordinator", "worker", "launch")
# layer of each top-level folder: includes go to lower layers only
LAYERS = {"common": 0, "kernels": 1, "proto": 1, "model": 2, "coordinator": 3, "worker": 3, "launch": 4}
# headers only their own folder may include (docs/LAYOUT.md)
PRIVATE = ("coordinator/engine/cpu/forward.h", "coordinator/engine/cpu/kv_cache.h",
           "coordinator/experts/remote_core.h", "coordinator/experts/shm_doorbell.h",
           "coordinator/experts/zmq_handoff.h", "coordinator/experts/tcp_inline.h",
           "coordinator/serve/reply.h", "kernels/quant_unpack.h", "kernels/dot_simd.h")
EXTS = (".c", ".h", ".cu", ".cuh")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
# a function definition as this code base writes them: return type and name
# at the start of a line, the body's brace at the end of the signature
DEFINITION = re.compile(r"^(?!static\b)(?:[A-Za-z_][\w\s\*]*?[\s\*])(nm_\w+)\s*\(([^;{}]|\n)*?\)\s*\{", re.M)
CALL = re.compile(r"\b(nm_\w+)\s*\(")
COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
STRING = re.compile(r'"(\\.|[^"\\])*"')


def sources(root):
    out = []
    for d in SOURCE_DIRS:
        base = root / d
        if base.is_dir():
            out += sorted(p for p in base.rglob("*") if p.suffix in EXTS and p.is_file())
    return out


def rel(root, p):
    return p.relative_to(root).as_posix()


def top(path):
    return path.split("/", 1)[0]


def folder(path):
    return path.rsplit("/", 1)[0]


def module(path):
    return path.rsplit(".", 1)[0]


def code_of(text):
    return STRING.sub('""', COMMENT.sub(" ", text))


def graphs(root):
    """(includes: file -> set of included files, defs: .c file -> set of
    functions, uses: .c file -> set of functions it calls)."""
    files = {rel(root, p): p.read_text(errors="replace") for p in sources(root)}
    includes, defs, uses = {}, {}, {}
    for f, text in files.items():
        incs = set()
        for inc in INCLUDE.findall(text):
            if inc in files or inc == "proto/numoe.pb-c.h":
                incs.add(inc)
        includes[f] = incs
        if f.endswith((".c", ".cu")):
            code = code_of(text)
            defs[f] = set(m.group(1) for m in DEFINITION.finditer(code))
            uses[f] = set(CALL.findall(code))
    return includes, defs, uses


def edges_between(includes, key):
    """Edges of the graph whose nodes are key(file)."""
    out = {}
    for f, incs in includes.items():
        for g in incs:
            a, b = key(f), key(g)
            if a != b:
                out.setdefault(a, set()).add(b)
    return out


def find_cycle(edges):
    """One cycle as a list of nodes (first == last), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if not state.get(m):
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if not state.get(n):
            c = visit(n)
            if c:
                return c
    return None


def mutual_calls(defs, uses):
    """Pairs of .c files that call each other, with an example function each way."""
    owner = {}
    for f, names in defs.items():
        for n in names:
            owner.setdefault(n, f)
    calls = {}
    for f, names in uses.items():
        for n in names:
            g = owner.get(n)
            if g and g != f:
                calls.setdefault(f, {}).setdefault(g, n)
    pairs = []
    for a in sorted(calls):
        for b, fn in sorted(calls[a].items()):
            if a < b and a in calls.get(b, {}):
                pairs.append((a, b, fn, calls[b][a]))
    return pairs


def violations(root):
    includes, defs, uses = graphs(root)
    out = []
    for a, bs in sorted(edges_between(includes, top).items()):
        for b in sorted(bs):
            if LAYERS.get(b, 99) >= LAYERS.get(a, -1):
                ex = next(f"{f} includes {g}" for f in sorted(includes) for g in sorted(includes[f])
                          if top(f) == a and top(g) == b)
                out.append(f"{a}/ (layer {LAYERS.get(a)}) includes {b}/ (layer {LAYERS.get(b)}): {ex}")
    for name, key in (("top-level folder", top), ("folder", folder), ("module", module)):
        c = find_cycle(edges_between(includes, key))
        if c:
            out.append(f"{name} include cycle: " + " -> ".join(c))
    for f in sorted(includes):
        for g in sorted(includes[f]):
            if g in PRIVATE and folder(f) != folder(g) and not f.startswith("tests/"):
                out.append(f"{f} includes {g}, which is private to {folder(g)}/")
    for a, b, f1, f2 in mutual_calls(defs, uses):
        out.append(f"{a} and {b} call each other ({a} calls {f1}, {b} calls {f2})")
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
    includes, _, _ = graphs(root)
    for a, bs in sorted(edges_between(includes, folder).items()):
        print(f"{a} -> {', '.join(sorted(bs))}")
    v = violations(root)
    print("\n".join(v) if v else "no cycles, no mutual calls")
    sys.exit(1 if v else 0)
