"""Hostile-GGUF corpus: mutations of a valid file aimed at each field the
reader must check (used by tests/test_gguf.py and as the fuzzer's seed corpus).

    python3 tests/gguf_mutate.py BASE.gguf OUTDIR   # writes OUTDIR/<kind>-<n>.gguf

Each mutation is (name, bytes, expected substring of the error or None when
the mutation may legitimately still parse, e.g. a flipped byte inside data)."""
import random
import struct
import sys
from pathlib import Path

VSIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def walk(buf):
    """Offsets of the header fields of a valid GGUF (little-endian)."""
    pos = 8
    f = {"n_tensors": pos, "n_kv": pos + 8, "kv": [], "ti": []}
    n_t, n_kv = struct.unpack_from("<QQ", buf, pos)
    pos += 16

    def rd_str(p):
        (n,) = struct.unpack_from("<Q", buf, p)
        return p + 8 + n

    def rd_val(p, t):
        if t == 8:
            return rd_str(p)
        if t == 9:
            et, n = struct.unpack_from("<IQ", buf, p)
            q = p + 12
            if et == 8:
                for _ in range(n):
                    q = rd_str(q)
                return q
            return q + n * VSIZE[et]
        return p + VSIZE[t]

    for _ in range(n_kv):
        key = pos
        pos = rd_str(pos)
        (t,) = struct.unpack_from("<I", buf, pos)
        ent = {"key": key, "type": pos, "value": pos + 4, "vtype": t}
        if t == 9:
            ent["arr_type"] = pos + 4
            ent["arr_n"] = pos + 8
        pos = rd_val(pos + 4, t)
        f["kv"].append(ent)
    for _ in range(n_t):
        name = pos
        pos = rd_str(pos)
        (nd,) = struct.unpack_from("<I", buf, pos)
        ent = {"name": name, "n_dims": pos, "ne": pos + 4}
        pos += 4 + 8 * nd
        ent["type"] = pos
        ent["offset"] = pos + 4
        pos += 12
        f["ti"].append(ent)
    f["end"] = pos
    return f


def put(buf, off, fmt, val):
    b = bytearray(buf)
    struct.pack_into(fmt, b, off, val)
    return bytes(b)


def mutations(base, seed=1234, n_random=200):
    f = walk(base)
    out = []
    # truncations: inside the header at every field boundary region, and inside data
    cuts = sorted({0, 3, 4, 7, 8, 15, 16, 23, 24} | set(range(25, f["end"] + 40, max(1, f["end"] // 60))) |
                  {len(base) - 1, len(base) - 100, (f["end"] + len(base)) // 2})
    for c in cuts:
        if 0 <= c < len(base):
            out.append((f"truncate-{c}", base[:c], ""))  # any clear error
    out.append(("bad-magic", b"GGUX" + base[4:], "not a GGUF"))
    out.append(("version-1", put(base, 4, "<I", 1), "version 1"))
    out.append(("version-99", put(base, 4, "<I", 99), "unsupported GGUF version"))
    out.append(("big-endian", put(base, 4, "<I", 3 << 24), "big-endian"))
    out.append(("n-tensors-huge", put(base, f["n_tensors"], "<Q", 1 << 62), "tensor count"))
    out.append(("n-kv-huge", put(base, f["n_kv"], "<Q", (1 << 64) - 1), "metadata count"))
    out.append(("n-tensors-plus1", put(base, f["n_tensors"], "<Q", len(f["ti"]) + 1), ""))
    out.append(("n-kv-plus1", put(base, f["n_kv"], "<Q", len(f["kv"]) + 1), ""))
    for i, kv in enumerate(f["kv"][:12]):
        out.append((f"kv{i}-keylen-huge", put(base, kv["key"], "<Q", 1 << 60), "string length"))
        out.append((f"kv{i}-type-bad", put(base, kv["type"], "<I", 99), "invalid value type"))
        if "arr_n" in kv:
            out.append((f"kv{i}-arrn-huge", put(base, kv["arr_n"], "<Q", 1 << 61), "array of"))
            out.append((f"kv{i}-arrtype-bad", put(base, kv["arr_type"], "<I", 77), "invalid array element type"))
            out.append((f"kv{i}-arrtype-nested", put(base, kv["arr_type"], "<I", 9), "nested arrays"))
        elif kv["vtype"] == 8:
            out.append((f"kv{i}-strlen-huge", put(base, kv["value"], "<Q", 1 << 40), "string length"))
    for i, ti in enumerate(f["ti"][:12]):
        out.append((f"t{i}-namelen-huge", put(base, ti["name"], "<Q", 1 << 50), "string length"))
        out.append((f"t{i}-ndims-0", put(base, ti["n_dims"], "<I", 0), "n_dims"))
        out.append((f"t{i}-ndims-9", put(base, ti["n_dims"], "<I", 9), "n_dims"))
        out.append((f"t{i}-ne0-zero", put(base, ti["ne"], "<Q", 0), "dimension 0"))
        out.append((f"t{i}-ne0-huge", put(base, ti["ne"], "<Q", (1 << 63) + 5), "dimension 0"))
        out.append((f"t{i}-ne0-big", put(base, ti["ne"], "<Q", 1 << 40), ""))
        out.append((f"t{i}-type-bad", put(base, ti["type"], "<I", 1000), "unsupported ggml type"))
        out.append((f"t{i}-offset-far", put(base, ti["offset"], "<Q", 1 << 40), "outside the file"))
        out.append((f"t{i}-offset-misaligned", put(base, ti["offset"], "<Q", 1), "misaligned"))
        out.append((f"t{i}-offset-wrap", put(base, ti["offset"], "<Q", (1 << 64) - 32), "outside the file"))
        if i > 0:
            (prev,) = struct.unpack_from("<Q", base, f["ti"][i - 1]["offset"])
            out.append((f"t{i}-overlap", put(base, ti["offset"], "<Q", prev), "overlap"))
    rng = random.Random(seed)
    for k in range(n_random):
        b = bytearray(base[: f["end"] + 64] if rng.random() < 0.7 else base)
        for _ in range(rng.randint(1, 6)):
            p = rng.randrange(len(b))
            b[p] = rng.randrange(256) if rng.random() < 0.5 else b[p] ^ (1 << rng.randrange(8))
        out.append((f"random-{k}", bytes(b), None))
    return out


if __name__ == "__main__":
    base = Path(sys.argv[1]).read_bytes()
    outdir = Path(sys.argv[2])
    outdir.mkdir(parents=True, exist_ok=True)
    for name, data, _ in mutations(base):
        (outdir / f"{name}.gguf").write_bytes(data)
