"""ref_deepseek.py - an independent float64 numpy forward pass of a deepseek2
GGUF, written from the math (docs/MODEL.md §5 / HF modeling_deepseek), in
the un-absorbed form (full per-head K and V), with gguf-py's dequantisation.
It shares no code with numoe; the tests compare numoe's logits with it on
every fixture (and with HF transformers' golden outputs where stored).

    python3 tests/ref_deepseek.py MODEL.gguf 1,2,3 [--out logits.npy]
"""
import argparse
import math

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class Model:
    def __init__(self, path):
        r = GGUFReader(path)
        self.kv = {}
        for name, f in r.fields.items():
            if not f.types:
                continue
            v = f.contents()
            self.kv[name] = v
        self.t = {}
        for t in r.tensors:
            a = dequantize(t.data, t.tensor_type)
            shape = [int(x) for x in reversed(t.shape.tolist())]  # numpy order
            self.t[t.name] = np.asarray(a, dtype=np.float64).reshape(shape)
        g = lambda k, d=None: self.kv.get("deepseek2." + k, d)  # noqa: E731
        self.L = g("block_count")
        self.H = g("embedding_length")
        self.nh = g("attention.head_count")
        self.kvr = g("attention.kv_lora_rank")
        self.dr = g("rope.dimension_count")
        if g("attention.key_length_mla"):
            dk, self.dv = g("attention.key_length_mla"), g("attention.value_length_mla")
        else:
            dk, self.dv = g("attention.key_length"), g("attention.value_length")
        self.dn = dk - self.dr
        self.eps = g("attention.layer_norm_rms_epsilon")
        self.n_dense = g("leading_dense_block_count", 0)
        self.E = g("expert_count")
        self.k = g("expert_used_count")
        self.gating = g("expert_gating_func", 1)
        self.norm_topk = bool(g("expert_weights_norm", False))
        self.scale = g("expert_weights_scale", 1.0)
        self.G = g("expert_group_count", 1)
        self.Gk = g("expert_group_used_count", 1)
        base = g("rope.freq_base", 10000.0)
        stype = g("rope.scaling.type", "none")
        factor = g("rope.scaling.factor", 0.0) or 0.0
        orig = g("rope.scaling.original_context_length", g("context_length"))
        logmul = g("rope.scaling.yarn_log_multiplier", 0.0)
        d = self.dr
        inv = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
        mscale = 1.0
        if stype == "yarn" and factor > 1:
            def corr(rot):
                return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
            lo = max(0, math.floor(corr(32)))
            hi = min(d - 1, math.ceil(corr(1)))
            ramp = np.clip((np.arange(d // 2) - lo) / max(0.001, hi - lo), 0, 1)
            extra = 1 - ramp  # 1 -> keep the original frequency
            inv = inv / factor * (1 - extra) + inv * extra
            mscale = 1 + logmul * math.log(factor)
        elif stype == "linear" and factor > 1:
            inv = inv / factor
        self.inv = inv
        self.kq_scale = mscale * mscale / math.sqrt(self.dn + self.dr)
        self.layers = []
        for i in range(self.L):
            p = f"blk.{i}."
            w = {k[len(p):]: v for k, v in self.t.items() if k.startswith(p)}
            if "attn_kv_b.weight" not in w:  # mainline MLA file: rebuild kv_b from k_b / v_b
                kb = w["attn_k_b.weight"].reshape(self.nh, self.kvr, self.dn)  # [h][c][n]
                vb = w["attn_v_b.weight"].reshape(self.nh, self.dv, self.kvr)  # [h][j][c]
                kvb = np.concatenate([kb.transpose(0, 2, 1), vb], axis=1)  # [h][dn+dv][c]
                w["attn_kv_b.weight"] = kvb.reshape(self.nh * (self.dn + self.dv), self.kvr)
            self.layers.append(w)

    def rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):  # x [..., d], adjacent pairs
        ang = pos[:, None] * self.inv[None, :]
        c, s = np.cos(ang), np.sin(ang)
        while c.ndim < x.ndim:
            c, s = c[:, None, :], s[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    def route(self, f, w, layer=None, force=None, log=None):
        """Top-k experts per token. force: {(layer, t): ids} overrides the choice
        (weights still come from this reference's probabilities); log: list that
        receives one dict per decision: layer, t, gating (1 softmax, 2 sigmoid),
        logits (the router's), scores
        (selection scores before the group mask), group_scores and kept (the
        kept groups' ids; both None without groups), top (chosen ids)."""
        logits = f @ w["ffn_gate_inp.weight"].T
        if self.gating == 2:
            p = 1 / (1 + np.exp(-logits))
        else:
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
        s = p + w["exp_probs_b.bias"] if "exp_probs_b.bias" in w else p.copy()
        ids = np.zeros((len(f), self.k), dtype=np.int64)
        wts = np.zeros((len(f), self.k))
        for t in range(len(f)):
            st = s[t].copy()
            pre, score, keep = st.copy(), None, None
            if self.G > 1 and self.Gk < self.G:
                grp = st.reshape(self.G, -1)
                if self.gating == 2:
                    score = np.sort(grp, axis=1)[:, -2:].sum(1)
                else:
                    score = grp.max(1)
                keep = np.argsort(-score, kind="stable")[: self.Gk]
                mask = np.zeros(self.G, bool)
                mask[keep] = True
                st = np.where(np.repeat(mask, grp.shape[1]), st, -np.inf)
            top = np.argsort(-st, kind="stable")[: self.k]
            if log is not None:
                log.append({"layer": layer, "t": t, "gating": self.gating, "logits": logits[t].copy(), "scores": pre,
                            "group_scores": score, "kept": keep, "top": top.copy()})
            if force is not None and (layer, t) in force:
                top = np.asarray(force[(layer, t)])
            ww = p[t, top]
            if self.norm_topk:
                ww = ww / (ww.sum() + 1e-20)
            ids[t], wts[t] = top, ww * self.scale
        return ids, wts

    @staticmethod
    def ffn(x, g, u, d):
        a = x @ g.T
        return ((a / (1 + np.exp(-a))) * (x @ u.T)) @ d.T

    def forward(self, tokens, force=None, log=None):
        T = len(tokens)
        pos = np.arange(T, dtype=np.float64)
        x = self.t["token_embd.weight"][tokens].copy()
        nh, dn, dr, dv, kvr = self.nh, self.dn, self.dr, self.dv, self.kvr
        mask = np.triu(np.full((T, T), -np.inf), 1)
        for i, w in enumerate(self.layers):
            a = self.rms(x, w["attn_norm.weight"])
            if "attn_q.weight" in w:
                q = a @ w["attn_q.weight"].T
            else:
                q = self.rms(a @ w["attn_q_a.weight"].T, w["attn_q_a_norm.weight"]) @ w["attn_q_b.weight"].T
            q = q.reshape(T, nh, dn + dr)
            q_nope, q_pe = q[..., :dn], self.rope(q[..., dn:], pos)
            kv = a @ w["attn_kv_a_mqa.weight"].T
            c = self.rms(kv[:, :kvr], w["attn_kv_a_norm.weight"])
            k_pe = self.rope(kv[:, kvr:], pos)
            kvb = (c @ w["attn_kv_b.weight"].T).reshape(T, nh, dn + dv)
            k_nope, v = kvb[..., :dn], kvb[..., dn:]
            s = (np.einsum("thn,uhn->htu", q_nope, k_nope) + np.einsum("thr,ur->htu", q_pe, k_pe)) * self.kq_scale
            s = s + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            o = np.einsum("htu,uhj->thj", p, v).reshape(T, nh * dv)
            x = x + o @ w["attn_output.weight"].T
            f = self.rms(x, w["ffn_norm.weight"])
            if i < self.n_dense:
                x = x + self.ffn(f, w["ffn_gate.weight"], w["ffn_up.weight"], w["ffn_down.weight"])
                continue
            ids, wts = self.route(f, w, i, force, log)
            y = np.zeros_like(x)
            G, U, D = w["ffn_gate_exps.weight"], w["ffn_up_exps.weight"], w["ffn_down_exps.weight"]
            for t in range(T):
                for e, we in zip(ids[t], wts[t]):
                    y[t] += we * self.ffn(f[t:t + 1], G[e], U[e], D[e])[0]
            if "ffn_gate_shexp.weight" in w:
                y += self.ffn(f, w["ffn_gate_shexp.weight"], w["ffn_up_shexp.weight"], w["ffn_down_shexp.weight"])
            x = x + y
        out = self.t.get("output.weight", self.t["token_embd.weight"])
        return self.rms(x, self.t["output_norm.weight"]) @ out.T


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("tokens")
    ap.add_argument("--out")
    a = ap.parse_args()
    lg = Model(a.model).forward(np.array([int(x) for x in a.tokens.split(",")]))
    if a.out:
        np.save(a.out, lg.astype(np.float32))
    print(",".join(str(int(i)) for i in lg.argmax(-1)))
