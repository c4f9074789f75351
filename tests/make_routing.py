"""Writes a synthetic routing profile in the format of `numoe generate
--dump-routing`: int32 records {position, layer, k expert ids}.

--hot H: experts 0..H-1 are active for every token (H <= k); the other k-H
ids are drawn at random from the remaining experts."""
import argparse
import random
import struct


def records(n_tokens, layers, n_expert, k, hot, seed=0):
    rng = random.Random(seed)
    out = []
    for pos in range(n_tokens):
        for layer in layers:
            ids = list(range(hot)) + rng.sample(range(hot, n_expert), k - hot)
            out.append([pos, layer] + ids)
    return out


def write(path, recs):
    with open(path, "wb") as f:
        for r in recs:
            f.write(struct.pack(f"<{len(r)}i", *r))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", required=True)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--layers", default="1,2", help="comma-separated MoE layer ids")
    ap.add_argument("--n-expert", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--hot", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write(a.o, records(a.tokens, [int(x) for x in a.layers.split(",")], a.n_expert, a.k, a.hot, a.seed))


if __name__ == "__main__":
    main()
