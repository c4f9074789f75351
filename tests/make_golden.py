#!/usr/bin/env python3
"""make_golden.py - reference outputs of the tiny synthetic DeepSeek fixtures.

For every HF folder made by tests/gen_deepseek.py (tests/fixtures/models/deepseek-*-hf), and for every
quantised fixture (its de-quantised weights, regenerated with --hf-dequant into a temp dir), this runs
Hugging Face transformers' own DeepseekV2ForCausalLM / DeepseekV3ForCausalLM (float32, eager
attention, CPU) on a fixed prompt of 48 tokens, greedily continues it by 64 tokens (full forward per
step, no cache), and stores in tests/fixtures/golden/<model>/ (<model> = deepseek-v3-tiny for the float32 weights,
dequant/deepseek-v3-tiny-Q4_K-mla etc. for the de-quantised weights of that file; meta.json of the
float goldens also carries the keys tests/test_forward.py reads: gguf, input_ids, logits,
greedy_prompt, greedy_tokens):

  meta.json            versions, prompt text, ids, shapes, tolerances seen, routing margins
  tokens.txt           line 1: the 48 prompt ids (BOS first), line 2: the 64 greedy ids
  logits.npy           float32 [112, n_vocab]: logits of the full 112-token sequence
                       (prompt + greedy continuation) in one forward pass; row t predicts token t+1
  logits_nogroup.npy   (v3 only) same, from the numpy reference WITHOUT group-limited routing
                       (what ik_llama.cpp computes: it ignores expert_group_count for deepseek2)
  tokenize_cases.json  texts and their ids from the HF tokenizer.json (tokenizers library), which
                       equal gen_deepseek.Tokenizer.encode (llama.cpp's algorithm); checked here

It also runs an independent float64 numpy implementation of the GGUF math of
docs/MODEL.md section 5 (ref_forward below: adjacent-pair YaRN RoPE, MLA,
softmax/sigmoid routing with exp_probs_b for selection only, mainline group-limited routing,
weights normalisation and scaling) on the same weights and records its largest difference to
transformers; the script fails if they disagree (>1e-3 abs on logits) - that is the check that the
reference doc's claims (rope pairs, mscale, routing) match the transformers modeling code.

Routing semantics of transformers (checked by the comparison above, for these configs):
  * DeepseekV3TopkRouter: sigmoid, + e_score_correction_bias for the choice only, group score =
    sum of the 2 largest biased scores per group ("noaux_tc"), keep topk_group groups, top-k,
    weights = unbiased sigmoid scores, / (sum + 1e-20) if norm_topk_prob, * routed_scaling_factor
    == mainline llama.cpp (which clamps the sum at 6.1e-5 instead of adding 1e-20). The experts of
    dropped groups get -inf (the original DeepSeek remote code used masked_fill(..., 0.0), which
    differs when a kept expert's biased score sigmoid + bias is negative: this fixture has such
    tokens, counted in meta.json "tokens_whose_choice_differs_with_zero_fill").
  * DeepseekV2TopkRouter: softmax, topk_method "greedy" (plain top-k; "group_limited_greedy" would
    use the group MAX, not the top-2 sum), never normalises (ignores norm_topk_prob), always
    multiplies by routed_scaling_factor. The original DeepSeek remote code multiplies only when not
    normalising; with norm_topk_prob false (our v2 and every released V2 config) all agree.

Needs torch + transformers (>= 4.5x with DeepseekV2/V3 built in; no remote code). The numpy part
(ref_forward, load_hf) is importable without them (tests/test_gen_deepseek.py uses it).

Usage: python3 tests/make_golden.py [--models tests/fixtures/models] [--out tests/fixtures/golden]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
N_PROMPT = 48
N_GEN = 64
PROMPT_TEXT = ("The engine reads the weights of the model, and the experts of every layer are routed "
               "to the processor. 深度学习模型的推理速度取决于内存带宽。 def forward(self, x): return x + 1 "
               "The quick brown fox jumps over the lazy dog, and the dog was not amused at all.")
TOKENIZE_CASES = [
    "Hello world",
    " Hello World!",
    "The quick brown fox jumps over the lazy dog.",
    "int main(int argc, char **argv) {\n    return 0;\n}\n",
    "深度学习模型的推理速度取决于内存带宽。",
    "numbers 1 12 123 1234 12345 3.14159",
    "  leading spaces and trailing   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "<｜User｜>Hi there<｜Assistant｜><think>\nok</think>",
    "<｜begin▁of▁sentence｜>User: hi\n\nAssistant:",
    "Führer naïve café — “quotes” ½ 🦙",
]


# --------------------------------------------------------------------------------------------
# numpy reference of the GGUF math (float64)
# --------------------------------------------------------------------------------------------


def load_hf(d: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    return cfg, load_file(str(d / "model.safetensors"))


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


def yarn_angles(cfg: dict, n_pos: int) -> np.ndarray:
    """theta[p, i] of ggml rope_yarn (reference section 5.2), pairs i = 0 .. d_rope/2-1."""
    d = cfg["qk_rope_head_dim"]
    base = float(cfg["rope_theta"])
    rs = cfg.get("rope_scaling") or {}
    i = np.arange(d // 2, dtype=np.float64)
    pos = np.arange(n_pos, dtype=np.float64)[:, None]
    theta_base = pos * base ** (-2.0 * i / d)
    if rs.get("type", rs.get("rope_type")) != "yarn":
        return theta_base
    factor, n_orig = float(rs["factor"]), float(rs["original_max_position_embeddings"])

    def corr(beta):
        return d * math.log(n_orig / (2 * math.pi * beta)) / (2 * math.log(base))
    lo = max(0.0, math.floor(corr(rs.get("beta_fast", 32))))
    hi = min(d - 1.0, math.ceil(corr(rs.get("beta_slow", 1))))
    ramp = 1.0 - np.clip((i - lo) / max(0.001, hi - lo), 0.0, 1.0)
    return theta_base / factor * (1.0 - ramp) + theta_base * ramp


def rope_pairs(x: np.ndarray, ang: np.ndarray) -> np.ndarray:
    """ggml GGML_ROPE_TYPE_NORM: rotate adjacent pairs (x[2i], x[2i+1]); x [..., T, d], ang [T, d/2]."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = np.cos(ang), np.sin(ang)
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def kq_scale(cfg: dict) -> float:
    rs = cfg.get("rope_scaling") or {}
    d_k = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    m = 1.0
    if rs.get("type", rs.get("rope_type")) == "yarn" and rs.get("mscale_all_dim"):
        m = 1.0 + 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"])
    return m * m / math.sqrt(d_k)


def route(cfg: dict, f: np.ndarray, Wg: np.ndarray, bias: np.ndarray | None, group_routing: bool):
    """Reference section 5.4. Returns (top [T, k], weights [T, k], min selection margin,
    n tokens whose choice differs from plain top-k, n tokens whose choice differs if the dropped
    groups were filled with 0.0 instead of -inf)."""
    logits = f @ Wg.T
    sigmoid = cfg.get("scoring_func", "softmax") == "sigmoid"
    if sigmoid:
        probs = 1.0 / (1.0 + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
    sel = probs + (bias if bias is not None else 0.0)
    k, E = cfg["num_experts_per_tok"], cfg["n_routed_experts"]
    G, Gk = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    plain = np.argsort(-sel, axis=-1, kind="stable")[:, :k]
    masked = sel.copy()
    zero_fill_differs = 0
    if group_routing and G > 1:
        gs = np.sort(sel.reshape(len(sel), G, E // G), axis=-1)[..., -2:].sum(-1)
        keep = np.argsort(-gs, axis=-1, kind="stable")[:, :Gk]
        mask = np.ones((len(sel), G), dtype=bool)
        np.put_along_axis(mask, keep, False, axis=-1)
        full_mask = np.repeat(mask, E // G, axis=-1)
        masked[full_mask] = -np.inf
        # the original DeepSeek remote code (and some engines) fill the dropped groups with 0.0
        # instead of -inf: different whenever a kept expert's biased score is negative
        zf = np.where(full_mask, 0.0, sel)
        zf_top = np.argsort(-zf, axis=-1, kind="stable")[:, :k]
        zero_fill_differs = int(np.sum(np.any(np.sort(zf_top, -1) != np.sort(
            np.argsort(-masked, axis=-1, kind="stable")[:, :k], -1), axis=-1)))
    top = np.argsort(-masked, axis=-1, kind="stable")[:, :k]
    srt = -np.sort(-masked, axis=-1)
    margin = float(np.min(srt[:, k - 1] - srt[:, k])) if k < E else float("inf")
    w = np.take_along_axis(probs, top, axis=-1)
    if cfg.get("norm_topk_prob"):
        w = w / np.maximum(w.sum(-1, keepdims=True), 6.103515625e-5)
    w = w * cfg["routed_scaling_factor"]
    differs = int(np.sum(np.any(np.sort(top, -1) != np.sort(plain, -1), axis=-1)))
    return top, w, margin, differs, zero_fill_differs


def ref_forward(cfg: dict, W: dict[str, np.ndarray], ids: list[int], group_routing: bool = True,
                stats: dict | None = None) -> np.ndarray:
    """Float64 forward of the whole sequence (causal); returns logits [T, vocab]."""
    g = {k: v.astype(np.float64) for k, v in W.items()}
    eps = cfg["rms_norm_eps"]
    nh, dn, dr, dv = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kvl = cfg["kv_lora_rank"]
    dk = dn + dr
    T = len(ids)
    ang = yarn_angles(cfg, T)
    scale = kq_scale(cfg)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    x = g["model.embed_tokens.weight"][np.asarray(ids)]
    if stats is not None:
        stats.setdefault("route_margin", float("inf"))
        stats.setdefault("group_vs_plain_differs", 0)
    for il in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{il}."
        a = _rms(x, g[p + "input_layernorm.weight"], eps)
        if cfg.get("q_lora_rank"):
            q = _rms(a @ g[p + "self_attn.q_a_proj.weight"].T, g[p + "self_attn.q_a_layernorm.weight"], eps)
            q = q @ g[p + "self_attn.q_b_proj.weight"].T
        else:
            q = a @ g[p + "self_attn.q_proj.weight"].T
        q = q.reshape(T, nh, dk).transpose(1, 0, 2)  # [h, T, dk]
        q_nope, q_pe = q[..., :dn], rope_pairs(q[..., dn:], ang)
        kv = a @ g[p + "self_attn.kv_a_proj_with_mqa.weight"].T
        c = _rms(kv[:, :kvl], g[p + "self_attn.kv_a_layernorm.weight"], eps)
        k_pe = rope_pairs(kv[:, kvl:], ang)  # [T, dr], one key for all heads, not normed
        kvb = (c @ g[p + "self_attn.kv_b_proj.weight"].T).reshape(T, nh, dn + dv).transpose(1, 0, 2)
        k_nope, v = kvb[..., :dn], kvb[..., dn:]
        s = scale * (q_nope @ k_nope.transpose(0, 2, 1) + q_pe @ k_pe.T) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(1, 0, 2).reshape(T, nh * dv)
        x = x + o @ g[p + "self_attn.o_proj.weight"].T
        f = _rms(x, g[p + "post_attention_layernorm.weight"], eps)
        if il < cfg["first_k_dense_replace"]:
            y = (_silu(f @ g[p + "mlp.gate_proj.weight"].T) * (f @ g[p + "mlp.up_proj.weight"].T)) @ g[p + "mlp.down_proj.weight"].T
        else:
            bias = g.get(p + "mlp.gate.e_score_correction_bias")
            top, w, margin, differs, zf = route(cfg, f, g[p + "mlp.gate.weight"], bias, group_routing)
            if stats is not None:
                stats["route_margin"] = min(stats["route_margin"], margin)
                stats["group_vs_plain_differs"] += differs
                stats["zero_fill_differs"] = stats.get("zero_fill_differs", 0) + zf
            y = np.zeros_like(f)
            for e in np.unique(top):
                rows, slot = np.nonzero(top == e)
                q_ = p + f"mlp.experts.{e}."
                fe = f[rows]
                he = (_silu(fe @ g[q_ + "gate_proj.weight"].T) * (fe @ g[q_ + "up_proj.weight"].T)) @ g[q_ + "down_proj.weight"].T
                y[rows] += w[rows, slot][:, None] * he
            sh = p + "mlp.shared_experts."
            y += (_silu(f @ g[sh + "gate_proj.weight"].T) * (f @ g[sh + "up_proj.weight"].T)) @ g[sh + "down_proj.weight"].T
        x = x + y
    return _rms(x, g["model.norm.weight"], eps) @ g["lm_head.weight"].T


# --------------------------------------------------------------------------------------------
# golden generation (torch + transformers)
# --------------------------------------------------------------------------------------------


def approx_only_quant(files: list[str]) -> bool:
    return all("-F32-" not in f for f in files)


def make_one(hf_dir: Path, out_dir: Path, exact: list[str], approx: list[str], label: str) -> dict:
    import torch
    import transformers
    sys.path.insert(0, str(HERE))
    import gen_deepseek as gd
    from tokenizers import Tokenizer as HFTok

    cfg, W = load_hf(hf_dir)
    v3 = cfg["model_type"] == "deepseek_v3"
    shape = gd.SHAPES["tiny-v3" if v3 else "tiny-v2"]
    tok = gd.build_tokenizer(shape)
    hft = HFTok.from_file(str(hf_dir / "tokenizer.json"))

    # tokenizer cases: HF tokenizers == our llama.cpp-style encoder
    cases = []
    for text in TOKENIZE_CASES + [PROMPT_TEXT]:
        ours = tok.encode(text, add_bos=True, parse_special=True)
        theirs = hft.encode(text, add_special_tokens=True).ids
        if ours != theirs:
            raise SystemExit(f"{hf_dir.name}: tokenizer mismatch on {text!r}:\n ours {ours}\n  hf {theirs}")
        cases.append({"text": text, "ids": ours})

    prompt = tok.encode(PROMPT_TEXT, add_bos=True)[:N_PROMPT]
    assert len(prompt) == N_PROMPT, len(prompt)

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                              attn_implementation="eager")
    model.eval()
    expect_cls = "DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"
    if type(model).__name__ != expect_cls:
        raise SystemExit(f"{hf_dir}: loaded {type(model).__name__}, expected {expect_cls}")

    ids = list(prompt)
    margins = []
    with torch.no_grad():
        for _ in range(N_GEN):
            lg = model(torch.tensor([ids])).logits[0, -1].double().numpy()
            srt = np.sort(lg)
            margins.append(float(srt[-1] - srt[-2]))
            ids.append(int(np.argmax(lg)))
        full = model(torch.tensor([ids])).logits[0].float().numpy()
    gen = ids[N_PROMPT:]
    T = len(ids)
    consistent = [int(np.argmax(full[N_PROMPT - 1 + k])) == gen[k] for k in range(N_GEN)]

    stats: dict = {}
    ref = ref_forward(cfg, W, ids, group_routing=True, stats=stats)
    diff = float(np.max(np.abs(ref - full.astype(np.float64))))
    if diff > 1e-3:
        raise SystemExit(f"{hf_dir.name}: numpy reference of the GGUF math differs from transformers by {diff}")
    nog_stats: dict = {}
    ref_nog = ref_forward(cfg, W, ids, group_routing=False, stats=nog_stats) if v3 else None

    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "logits.npy", full.astype("<f4"))
    if ref_nog is not None:
        np.save(out_dir / "logits_nogroup.npy", ref_nog.astype("<f4"))
    (out_dir / "tokens.txt").write_text(" ".join(map(str, prompt)) + "\n" + " ".join(map(str, gen)) + "\n")
    (out_dir / "tokenize_cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    lstd = float(full.std())
    pmax = float(np.mean(np.max(np.exp(full - full.max(-1, keepdims=True)) /
                                np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True), -1)))
    meta = {
        "model": label,
        "exact_for_gguf": exact,
        "approximate_for_gguf": approx,
        "note": ("exact_for_gguf: these weights exactly (for a quantised file: its de-quantised weights, "
                 "gen_deepseek.py --hf-dequant; an engine that quantises activations, e.g. Q8_K for K-quant "
                 "dots, still differs slightly); approximate_for_gguf: same model, other weight precision. "
                 "Greedy decoding never stops at EOS here (ignore EOS when replaying)."),
        "hf_class": expect_cls,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32",
        "attn_implementation": "eager",
        "prompt_text": PROMPT_TEXT,
        "n_prompt": N_PROMPT,
        "n_gen": N_GEN,
        "prompt_ids": prompt,
        "greedy_ids": gen,
        "logits_file": "logits.npy",
        "logits_shape": [T, int(full.shape[1])],
        "logits_layout": "row t = logits after tokens[0..t] (predicts token t+1); float32 .npy",
        "greedy_from_full_forward_consistent": all(consistent),
        "greedy_min_top1_top2_margin": min(margins),
        "logits_std": lstd,
        "mean_max_softmax_prob": pmax,
        "numpy_reference_max_abs_diff": diff,
        "routing_min_selection_margin": stats["route_margin"],
        "group_routing": bool(v3 and cfg.get("n_group", 1) > 1),
        "tokens_whose_choice_differs_with_group_routing": stats["group_vs_plain_differs"],
        "group_mask_fill": "-inf (transformers >= 4.5x, mainline llama.cpp, reference doc 5.4)",
        "tokens_whose_choice_differs_with_zero_fill": stats.get("zero_fill_differs", 0),
    }
    if ref_nog is not None:
        meta["logits_nogroup_file"] = "logits_nogroup.npy"
        meta["logits_nogroup_note"] = ("numpy float64 reference without group-limited routing "
                                       "(ik_llama.cpp semantics); max abs diff to logits.npy: "
                                       f"{float(np.max(np.abs(ref_nog - full))):.4g}")
    # keys read by tests/test_forward.py (one GGUF per golden; the others in exact_for_gguf)
    if exact:
        meta["gguf"] = f"tests/fixtures/models/{exact[0]}"
        meta["input_ids"] = ids
        meta["logits"] = "logits.npy"
        if not approx_only_quant(exact):
            meta["greedy_prompt"] = prompt
            meta["greedy_tokens"] = gen
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=str(HERE / "fixtures" / "models"))
    ap.add_argument("--out", default=str(HERE / "fixtures" / "golden"))
    args = ap.parse_args(argv)
    models = Path(args.models)
    hf_dirs = sorted(p for p in models.glob("deepseek-*-hf") if (p / "config.json").is_file())
    if not hf_dirs:
        raise SystemExit(f"no deepseek-*-hf folders in {models}")
    jobs = []
    for d in hf_dirs:
        stem = d.name[:-3]  # deepseek-v3-tiny
        ggufs = sorted(p.name for p in models.glob(stem + "-*.gguf"))
        order = {"mla": 0, "legacy": 1, "ik": 2}  # the primary ("gguf") file first
        exact = sorted((g for g in ggufs if "-F32-" in g), key=lambda g: (order.get(g[:-5].split("-")[-1], 3), g))
        jobs.append((d, stem, exact, [g for g in ggufs if "-F32-" not in g]))
    # goldens on the de-quantised weights of every quantised fixture (HF folder made in a temp dir)
    tmp = tempfile.TemporaryDirectory()
    sys.path.insert(0, str(HERE))
    import gen_deepseek as gd
    for g in sorted(models.glob("deepseek-*-tiny-*.gguf")):
        style, typ, layout = g.name[:-5].split("-")[1], g.name[:-5].split("-")[3], g.name[:-5].split("-")[4]
        if typ == "F32":
            continue
        td = Path(tmp.name) / g.stem
        gd.main(["-q", "--style", style, "--type", typ, "--attn-layout", layout, "--seed", "1234",
                 "-o", str(td / g.name), "--hf-out", str(td / "hf"), "--hf-dequant"])
        if (td / g.name).read_bytes() != g.read_bytes():
            raise SystemExit(f"{g}: regenerating it with seed 1234 does not give the same file")
        jobs.append((td / "hf", "dequant/" + g.stem, [g.name], []))
    for d, stem, exact, approx in jobs:
        meta = make_one(d, Path(args.out) / stem, exact, approx, stem)
        print(f"{stem}: ref diff {meta['numpy_reference_max_abs_diff']:.2e}, logits std {meta['logits_std']:.2f}, "
              f"route margin {meta['routing_min_selection_margin']:.2e}, greedy margin "
              f"{meta['greedy_min_top1_top2_margin']:.3f}, group-changed choices "
              f"{meta['tokens_whose_choice_differs_with_group_routing']}, greedy {meta['greedy_ids'][:12]}...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
