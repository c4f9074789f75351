"""Checks of the synthetic DeepSeek fixtures (tests/fixtures/models) made by tests/gen_deepseek.py.

Reads every fixture with gguf.GGUFReader and checks keys, tensor names, shapes and types against
docs/MODEL.md (sections 2, 3), that the generator is deterministic (regenerates
into a temp dir and compares bytes), that the attention layouts carry the same weights, that the HF
safetensors equal the GGUF F32 tensors, that quantised files de-quantise close to the float weights,
that the golden logits equal an independent numpy float64 implementation of the GGUF math, and the
tokenizer against llama.cpp's own vocab test data (tests/fixtures/vocab). The packages it needs
are the ones tests/setup.sh installs (gguf, regex, safetensors, tokenizers): a missing one is an
error, not a skip. Only the re-run of transformers itself (torch) skips where torch is missing: its
stored golden outputs are what the other checks compare with.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gguf
from gguf import GGMLQuantizationType as QT

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gen_deepseek as gd  # noqa: E402
import make_golden as mg  # noqa: E402

REPO = HERE.parent
MODELS = HERE / "fixtures" / "models"
GOLDEN = HERE / "fixtures" / "golden"
VOCAB = HERE / "fixtures" / "vocab"
ARCH = "deepseek2"

FIXTURES = sorted(p.name for p in MODELS.glob("deepseek-*.gguf"))
# weight types no committed fixture has; test_other_types_written generates them
OTHER_TYPES = ("Q2_K", "Q3_K", "Q5_K", "Q4_0", "Q4_1", "Q5_1", "BF16")
# RMS error of a de-quantised tensor relative to the float32 weights, per stored type, over every
# tensor of both styles (measured worst in the comment; deterministic weights and quantisers)
RMS_BOUND = {
    "F16": 3e-4,    # 2.1e-4
    "BF16": 2.2e-3,  # 1.68e-3
    "Q8_0": 7e-3,   # 5.5e-3
    "Q6_K": 0.022,  # 0.0177
    "Q5_K": 0.045,  # 0.0365
    "Q5_1": 0.047,  # 0.0383
    "Q5_0": 0.055,  # 0.0436
    "Q4_K": 0.09,   # 0.0722
    "Q4_1": 0.1,    # 0.0797
    "Q4_0": 0.11,   # 0.0875
    "Q3_K": 0.19,   # 0.155
    "Q2_K": 0.36,   # 0.289
}
# golden logits (float32 transformers) vs the float64 numpy reference on the same weights:
# max |diff| 9.6e-6 (v2/v3, F32 and the de-quantised Q8_0/Q4_K files), 4.5e-7 without groups
GOLDEN_ABS = 2e-5
# the F16 file's weights are rounded: against the float32 golden 9.2e-3 (every argmax equal)
GOLDEN_ABS_F16 = 0.012


def test_fixtures_present():
    assert {parse_name(n)[1] for n in FIXTURES} >= {"F32", "F16", "Q8_0", "Q4_K"}, FIXTURES


def parse_name(name: str) -> tuple[str, str, str]:
    """deepseek-v3-tiny-Q4_K-mla.gguf -> ("v3", "Q4_K", "mla")"""
    parts = name[:-5].split("-")
    return parts[1], parts[3], parts[4]


def hf_dir(style: str) -> Path:
    """The HF folder of a style's F32 weights. make_fixtures.sh writes it next to
    the GGUFs; it is not committed (it repeats the F32 GGUF's bytes), so when it
    is missing it is regenerated, deterministically, under build/."""
    d = MODELS / f"deepseek-{style}-tiny-hf"
    if (d / "model.safetensors").is_file():
        return d
    d = REPO / "build" / "fixtures-hf" / f"deepseek-{style}-tiny-hf"
    if not (d / "model.safetensors").is_file():
        layout = {"v2": "legacy", "v3": "mla"}[style]
        d.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(HERE / "gen_deepseek.py"), "-q", "--seed", "1234", "--style", style,
                        "--attn-layout", layout, "--type", "F32", "-o", str(d.parent / f"{style}.gguf"),
                        "--hf-out", str(d)], check=True)
    return d


_readers: dict[str, gguf.GGUFReader] = {}


def reader(name: str) -> gguf.GGUFReader:
    if name not in _readers:
        _readers[name] = gguf.GGUFReader(str(MODELS / name))
    return _readers[name]


def kv(r: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def tensors(r: gguf.GGUFReader) -> dict:
    return {t.name: t for t in r.tensors}


def ne(t) -> list[int]:
    return [int(x) for x in t.shape]


def as_float(t) -> np.ndarray:
    """Tensor data as float32 in numpy order (reversed ne)."""
    shape = tuple(reversed(ne(t)))
    if t.tensor_type == QT.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    raw = np.asarray(t.data).reshape(-1).view(np.uint8)
    return gd.dequantize(QT(int(t.tensor_type)), raw, shape)


def cfg_of(style: str) -> dict:
    return json.loads((hf_dir(style) / "config.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_metadata_keys(name):
    style, typ, layout = parse_name(name)
    m = kv(reader(name))
    c = cfg_of(style)
    p = ARCH + "."
    assert m["general.architecture"] == ARCH
    assert m["general.file_type"] == gd.FILE_TYPE[QT[typ]]
    assert m["general.quantization_version"] == 2
    assert m[p + "block_count"] == c["num_hidden_layers"]
    assert m[p + "context_length"] == c["max_position_embeddings"]
    assert m[p + "embedding_length"] == c["hidden_size"]
    assert m[p + "feed_forward_length"] == c["intermediate_size"]
    assert m[p + "attention.head_count"] == c["num_attention_heads"]
    assert m[p + "leading_dense_block_count"] == c["first_k_dense_replace"]
    assert m[p + "attention.kv_lora_rank"] == c["kv_lora_rank"]
    assert m[p + "rope.dimension_count"] == c["qk_rope_head_dim"]
    assert m[p + "rope.freq_base"] == pytest.approx(c["rope_theta"])
    assert m[p + "attention.layer_norm_rms_epsilon"] == pytest.approx(c["rms_norm_eps"])
    assert m[p + "expert_count"] == c["n_routed_experts"]
    assert m[p + "expert_used_count"] == c["num_experts_per_tok"]
    assert m[p + "expert_shared_count"] == c["n_shared_experts"]
    assert m[p + "expert_feed_forward_length"] == c["moe_intermediate_size"]
    assert m[p + "expert_weights_scale"] == pytest.approx(c["routed_scaling_factor"])
    assert m[p + "expert_weights_norm"] == c["norm_topk_prob"]
    assert m[p + "expert_gating_func"] == (2 if c["scoring_func"] == "sigmoid" else 1)
    assert m[p + "expert_group_count"] == c["n_group"]
    assert m[p + "expert_group_used_count"] == c["topk_group"]
    rs = c["rope_scaling"]
    assert m[p + "rope.scaling.type"] == "yarn"
    assert m[p + "rope.scaling.factor"] == pytest.approx(rs["factor"])
    assert m[p + "rope.scaling.original_context_length"] == rs["original_max_position_embeddings"]
    assert m[p + "rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * rs["mscale_all_dim"])
    d_k = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    if layout == "mla":
        assert m[p + "attention.head_count_kv"] == 1
        assert m[p + "attention.key_length"] == c["kv_lora_rank"] + c["qk_rope_head_dim"]
        assert m[p + "attention.value_length"] == c["kv_lora_rank"]
        assert m[p + "attention.key_length_mla"] == d_k
        assert m[p + "attention.value_length_mla"] == c["v_head_dim"]
    else:
        assert m[p + "attention.head_count_kv"] == c["num_attention_heads"]
        assert m[p + "attention.key_length"] == d_k
        assert m[p + "attention.value_length"] == c["v_head_dim"]
        assert p + "attention.key_length_mla" not in m
    if c["q_lora_rank"]:
        assert m[p + "attention.q_lora_rank"] == c["q_lora_rank"]
    else:
        assert p + "attention.q_lora_rank" not in m
    # style specifics
    if style == "v3":
        assert m["tokenizer.ggml.pre"] == "deepseek-v3"
        assert m[p + "expert_gating_func"] == 2 and m[p + "expert_weights_norm"] is True
        assert 0 < m[p + "expert_group_used_count"] < m[p + "expert_group_count"]
        assert m[p + "expert_count"] % m[p + "expert_group_count"] == 0
    else:
        assert m["tokenizer.ggml.pre"] == "deepseek-llm"
        assert m[p + "expert_gating_func"] == 1 and m[p + "expert_weights_norm"] is False
        assert m[p + "expert_group_count"] == 1


@pytest.mark.parametrize("name", FIXTURES)
def test_tokenizer_keys(name):
    style, _, _ = parse_name(name)
    m = kv(reader(name))
    toks, types = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"]
    assert m["tokenizer.ggml.model"] == "gpt2"
    assert m[ARCH + ".vocab_size"] == len(toks) == len(types) == cfg_of(style)["vocab_size"]
    assert m["tokenizer.ggml.add_bos_token"] is True and m["tokenizer.ggml.add_eos_token"] is False
    bos, eos = m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"]
    assert toks[bos] == gd.BOS_TEXT and toks[eos] == gd.EOS_TEXT
    assert types[bos] == types[eos] == gguf.TokenType.CONTROL
    assert m["tokenizer.ggml.padding_token_id"] == eos
    if style == "v3":
        assert (bos, eos) == (0, 1)
        for sp in gd.V3_EXTRA_SPECIALS:
            assert types[toks.index(sp)] == gguf.TokenType.CONTROL
    else:
        assert (bos, eos) == (len(toks) - 2, len(toks) - 1)
    # every byte is a token, every merge result is a token, merges are "a b"
    b2u = gd.bytes_to_unicode()
    assert set(b2u.values()) <= set(toks)
    ts = set(toks)
    for mrg in m["tokenizer.ggml.merges"]:
        a, b = mrg.split(" ")
        assert a in ts and b in ts and a + b in ts
    tmpl = m["tokenizer.chat_template"]
    if style == "v3":  # llama.cpp detects deepseek3 by these strings
        assert all(s in tmpl for s in ("<｜Assistant｜>", "<｜User｜>", "<｜end▁of▁sentence｜>"))
    else:  # ... and deepseek2 by this one
        assert "'Assistant: ' + message['content'] + eos_token" in tmpl


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------


def expected_tensors(c: dict, layout: str, vocab: int) -> dict[str, list[int]]:
    """Names and ne of reference section 3, computed from the HF config."""
    H, nh = c["hidden_size"], c["num_attention_heads"]
    dn, dr, dv, kvl, ql = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"], c["q_lora_rank"]
    E, fe, fs = c["n_routed_experts"], c["moe_intermediate_size"], c["moe_intermediate_size"] * c["n_shared_experts"]
    out = {"token_embd.weight": [H, vocab], "output_norm.weight": [H], "output.weight": [H, vocab]}
    for i in range(c["num_hidden_layers"]):
        b = f"blk.{i}."
        out[b + "attn_norm.weight"] = [H]
        if ql:
            out[b + "attn_q_a.weight"] = [H, ql]
            out[b + "attn_q_a_norm.weight"] = [ql]
            out[b + "attn_q_b.weight"] = [ql, nh * (dn + dr)]
        else:
            out[b + "attn_q.weight"] = [H, nh * (dn + dr)]
        out[b + "attn_kv_a_mqa.weight"] = [H, kvl + dr]
        out[b + "attn_kv_a_norm.weight"] = [kvl]
        if layout in ("legacy", "ik"):
            out[b + "attn_kv_b.weight"] = [kvl, nh * (dn + dv)]
        if layout == "ik":
            out[b + "attn_k_b.weight"] = [dn, nh * kvl]
            out[b + "attn_v_b.weight"] = [kvl, nh * dv]
        if layout == "mla":
            out[b + "attn_k_b.weight"] = [dn, kvl, nh]
            out[b + "attn_v_b.weight"] = [kvl, dv, nh]
        out[b + "attn_output.weight"] = [nh * dv, H]
        out[b + "ffn_norm.weight"] = [H]
        if i < c["first_k_dense_replace"]:
            out[b + "ffn_gate.weight"] = [H, c["intermediate_size"]]
            out[b + "ffn_up.weight"] = [H, c["intermediate_size"]]
            out[b + "ffn_down.weight"] = [c["intermediate_size"], H]
        else:
            out[b + "ffn_gate_inp.weight"] = [H, E]
            if c["scoring_func"] == "sigmoid":
                out[b + "exp_probs_b.bias"] = [E]
            out[b + "ffn_gate_exps.weight"] = [H, fe, E]
            out[b + "ffn_up_exps.weight"] = [H, fe, E]
            out[b + "ffn_down_exps.weight"] = [fe, H, E]
            out[b + "ffn_gate_shexp.weight"] = [H, fs]
            out[b + "ffn_up_shexp.weight"] = [H, fs]
            out[b + "ffn_down_shexp.weight"] = [fs, H]
    return out


def tensor_count_formula(c: dict, layout: str) -> int:
    """Reference section 3: 3 + sum(attention + 1 + FFN)."""
    att = 8 if c["q_lora_rank"] else 6
    att += {"legacy": 0, "ik": 2, "mla": 1}[layout]
    n = 3
    for i in range(c["num_hidden_layers"]):
        ffn = 3 if i < c["first_k_dense_replace"] else 7 + (c["scoring_func"] == "sigmoid")
        n += att + 1 + ffn
    return n


def expected_type(name: str, shape: list[int], typ: str) -> set[QT]:
    if len(shape) == 1 or name.endswith("_norm.weight") or name.endswith(".bias") or ".ffn_gate_inp." in name:
        return {QT.F32}
    if typ in ("F32", "F16", "BF16", "Q8_0"):
        return {QT[typ]}
    if name == "output.weight":
        return {QT.Q6_K} if shape[0] % 256 == 0 else {QT.Q8_0}
    if typ.endswith("_K") and shape[0] % 256:
        return {{"Q4_K": QT.Q5_0, "Q5_K": QT.Q5_1, "Q6_K": QT.Q8_0}.get(typ, QT.Q4_0)}
    return {QT[typ]}


@pytest.mark.parametrize("name", FIXTURES)
def test_tensors(name):
    style, typ, layout = parse_name(name)
    r = reader(name)
    c = cfg_of(style)
    ts = tensors(r)
    exp = expected_tensors(c, layout, c["vocab_size"])
    assert set(ts) == set(exp)
    assert len(r.tensors) == tensor_count_formula(c, layout)
    for n, t in ts.items():
        assert ne(t) == exp[n], n
        assert QT(int(t.tensor_type)) in expected_type(n, exp[n], typ), (n, t.tensor_type)
    # GGUF data offsets are aligned
    for t in r.tensors:
        assert t.data_offset % 32 == 0


def test_reference_example_count():
    """The doc's example: a 3-layer V3 (1 dense) legacy file has 49 tensors."""
    c = cfg_of("v3")
    assert tensor_count_formula(c, "legacy") == 49
    assert tensor_count_formula(c, "mla") == 52


# ---------------------------------------------------------------------------------------------
# weights: layouts, HF, quantisation
# ---------------------------------------------------------------------------------------------


def f32_fixture(style: str) -> str:
    return next(n for n in FIXTURES if n.startswith(f"deepseek-{style}-tiny-F32-"))


@pytest.mark.parametrize("style", ["v2", "v3"])
def test_hf_equals_gguf(style):
    """model.safetensors (PyTorch [out, in]) == GGUF F32 tensors (ne reversed), experts stacked."""
    from safetensors.numpy import load_file
    hf = load_file(str(hf_dir(style) / "model.safetensors"))
    c = cfg_of(style)
    nh, dn, dv, kvl = c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    m = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    blk = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj",
           "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
           "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
           "attn_kv_b": "self_attn.kv_b_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate",
           "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
           "ffn_down_shexp": "mlp.shared_experts.down_proj"}
    seen = set()
    for fx in [n for n in FIXTURES if n.startswith(f"deepseek-{style}-tiny-F32-")]:
        for name, t in tensors(reader(fx)).items():
            a = as_float(t)
            base = name.rsplit(".", 1)[0]
            if base in m:
                hn = m[base] + ".weight"
                assert np.array_equal(a, hf[hn]), name
                seen.add(hn)
                continue
            _, il, kind = base.split(".")
            p = f"model.layers.{il}."
            if kind == "exp_probs_b":
                assert np.array_equal(a, hf[p + "mlp.gate.e_score_correction_bias"])
                seen.add(p + "mlp.gate.e_score_correction_bias")
            elif kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
                w = kind.split("_")[1]
                for e in range(a.shape[0]):
                    hn = p + f"mlp.experts.{e}.{w}_proj.weight"
                    assert np.array_equal(a[e], hf[hn]), (name, e)
                    seen.add(hn)
            elif kind in ("attn_k_b", "attn_v_b"):
                kvb = hf[p + "self_attn.kv_b_proj.weight"].reshape(nh, dn + dv, kvl)
                if kind == "attn_k_b":  # k_b[h][c][n] = kv_b[h*(dn+dv)+n][c]
                    assert np.array_equal(a.reshape(nh, kvl, dn), kvb[:, :dn, :].transpose(0, 2, 1)), name
                else:  # v_b[h][j][c] = kv_b[h*(dn+dv)+dn+j][c]
                    assert np.array_equal(a.reshape(nh, dv, kvl), kvb[:, dn:, :]), name
                seen.add(p + "self_attn.kv_b_proj.weight")
            else:
                hn = p + blk[kind] + ".weight"
                assert np.array_equal(a, hf[hn]), name
                seen.add(hn)
    assert seen == set(hf), set(hf) ^ seen


def test_layouts_same_weights(tmp_path):
    """v3 F32 mla file and the same weights regenerated in the ik layout (the
    committed ik fixture is F16 to keep the fixtures small): k_b/v_b identical
    bytes (2-D vs 3-D ne), ik's kv_b derives them, every other tensor identical."""
    ik_path = tmp_path / "ik.gguf"
    _regen(tmp_path, ["--style", "v3", "--attn-layout", "ik", "--type", "F32", "--seed", "1234", "-o", str(ik_path)])
    ts = {"mla": tensors(reader("deepseek-v3-tiny-F32-mla.gguf")), "ik": tensors(gguf.GGUFReader(str(ik_path)))}
    mla, ik = ts["mla"], ts["ik"]
    c = cfg_of("v3")
    nh, dn, dv, kvl = c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    for n, t in mla.items():
        assert np.array_equal(np.asarray(t.data).reshape(-1), np.asarray(ik[n].data).reshape(-1)), n
    for il in range(c["num_hidden_layers"]):
        kvb = as_float(ik[f"blk.{il}.attn_kv_b.weight"]).reshape(nh, dn + dv, kvl)
        k_b = as_float(mla[f"blk.{il}.attn_k_b.weight"])  # numpy [nh, kvl, dn]
        v_b = as_float(mla[f"blk.{il}.attn_v_b.weight"])  # numpy [nh, dv, kvl]
        assert np.array_equal(k_b, kvb[:, :dn, :].transpose(0, 2, 1))
        assert np.array_equal(v_b, kvb[:, dn:, :])
    assert set(ik) - set(mla) == {f"blk.{i}.attn_kv_b.weight" for i in range(c["num_hidden_layers"])}


@pytest.mark.parametrize("name", [n for n in FIXTURES if parse_name(n)[1] != "F32"])
def test_quantized_close_to_f32(name):
    style, typ, layout = parse_name(name)
    check_close_to_f32(style, tensors(reader(name)))


def check_close_to_f32(style: str, q: dict) -> None:
    ref = tensors(reader(f32_fixture(style)))
    for n, t in q.items():
        qt = QT(int(t.tensor_type))
        if n not in ref:
            continue
        a, b = as_float(t).reshape(-1), as_float(ref[n]).reshape(-1)  # ik 2-D vs mla 3-D: same order
        err = float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b * b)))
        if qt == QT.F32:
            assert err == 0.0, n
        else:
            assert 0 < err < RMS_BOUND[qt.name], (n, qt.name, err)


@pytest.mark.parametrize("typ", OTHER_TYPES)
@pytest.mark.parametrize("style", ["v2", "v3"])
def test_other_types_written(tmp_path, style, typ):
    """The types no fixture is committed in (tests/test_forward.py runs them through the
    forward pass): metadata file type, every tensor's type by the llama-quantize rules
    (K-quant fallbacks for short rows, Q6_K output) and its error against the F32 weights."""
    layout = {"v2": "legacy", "v3": "mla"}[style]
    out = tmp_path / f"deepseek-{style}-tiny-{typ}-{layout}.gguf"
    _regen(tmp_path, ["--style", style, "--attn-layout", layout, "--type", typ, "--seed", "1234", "-o", str(out)])
    r = gguf.GGUFReader(str(out))
    assert kv(r)["general.file_type"] == gd.FILE_TYPE[QT[typ]]
    c = cfg_of(style)
    exp = expected_tensors(c, layout, c["vocab_size"])
    ts = tensors(r)
    assert set(ts) == set(exp)
    for n, t in ts.items():
        assert ne(t) == exp[n], n
        assert QT(int(t.tensor_type)) in expected_type(n, exp[n], typ), (n, t.tensor_type)
    assert QT[typ] in {QT(int(t.tensor_type)) for t in r.tensors}
    check_close_to_f32(style, ts)


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


def _regen(tmp_path: Path, args: list[str]) -> None:
    subprocess.run([sys.executable, str(HERE / "gen_deepseek.py"), "-q"] + args, check=True, cwd=REPO)


def test_deterministic_f32_and_hf(tmp_path):
    """Regenerating the v2 F32 fixture (+ HF folder) gives the committed bytes."""
    out = tmp_path / "m.gguf"
    hf = tmp_path / "hf"
    _regen(tmp_path, ["--style", "v2", "--attn-layout", "legacy", "--type", "F32", "--seed", "1234",
                      "-o", str(out), "--hf-out", str(hf)])
    assert out.read_bytes() == (MODELS / "deepseek-v2-tiny-F32-legacy.gguf").read_bytes()
    for f in sorted(p.name for p in hf_dir("v2").iterdir()):
        assert (hf / f).read_bytes() == (hf_dir("v2") / f).read_bytes(), f


def test_deterministic_q8_0(tmp_path):
    out = tmp_path / "m.gguf"
    _regen(tmp_path, ["--style", "v3", "--attn-layout", "mla", "--type", "Q8_0", "--seed", "1234", "-o", str(out)])
    assert out.read_bytes() == (MODELS / "deepseek-v3-tiny-Q8_0-mla.gguf").read_bytes()


def test_deterministic_q4_k(tmp_path):
    build = Path(os.environ.get("NUMOE_BUILD", "build"))
    lib = (build if build.is_absolute() else REPO / build) / "lib" / "libnumoe_kernels.so"
    assert lib.is_file(), f"{lib} is not built: run `make` (the K-quant quantiser is numoe's C one)"
    out = tmp_path / "m.gguf"
    _regen(tmp_path, ["--style", "v3", "--attn-layout", "mla", "--type", "Q4_K", "--seed", "1234", "-o", str(out)])
    assert out.read_bytes() == (MODELS / "deepseek-v3-tiny-Q4_K-mla.gguf").read_bytes()


def test_weights_independent_of_layout_and_seed_sensitive():
    s = gd.SHAPES["tiny-v3"]
    a = gd.Weights(s, 324, 1234).full("model.layers.1.mlp.gate.weight", (8, 256))
    b = gd.Weights(s, 324, 1234).full("model.layers.1.mlp.gate.weight", (8, 256))
    c = gd.Weights(s, 324, 1235).full("model.layers.1.mlp.gate.weight", (8, 256))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # row-block generation: any row range equals the slice of the full tensor
    W = gd.Weights(dataclasses_replace(s, row_block=100), 324, 7)
    full = W.full("lm_head.weight", (324, 256))
    assert np.array_equal(W.rows("lm_head.weight", (324, 256), 90, 250), full[90:250])


def dataclasses_replace(s, **kw):
    import dataclasses
    return dataclasses.replace(s, **kw)


# ---------------------------------------------------------------------------------------------
# numerics: golden logits == numpy reference of the GGUF math
# ---------------------------------------------------------------------------------------------


def gguf_to_hf_weights(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """HF-named float weights rebuilt from a GGUF file alone (kv_b from k_b/v_b for mla)."""
    style, _, layout = parse_name(name)
    c = cfg_of(style)
    nh, dn, dv, kvl = c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    inv = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj",
           "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
           "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
           "attn_kv_b": "self_attn.kv_b_proj", "attn_output": "self_attn.o_proj",
           "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
           "ffn_up_shexp": "mlp.shared_experts.up_proj", "ffn_down_shexp": "mlp.shared_experts.down_proj"}
    W: dict[str, np.ndarray] = {}
    kb, vb = {}, {}
    for n, t in tensors(reader(name)).items():
        a = as_float(t)
        base = n.rsplit(".", 1)[0]
        if base == "token_embd":
            W["model.embed_tokens.weight"] = a
        elif base == "output":
            W["lm_head.weight"] = a
        elif base == "output_norm":
            W["model.norm.weight"] = a
        else:
            _, il, kind = base.split(".")
            p = f"model.layers.{il}."
            if kind == "exp_probs_b":
                W[p + "mlp.gate.e_score_correction_bias"] = a
            elif kind.endswith("_exps"):
                for e in range(a.shape[0]):
                    W[p + f"mlp.experts.{e}.{kind.split('_')[1]}_proj.weight"] = a[e]
            elif kind == "attn_k_b":
                kb[p] = a.reshape(nh, kvl, dn)
            elif kind == "attn_v_b":
                vb[p] = a.reshape(nh, dv, kvl)
            else:
                W[p + inv[kind] + ".weight"] = a
    for p in kb:
        if p + "self_attn.kv_b_proj.weight" not in W:
            W[p + "self_attn.kv_b_proj.weight"] = np.concatenate(
                [kb[p].transpose(0, 2, 1), vb[p]], axis=1).reshape(nh * (dn + dv), kvl)
    return c, W


def golden(style: str, sub: str = ""):
    """Golden of the float32 weights (sub "") or of a quantised file's de-quantised weights."""
    d = GOLDEN / (("dequant/" + sub) if sub else f"deepseek-{style}-tiny")
    assert (d / "meta.json").is_file(), f"no golden {d}: tests/make_golden.py writes it"
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    logits = np.load(d / meta["logits_file"])
    assert list(logits.shape) == meta["logits_shape"] and logits.dtype == np.float32
    return d, meta, logits


@pytest.mark.parametrize("name", FIXTURES)
def test_golden_matches_numpy_reference(name):
    """The transformers golden logits == float64 numpy implementation of reference section 5 run on
    the weights read back from the GGUF (all layouts; quantised files: their own golden, made from
    their de-quantised weights; the F16 file, whose weights are the F32 ones rounded: the F32 golden
    with a bound for that rounding)."""
    style, typ, _ = parse_name(name)
    d, meta, logits = golden(style, "" if typ in ("F32", "F16") else name[:-5])
    c, W = gguf_to_hf_weights(name)
    ids = meta["prompt_ids"] + meta["greedy_ids"]
    ref = mg.ref_forward(c, W, ids)
    if typ == "F16":
        assert np.max(np.abs(ref - logits)) < GOLDEN_ABS_F16
        assert np.array_equal(ref.argmax(-1), logits.argmax(-1))
        return
    assert name in meta["exact_for_gguf"]
    assert np.max(np.abs(ref - logits)) < GOLDEN_ABS
    # non-degenerate: logits O(1), softmax not one-hot
    assert 1.0 < float(logits.std()) < 6.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert 0.05 < float(p.max(-1).mean()) < 0.8
    assert len(set(meta["greedy_ids"])) > 8
    # greedy ids are the argmax of the stored logits
    n0 = meta["n_prompt"]
    assert [int(np.argmax(logits[n0 - 1 + k])) for k in range(meta["n_gen"])] == meta["greedy_ids"]
    if style == "v3" and typ == "F32":
        nog = np.load(d / meta["logits_nogroup_file"])
        assert np.max(np.abs(mg.ref_forward(c, W, ids, group_routing=False) - nog)) < GOLDEN_ABS
        assert np.max(np.abs(nog - logits)) > 1.0  # group routing matters in this model (measured 7.4)


def test_rope_and_scale_constants():
    """Reference section 5.3 numbers (V3 / V2 real configs) from the numpy reference."""
    v3 = {"qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rope_scaling": {"type": "yarn", "factor": 40, "mscale_all_dim": 1.0}}
    v2 = {"qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rope_scaling": {"type": "yarn", "factor": 40, "mscale_all_dim": 0.707}}
    assert mg.kq_scale(v3) == pytest.approx(0.1352338, rel=1e-6)
    assert mg.kq_scale(v2) == pytest.approx(0.1147214, rel=1e-5)
    # ramp bounds lo = 10, hi = 23 for d_rope 64, n_ctx_orig 4096, base 1e4, factor 40
    cfg = {"qk_rope_head_dim": 64, "rope_theta": 10000.0,
           "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096}}
    ang = mg.yarn_angles(cfg, 2)[1]
    base = 10000.0 ** (-2.0 * np.arange(32) / 64)
    assert np.allclose(ang[:11], base[:11]) and np.allclose(ang[23:], base[23:] / 40)
    assert not np.allclose(ang[11:23], base[11:23]) and not np.allclose(ang[11:23], base[11:23] / 40)


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def test_encoder_matches_llama_cpp_vocab_tests():
    """gen_deepseek.Tokenizer.encode on llama.cpp's own ggml-vocab-deepseek-llm test strings
    (the vocabulary and its .inp/.out cases are committed in tests/fixtures/vocab)."""
    v = VOCAB / "ggml-vocab-deepseek-llm.gguf"
    tok = gd.load_vocab_gguf(v, gd.CHAT_TEMPLATE_V2)
    inp = (VOCAB / (v.name + ".inp")).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    out = (VOCAB / (v.name + ".out")).read_text(encoding="utf-8").split("\n")
    n = 0
    for text, exp in zip(inp, out):
        assert tok.encode(text, add_bos=False, parse_special=False) == [int(x) for x in exp.split()], repr(text)
        n += 1
    assert n == len(inp) >= 40, (n, len(inp))


@pytest.mark.parametrize("style", ["v2", "v3"])
def test_tokenizer_fixture_consistency(style):
    """GGUF tokenizer == generator tokenizer == HF tokenizer.json (if tokenizers is installed) ==
    golden tokenize_cases."""
    tok = gd.build_tokenizer(gd.SHAPES[f"tiny-{style}"])
    m = kv(reader(f32_fixture(style)))
    assert list(m["tokenizer.ggml.tokens"]) == tok.tokens
    assert [int(x) for x in m["tokenizer.ggml.token_type"]] == tok.types
    assert list(m["tokenizer.ggml.merges"]) == tok.merges
    assert m["tokenizer.chat_template"] == tok.chat_template
    cases = [{"text": t} for t in mg.TOKENIZE_CASES]
    gcase = GOLDEN / f"deepseek-{style}-tiny" / "tokenize_cases.json"
    if gcase.is_file():
        cases = json.loads(gcase.read_text(encoding="utf-8"))
        for cse in cases:
            assert tok.encode(cse["text"]) == cse["ids"], cse["text"]
    tj = json.loads((hf_dir(style) / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["model"]["vocab"] == {t: i for i, t in enumerate(tok.tokens)}
    assert [" ".join(p) for p in tj["model"]["merges"]] == tok.merges
    from tokenizers import Tokenizer as HFTok  # tests/setup.sh installs it: a missing one is an error
    hft = HFTok.from_file(str(hf_dir(style) / "tokenizer.json"))
    for cse in cases:
        assert hft.encode(cse["text"]).ids == tok.encode(cse["text"]), cse["text"]
    # round trip
    text = "Hello world 深度学习 123"
    assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_chat_templates_render():
    """gen_deepseek's two templates give the published prompt formats, as transformers'
    apply_chat_template rendered them (tests/fixtures/chat/deepseek_chat.json, written by
    tests/make_chat_fixtures.py from these constants, recorded by sha256)."""
    import hashlib
    d = json.loads((HERE / "fixtures" / "chat" / "deepseek_chat.json").read_text(encoding="utf-8"))
    for fmt, tmpl in (("deepseek3", gd.CHAT_TEMPLATE_V3), ("deepseek2", gd.CHAT_TEMPLATE_V2)):
        assert d["sources"][fmt]["template_sha256"] == hashlib.sha256(tmpl.encode("utf-8")).hexdigest(), fmt
    cases = {(c["name"], c["add_generation_prompt"]): c for c in d["cases"]}
    S, U, A, V = "Answer briefly.", "Capital of France?", "Paris.", "And of Japan?"
    for fmt in ("deepseek3", "deepseek2"):
        assert [m["content"] for m in cases[(f"{fmt}/multi_turn_system", True)]["messages"]] == [S, U, A, V]
    assert cases[("deepseek3/multi_turn_system", True)]["expected"] == \
        f"{gd.BOS_TEXT}{S}<｜User｜>{U}<｜Assistant｜>{A}<｜end▁of▁sentence｜><｜User｜>{V}<｜Assistant｜>"
    assert cases[("deepseek2/multi_turn_system", True)]["expected"] == \
        f"{gd.BOS_TEXT}{S}\n\nUser: {U}\n\nAssistant: {A}{gd.EOS_TEXT}User: {V}\n\nAssistant:"


# ---------------------------------------------------------------------------------------------
# transformers itself (needs torch)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
                    reason="torch/transformers not installed: their stored golden logits stand in "
                           "(test_golden_matches_numpy_reference checks them against the float64 reference)")
@pytest.mark.parametrize("style", ["v2", "v3"])
def test_transformers_reproduces_golden(style):
    import torch
    import transformers
    d, meta, logits = golden(style)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir(style)), dtype=torch.float32,
                                                              attn_implementation="eager")
    assert type(model).__name__ == meta["hf_class"]
    with torch.no_grad():
        out = model(torch.tensor([meta["prompt_ids"] + meta["greedy_ids"]])).logits[0].numpy()
    # not bit-exact run to run (CPU kernels, threads): measured 1.43e-5 (v2) / 1.22e-5 (v3)
    assert np.max(np.abs(out - logits)) < 3e-5


# ---------------------------------------------------------------------------------------------
# speed-only models (--random-blocks)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("typ", ["Q4_K", "Q8_0", "Q2_K", "Q6_K", "F16"])
def test_random_blocks_same_plan(tmp_path, typ, numoe):
    """--random-blocks writes the same tensors (names, shapes, types, bytes) as the real plan, with every
    block scale finite and small, and numoe evaluates it to finite logits."""
    real, fast = tmp_path / "real.gguf", tmp_path / "fast.gguf"
    common = ["--style", "v3", "--attn-layout", "mla", "--type", typ, "--q-lora", "64"]
    _regen(tmp_path, common + ["-o", str(real)])
    _regen(tmp_path, common + ["--random-blocks", "-o", str(fast)])
    a, b = tensors(gguf.GGUFReader(str(real))), tensors(gguf.GGUFReader(str(fast)))
    assert sorted(a) == sorted(b)
    assert kv(gguf.GGUFReader(str(fast)))[f"{ARCH}.attention.q_lora_rank"] == 64
    for name in a:
        ta, tb = a[name], b[name]
        assert (ne(ta), ta.tensor_type, ta.n_bytes) == (ne(tb), tb.tensor_type, tb.n_bytes), name
        w = as_float(tb)
        assert np.isfinite(w).all(), name
        if name.endswith("_norm.weight"):
            assert (w == 1).all(), name
        elif len(ne(tb)) > 1:
            assert 0 < np.abs(w).mean() < 0.1, (name, float(np.abs(w).mean()))
            # zero-mean: a common component in every row would send all tokens to the same experts
            assert abs(float(w.mean())) < 0.1 * float(w.std()), (name, float(w.mean()), float(w.std()))
    out = subprocess.run([numoe, "generate", "-m", str(fast), "--tokens", "1,2,3", "-n", "2", "--workers", "0",
                          "--gpu", "none", "--dump-logits", str(tmp_path / "l.bin")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    logits = np.fromfile(tmp_path / "l.bin", np.float32)
    assert logits.size > 0 and np.isfinite(logits).all()


def test_random_blocks_route_widely(tmp_path, numoe):
    """A speed-only model routes like real traffic: over 128 random tokens every MoE layer of a
    V2-Lite-width file sends tokens to most of its 64 experts (files whose blocks had a common mean
    sent every token to the same 6, which let engines that copy only the used experts skip 90%)."""
    m = tmp_path / "m.gguf"
    _regen(tmp_path, ["--shape", "v2-lite", "--layers", "3", "--type", "Q4_K", "--random-blocks", "-o", str(m)])
    rng = np.random.default_rng(1)
    toks = ",".join(str(int(t)) for t in rng.integers(100, 100000, 128))
    routes = tmp_path / "r.bin"
    out = subprocess.run([numoe, "generate", "-m", str(m), "--tokens", toks, "-n", "1", "--workers", "0",
                          "--gpu", "none", "--dump-routing", str(routes)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rec = np.fromfile(routes, np.int32).reshape(-1, 2 + 6)  # position, layer, the 6 expert ids
    layers = sorted(set(rec[:, 1].tolist()))
    assert layers == [1, 2]
    for il in layers:
        ids = rec[rec[:, 1] == il][:, 2:]
        used = np.bincount(ids.ravel(), minlength=64)
        assert (used > 0).sum() >= 48, (il, used.tolist())
        assert np.sort(used)[-6:].sum() < 0.3 * ids.size, (il, used.tolist())  # uniform: ~0.14


def _top2_shares(tmp_path, numoe, model):
    rng = np.random.default_rng(1)
    toks = ",".join(str(int(t)) for t in rng.integers(10, 250, 128))
    routes = tmp_path / (model.stem + ".bin")
    out = subprocess.run([numoe, "generate", "-m", str(model), "--tokens", toks, "-n", "1", "--workers", "0",
                          "--gpu", "none", "--dump-routing", str(routes)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rec = np.fromfile(routes, np.int32).reshape(-1, 2 + 3)  # tiny-v3: 3 of 8 experts per token
    shares = []
    for il in sorted(set(rec[:, 1].tolist())):
        ids = rec[rec[:, 1] == il][:, 2:]
        shares.append(float(np.sort(np.bincount(ids.ravel(), minlength=8))[-2:].sum() / ids.size))
    return shares


def test_route_skew(tmp_path, numoe):
    """--route-skew S skews a speed-only model's routing through the router's expert bias: over 128
    random tokens the 2 busiest of 8 experts take > 40% of every MoE layer's picks with S = 1
    (measured 0.44 / 0.60), against < 35% balanced (measured 0.28 / 0.30; uniform 0.25); refused where
    there is no expert bias (V2 softmax gating) or without --random-blocks."""
    flat, skew = tmp_path / "flat.gguf", tmp_path / "skew.gguf"
    _regen(tmp_path, ["--shape", "tiny-v3", "--type", "Q8_0", "--random-blocks", "-o", str(flat)])
    _regen(tmp_path, ["--shape", "tiny-v3", "--type", "Q8_0", "--random-blocks", "--route-skew", "1", "-o", str(skew)])
    assert all(x < 0.35 for x in _top2_shares(tmp_path, numoe, flat))
    assert all(x > 0.40 for x in _top2_shares(tmp_path, numoe, skew))
    for bad in (["--shape", "tiny-v2", "--random-blocks"], ["--shape", "tiny-v3"]):
        r = subprocess.run([sys.executable, str(HERE / "gen_deepseek.py"), *bad, "--route-skew", "1", "-o",
                            str(tmp_path / "x.gguf")], capture_output=True, text=True)
        assert r.returncode != 0 and "--route-skew needs" in r.stderr, (bad, r.stderr)


def test_v3_width_needs_random_blocks(tmp_path):
    r = subprocess.run([sys.executable, str(HERE / "gen_deepseek.py"), "--shape", "v3-width", "--layers", "4",
                        "-o", str(tmp_path / "m.gguf")], capture_output=True, text=True)
    assert r.returncode != 0 and "--random-blocks" in r.stderr
