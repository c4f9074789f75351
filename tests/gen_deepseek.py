#!/usr/bin/env python3
"""gen_deepseek.py - synthetic DeepSeek-V2/V3 models in GGUF (+ the same weights as a HF folder).

Writes `general.architecture = deepseek2` GGUF files the way llama.cpp's converter
(convert_hf_to_gguf.py / conversion/deepseek.py, class DeepseekV2Model) and llama-quantize
write them: same metadata keys (through gguf.GGUFWriter's add_* helpers), tensor names,
ggml `ne` shapes and type rules (1-D tensors, *_norm.weight, *.bias and ffn_gate_inp stay
F32). See docs/MODEL.md sections 2, 3, 5, 6.

Styles
  v2  DeepSeek-V2-Lite-like: softmax gating (expert_gating_func 1), no Q compression
      (attn_q, no q_lora_rank key), no exp_probs_b, expert_weights_norm false, 1 expert group,
      2 shared experts, tokenizer.ggml.pre "deepseek-llm", BOS/EOS after the normal tokens.
  v3  DeepSeek-V3-like: sigmoid gating (2) with exp_probs_b.bias, q_lora (attn_q_a,
      attn_q_a_norm, attn_q_b), group-limited routing (2 groups of 4 experts, keep 1, top-3 ->
      HF "noaux_tc": group score = sum of the 2 best scores of the group), expert_weights_norm
      true, expert_weights_scale 2.5, tokenizer.ggml.pre "deepseek-v3", BOS 0 / EOS 1.
  Both: YaRN (rope.scaling.type yarn, factor 4, original_context_length 128,
      yarn_log_multiplier = 0.1*mscale_all_dim), 1 leading dense layer + 2 MoE layers,
      context_length 512, rms eps 1e-6, hidden 256 (so K-quants apply to rows of H).

Attention layouts (--attn-layout, reference section 3.3); the same weights in all three:
  legacy  attn_kv_b only; head_count_kv = n_head, key_length = d_nope+d_rope, value_length = d_v
  ik      attn_kv_b + 2-D attn_k_b [d_nope, n_head*kv_lora] / attn_v_b [kv_lora, n_head*d_v]
  mla     mainline: 3-D attn_k_b [d_nope, kv_lora, n_head] / attn_v_b [kv_lora, d_v, n_head]
          only; head_count_kv 1, key_length kv_lora+d_rope, value_length kv_lora,
          key_length_mla d_nope+d_rope, value_length_mla d_v
  k_b[h][c][n] = kv_b[h*(d_nope+d_v)+n][c],  v_b[h][j][c] = kv_b[h*(d_nope+d_v)+d_nope+j][c]
  (exactly the converter's view/split/transpose of kv_b_proj).

Types (--type): F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 (numpy, gguf.quants - bit-exact with
ggml's reference quantisers) and Q2_K Q3_K Q4_K Q5_K Q6_K (numoe's C quantiser
nm_quantize_row from $NUMOE_BUILD/lib/libnumoe_kernels.so, NUMOE_BUILD defaults to build/;
gguf-py cannot quantise K types). Type rules:
  * 1-D, *_norm.weight, *.bias, ffn_gate_inp.weight: always F32.
  * F16/BF16/Q8_0 = `convert_hf_to_gguf.py --outtype`: every other matrix in that type
    (token_embd and output included).
  * the others emulate llama-quantize from an F32 source, simplified to "every matrix in the
    requested type" (no Q4_K_M-style per-layer upgrades):
      - output.weight -> Q6_K (Q8_0 if its row is not a multiple of 256), like llama-quantize;
      - K-quant rows (ne[0]) that are not a multiple of 256 fall back like llama-quantize:
        Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; Q2_K/Q3_K -> Q4_0 (llama.cpp uses IQ4_NL,
        which numoe does not implement yet); any type whose block does not divide the row -> F16.
      - token_embd gets the requested type (llama-quantize does the same for these mixes).
  general.file_type: F32 0, F16 1, BF16 32, Q8_0 7, Q4_0 2, Q4_1 3, Q5_0 8, Q5_1 9,
  Q2_K 10, Q3_K 11 (Q3_K_S), Q4_K 14 (Q4_K_S), Q5_K 16 (Q5_K_S), Q6_K 18.

Known deviations from the real converters (all deliberate, keep the files uniform):
  * every layout gets the mainline key set: expert_group_count/_used_count and
    rope.scaling.yarn_beta_fast/slow are written for legacy/ik files too (the ik converter and
    pre-2025 mainline omit them), expert_weights_norm is written even when false (mainline
    omits it then, ik writes it);
  * tensors are written in model order (token_embd, blk.0 ..., output_norm, output) rather than
    the safetensors-shard order the converter happens to iterate;
  * the tokenizer is a tiny byte-level BPE trained here (see Tokenizer), not DeepSeek's.

Weights are N(0, 1/fan_in)-scaled so activations stay O(1); norm weights 1 + 0.1 N(0,1); the
router has gain 2 (routing is decisive but not one-hot); lm_head gain 2.5 (logit std ~2);
e_score_correction_bias ~ N(0, 0.1). Every HF tensor is drawn from its own PCG64 stream seeded
by (seed, crc32(hf name), row block), so a tensor never depends on generation order, layout or
output type, and the big model can be generated block by block.

HF folder (--hf-out DIR): config.json with the published deepseek-ai config keys, model.safetensors
(float32, HF names, PyTorch [out, in]), tokenizer.json (tokenizers ByteLevel BPE, same vocab and
merges, no normaliser, the same split regexes llama.cpp uses), tokenizer_config.json,
generation_config.json. RoPE: the GGUF weights are not permuted; ggml rotates adjacent pairs
(x[2i], x[2i+1]). transformers 5.x DeepseekV3 does the same when config.rope_interleave is true
(`apply_rotary_pos_emb_interleave`, the default; older transformers / the remote code
de-interleave with view+transpose and then rotate_half, which gives identical attention scores);
we write "rope_interleave": true explicitly. transformers' DeepseekV2 rotates adjacent pairs as
complex numbers (view_as_complex), also identical. The YaRN cos/sin magnitude
(mscale/mscale_all_dim) is 1 because mscale == mscale_all_dim, as in every released config.
--hf-dequant writes the de-quantised weights of the GGUF just written instead of the float32
originals (for the mla layout kv_b_proj is reassembled from the de-quantised attn_k_b/attn_v_b).

Big benchmark model: --shape v2-lite (DeepSeek-V2-Lite shapes, 15.7 B parameters) is written
tensor by tensor and row block by row block (never more than one block of weights in RAM); K
types are quantised through the C library by a small thread pool. It uses the real DeepSeek-LLM
vocabulary from tests/fixtures/vocab/ggml-vocab-deepseek-llm.gguf when that file exists (else the tiny
BPE padded with [PADn] UNUSED tokens). No HF folder for it.

Usage:
  python3 tests/gen_deepseek.py --style v3 --type F32 --attn-layout mla -o out.gguf --hf-out hf_dir
  python3 tests/gen_deepseek.py --shape v2-lite --type Q4_K -o /data/v2lite-q4k.gguf
"""
from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import dataclasses
import json
import math
import os
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

try:
    import gguf
    from gguf import GGMLQuantizationType as QT
except ImportError as exc:  # pragma: no cover
    raise SystemExit(f"gen_deepseek.py needs the 'gguf' package (pip install gguf): {exc}")

REPO_ROOT = Path(__file__).resolve().parent.parent
GEN_VERSION = 1  # bump when the output of a given command line changes

# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    style: str  # "v2" | "v3"
    hidden: int
    n_layer: int
    n_dense: int
    n_head: int
    q_lora: int  # 0 = no Q compression (attn_q)
    kv_lora: int
    d_nope: int
    d_rope: int
    d_v: int
    n_ff: int
    n_ff_exp: int
    n_expert: int
    n_used: int
    n_shared: int
    n_group: int
    topk_group: int
    scale: float  # routed_scaling_factor
    norm_topk: bool
    ctx: int  # max_position_embeddings = context_length
    orig_ctx: int
    yarn_factor: float
    mscale_all_dim: float
    rope_theta: float = 10000.0
    eps: float = 1e-6
    n_merges: int = 62  # tiny tokenizer: merges learned
    vocab_size: int = 0  # 0: len(tokenizer tokens)
    row_block: int = 4096  # rows per RNG block

    @property
    def d_k(self) -> int:
        return self.d_nope + self.d_rope

    @property
    def gating(self) -> int:
        return 2 if self.style == "v3" else 1


SHAPES: dict[str, Shape] = {
    # ~0.9-1.0 M parameters each: F32 GGUF 3.7-4 MB. kv_lora != d_nope and q_lora != kv_lora so
    # that confusing them cannot go unnoticed.
    "tiny-v2": Shape(name="tiny-v2", style="v2", hidden=256, n_layer=3, n_dense=1, n_head=2, q_lora=0,
                     kv_lora=64, d_nope=32, d_rope=16, d_v=32, n_ff=64, n_ff_exp=32, n_expert=8,
                     n_used=2, n_shared=2, n_group=1, topk_group=1, scale=2.0, norm_topk=False,
                     ctx=512, orig_ctx=128, yarn_factor=4.0, mscale_all_dim=0.707),
    "tiny-v3": Shape(name="tiny-v3", style="v3", hidden=256, n_layer=3, n_dense=1, n_head=4, q_lora=96,
                     kv_lora=64, d_nope=32, d_rope=16, d_v=32, n_ff=64, n_ff_exp=32, n_expert=8,
                     n_used=3, n_shared=1, n_group=2, topk_group=1, scale=2.5, norm_topk=True,
                     ctx=512, orig_ctx=128, yarn_factor=4.0, mscale_all_dim=1.0),
    # DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite config.json).
    "v2-lite": Shape(name="v2-lite", style="v2", hidden=2048, n_layer=27, n_dense=1, n_head=16, q_lora=0,
                     kv_lora=512, d_nope=128, d_rope=64, d_v=128, n_ff=10944, n_ff_exp=1408, n_expert=64,
                     n_used=6, n_shared=2, n_group=1, topk_group=1, scale=1.0, norm_topk=False,
                     ctx=163840, orig_ctx=4096, yarn_factor=40.0, mscale_all_dim=0.707,
                     vocab_size=102400),
    # DeepSeek-V3 / R1 width (deepseek-ai/DeepSeek-V3 config.json); the full model has 61 layers.
    # For speed benchmarks only: written with --random-blocks (see there), any --layers.
    "v3-width": Shape(name="v3-width", style="v3", hidden=7168, n_layer=61, n_dense=3, n_head=128, q_lora=1536,
                      kv_lora=512, d_nope=128, d_rope=64, d_v=128, n_ff=18432, n_ff_exp=2048, n_expert=256,
                      n_used=8, n_shared=1, n_group=8, topk_group=4, scale=2.5, norm_topk=True,
                      ctx=163840, orig_ctx=4096, yarn_factor=40.0, mscale_all_dim=1.0,
                      vocab_size=129280),
}

# --------------------------------------------------------------------------------------------
# tokenizer: tiny byte-level BPE (GPT-2 bytes_to_unicode), trained deterministically
# --------------------------------------------------------------------------------------------

BOS_TEXT = "<｜begin▁of▁sentence｜>"
EOS_TEXT = "<｜end▁of▁sentence｜>"
V3_EXTRA_SPECIALS = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]

# Pre-tokenizer regexes of llama.cpp src/llama-vocab.cpp (reference section 6), C escapes removed.
# They are also the HF tokenizer.json Split patterns of the real DeepSeek tokenizers.
# Six letters of the deepseek-llm class are canonical singletons (U+1F7D, U+1FBE, U+1FD3, U+1FDB,
# U+2126, U+212A) and are written as \u escapes so that no editor's NFC normalisation breaks them.
PRE_REGEX = {
    "deepseek-llm": [
        "[\r\n]",
        "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
        "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
        "\\s+$",
        "[一-龥ࠀ-一가-퟿]+",
        "\\p{N}+",
    ],
    "deepseek-v3": [
        "\\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ],
}

# DeepSeek-V3-0324 tokenizer_config.json chat_template (as found in its GGUF metadata).
CHAT_TEMPLATE_V3 = (
    r"""{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true, is_last_user=false) %}{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{%- set ns.is_first = false -%}{%- set ns.is_last_user = true -%}{{'<｜User｜>' + message['content'] + '<｜Assistant｜>'}}{%- endif %}{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] is not none %}{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{%- endif %}{%- set ns.is_first = false %}{%- set ns.is_tool = false -%}{%- set ns.is_output_first = true %}{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %}{{message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- set ns.is_first = true -%}{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- if message['role'] == 'assistant' and (message['tool_calls'] is not defined or message['tool_calls'] is none)%}{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{{content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_last_user = false -%}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_last_user and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"""
)

# DeepSeek-V2(-Lite)-Chat / DeepSeek-LLM-chat tokenizer_config.json chat_template.
CHAT_TEMPLATE_V2 = (
    r"""{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"""
)

# Built-in training text for the tiny BPE (English, code, Chinese).
TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran into the forest.
In the beginning there was the model, and the model was large; then the experts were routed and the
tokens were many. A mixture of experts sends every token to the best experts of the layer, and the
shared expert sees all of them. The attention of the model is compressed into a latent vector, and the
latent vector is what the cache holds. We measure the speed of the engine in tokens per second, and the
memory bandwidth of the machine is the bound for the decode speed. The weights are quantized in blocks
of thirty-two or two hundred fifty-six values, and the blocks are read once for every token.
Once upon a time there was a little engine that wanted to run the largest model on a single machine.
It read the weights, it computed the experts on the processor, and it kept the attention on the device.
def forward(self, x):
    for layer in self.layers:
        x = x + layer.attention(layer.norm(x))
        x = x + layer.mlp(layer.ffn_norm(x))
    return self.output(self.norm(x))

int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        printf("%d: %s\\n", i, argv[i]);
    }
    return 0;
}
for (size_t i = 0; i < n; i++) sum += x[i] * y[i];
if (rc != 0) { fprintf(stderr, "error: %s\\n", strerror(errno)); return -1; }
深度学习模型的推理速度取决于内存带宽。专家混合模型的每个词元只激活少数专家。
我们的引擎在处理器上计算专家，在显卡上计算注意力。模型的权重按块量化。
今天天气很好，我们去公园散步。学习语言模型的人越来越多。
The numbers 1, 2, 3, 42, 128, 256, 1024 and 65536 appear in the text as well as 3.14159 and 2.71828.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map (printable bytes first, in vocabulary order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _regex():
    try:
        import regex  # \p{L} etc.
    except ImportError as exc:  # pragma: no cover
        raise SystemExit(f"gen_deepseek.py needs the 'regex' package for the tokenizer: {exc}")
    return regex


def pretokenize(text: str, pre: str) -> list[str]:
    """llama.cpp unicode_regex_split: each regex splits every current piece into matched and
    unmatched parts (both kept), in order."""
    rx = _regex()
    pieces = [text]
    for pat in PRE_REGEX[pre]:
        cre = rx.compile(pat)
        out: list[str] = []
        for p in pieces:
            pos = 0
            for m in cre.finditer(p):
                if m.end() == m.start():
                    continue
                if m.start() > pos:
                    out.append(p[pos:m.start()])
                out.append(m.group())
                pos = m.end()
            if pos < len(p):
                out.append(p[pos:])
        pieces = out
    return pieces


@dataclasses.dataclass
class Tokenizer:
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    pad_id: int
    chat_template: str

    @property
    def specials(self) -> list[tuple[int, str]]:
        return [(i, t) for i, (t, ty) in enumerate(zip(self.tokens, self.types)) if ty == gguf.TokenType.CONTROL]

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's gpt2 BPE tokenisation (reference section 6)."""
        b2u = bytes_to_unicode()
        ids = {t: i for i, t in enumerate(self.tokens)}
        ranks = {tuple(m.split(" ")): r for r, m in enumerate(self.merges)}
        frags: list[tuple[bool, str]] = [(False, text)]
        # llama.cpp tokenizer_st_partition: CONTROL tokens only with parse_special, USER_DEFINED always
        split = [t for t, ty in zip(self.tokens, self.types)
                 if ty == gguf.TokenType.USER_DEFINED or (parse_special and ty == gguf.TokenType.CONTROL)]
        if split:
            for sp in sorted(split, key=lambda x: -len(x)):
                nf: list[tuple[bool, str]] = []
                for is_sp, f in frags:
                    if is_sp:
                        nf.append((is_sp, f))
                        continue
                    parts = f.split(sp)
                    for k, part in enumerate(parts):
                        if k:
                            nf.append((True, sp))
                        if part:
                            nf.append((False, part))
                frags = nf
        out = [self.bos_id] if add_bos else []
        for is_sp, f in frags:
            if is_sp:
                out.append(ids[f])
                continue
            for piece in pretokenize(f, self.pre):
                word = [b2u[b] for b in piece.encode("utf-8")]
                while len(word) > 1:
                    best = None
                    for k in range(len(word) - 1):
                        r = ranks.get((word[k], word[k + 1]))
                        if r is not None and (best is None or r < best[0]):
                            best = (r, k)
                    if best is None:
                        break
                    k = best[1]
                    word = word[:k] + [word[k] + word[k + 1]] + word[k + 2:]
                for sym in word:
                    if sym in ids:
                        out.append(ids[sym])
                    else:  # not reachable with a complete byte alphabet
                        out.extend(ids[b2u[b]] for b in sym.encode("utf-8"))
        return out

    def decode(self, ids_: list[int]) -> str:
        u2b = {u: b for b, u in bytes_to_unicode().items()}
        out = bytearray()
        for i in ids_:
            t = self.tokens[i]
            if self.types[i] == gguf.TokenType.CONTROL:
                out += t.encode("utf-8")
            else:
                out += bytes(u2b[c] for c in t)
        return out.decode("utf-8", errors="replace")


def train_bpe(text: str, pre: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training on pre-tokenised words; ties broken by the pair's text (deterministic)."""
    b2u = bytes_to_unicode()
    words = Counter(tuple(b2u[b] for b in p.encode("utf-8")) for p in pretokenize(text, pre))
    merges: list[tuple[str, str]] = []
    vocab = set(b2u.values())
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for w, c in words.items():
            for k in range(len(w) - 1):
                pairs[(w[k], w[k + 1])] += c
        cands = [(-c, p) for p, c in pairs.items() if p[0] + p[1] not in vocab]
        if not cands:
            break
        _, best = min(cands)
        merges.append(best)
        vocab.add(best[0] + best[1])
        nw: Counter = Counter()
        for w, c in words.items():
            out: list[str] = []
            k = 0
            while k < len(w):
                if k + 1 < len(w) and (w[k], w[k + 1]) == best:
                    out.append(w[k] + w[k + 1])
                    k += 2
                else:
                    out.append(w[k])
                    k += 1
            nw[tuple(out)] += c
        words = nw
    return merges


def build_tokenizer(shape: Shape, text: str = TRAIN_TEXT) -> Tokenizer:
    """The tiny BPE of a shape, its merges learned from `text` (the built-in TRAIN_TEXT for the
    synthetic fixtures; tests/train_demo.py passes its corpus)."""
    pre = "deepseek-v3" if shape.style == "v3" else "deepseek-llm"
    merges = train_bpe(text, pre, shape.n_merges)
    body = list(bytes_to_unicode().values()) + [a + b for a, b in merges]
    N, C = int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL)
    if shape.style == "v3":
        tokens = [BOS_TEXT, EOS_TEXT] + body + V3_EXTRA_SPECIALS
        types = [C, C] + [N] * len(body) + [C] * len(V3_EXTRA_SPECIALS)
        bos, eos, tmpl = 0, 1, CHAT_TEMPLATE_V3
    else:
        tokens = body + [BOS_TEXT, EOS_TEXT]
        types = [N] * len(body) + [C, C]
        bos, eos, tmpl = len(body), len(body) + 1, CHAT_TEMPLATE_V2
    if shape.vocab_size and shape.vocab_size > len(tokens):
        # pad like the converter does for ids the tokenizer does not define
        if shape.style == "v2":  # keep BOS/EOS right after the normal tokens (V2: 100000/100001)
            tokens = tokens[:bos]
            types = types[:bos]
            pad_n = shape.vocab_size - len(tokens) - 2
            tokens += [BOS_TEXT, EOS_TEXT] + [f"[PAD{len(tokens) + 2 + i}]" for i in range(pad_n)]
            types += [C, C] + [int(gguf.TokenType.UNUSED)] * pad_n
        else:
            n0 = len(tokens)
            tokens += [f"[PAD{n0 + i}]" for i in range(shape.vocab_size - n0)]
            types += [int(gguf.TokenType.UNUSED)] * (shape.vocab_size - n0)
    return Tokenizer(pre=pre, tokens=tokens, types=types, merges=[f"{a} {b}" for a, b in merges],
                     bos_id=bos, eos_id=eos, pad_id=eos, chat_template=tmpl)


def load_vocab_gguf(path: Path, chat_template: str) -> Tokenizer:
    """Tokenizer taken from a llama.cpp ggml-vocab-*.gguf (real DeepSeek vocabulary)."""
    r = gguf.GGUFReader(str(path))

    def field(k):
        return r.fields[k].contents()

    return Tokenizer(pre=field("tokenizer.ggml.pre"), tokens=list(field("tokenizer.ggml.tokens")),
                     types=[int(t) for t in field("tokenizer.ggml.token_type")],
                     merges=list(field("tokenizer.ggml.merges")), bos_id=int(field("tokenizer.ggml.bos_token_id")),
                     eos_id=int(field("tokenizer.ggml.eos_token_id")),
                     pad_id=int(field("tokenizer.ggml.padding_token_id")), chat_template=chat_template)


def tokenizer_json(tok: Tokenizer) -> dict:
    """HF tokenizers' tokenizer.json for the same byte-level BPE (format of tokenizers 0.2x)."""
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in tok.specials]
    bos = tok.tokens[tok.bos_id]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False}
                              for p in PRE_REGEX[tok.pre]]
            + [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tok.tokens)},
            "merges": [m.split(" ") for m in tok.merges],
        },
    }


# --------------------------------------------------------------------------------------------
# weights (HF names, PyTorch [out, in], float32)
# --------------------------------------------------------------------------------------------


class Weights:
    """Deterministic synthetic weights, addressed by HF tensor name, generated in row blocks."""

    LOGIT_GAIN = 2.5
    ROUTER_GAIN = 2.0
    BIAS_STD = 0.1
    NORM_NOISE = 0.1

    def __init__(self, shape: Shape, vocab: int, seed: int):
        self.s = shape
        self.vocab = vocab
        self.seed = seed

    # ---- the list of HF tensors with shapes
    def hf_names(self) -> list[tuple[str, tuple[int, ...]]]:
        s = self.s
        H = s.hidden
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, H))]
        for i in range(s.n_layer):
            p = f"model.layers.{i}."
            out.append((p + "input_layernorm.weight", (H,)))
            if s.q_lora:
                out += [(p + "self_attn.q_a_proj.weight", (s.q_lora, H)),
                        (p + "self_attn.q_a_layernorm.weight", (s.q_lora,)),
                        (p + "self_attn.q_b_proj.weight", (s.n_head * s.d_k, s.q_lora))]
            else:
                out.append((p + "self_attn.q_proj.weight", (s.n_head * s.d_k, H)))
            out += [(p + "self_attn.kv_a_proj_with_mqa.weight", (s.kv_lora + s.d_rope, H)),
                    (p + "self_attn.kv_a_layernorm.weight", (s.kv_lora,)),
                    (p + "self_attn.kv_b_proj.weight", (s.n_head * (s.d_nope + s.d_v), s.kv_lora)),
                    (p + "self_attn.o_proj.weight", (H, s.n_head * s.d_v)),
                    (p + "post_attention_layernorm.weight", (H,))]
            if i < s.n_dense:
                out += [(p + "mlp.gate_proj.weight", (s.n_ff, H)), (p + "mlp.up_proj.weight", (s.n_ff, H)),
                        (p + "mlp.down_proj.weight", (H, s.n_ff))]
            else:
                out.append((p + "mlp.gate.weight", (s.n_expert, H)))
                if s.style == "v3":
                    out.append((p + "mlp.gate.e_score_correction_bias", (s.n_expert,)))
                for e in range(s.n_expert):
                    q = p + f"mlp.experts.{e}."
                    out += [(q + "gate_proj.weight", (s.n_ff_exp, H)), (q + "up_proj.weight", (s.n_ff_exp, H)),
                            (q + "down_proj.weight", (H, s.n_ff_exp))]
                fs = s.n_ff_exp * s.n_shared
                out += [(p + "mlp.shared_experts.gate_proj.weight", (fs, H)),
                        (p + "mlp.shared_experts.up_proj.weight", (fs, H)),
                        (p + "mlp.shared_experts.down_proj.weight", (H, fs))]
        out += [("model.norm.weight", (H,)), ("lm_head.weight", (self.vocab, H))]
        return out

    def _rng(self, name: str, block: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [self.seed, zlib.crc32(name.encode()), block, GEN_VERSION])))

    def _std_mean(self, name: str, shape: tuple[int, ...]) -> tuple[float, float]:
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            return self.NORM_NOISE, 1.0
        if name.endswith("e_score_correction_bias"):
            return self.BIAS_STD, 0.0
        if name == "model.embed_tokens.weight":
            return 1.0, 0.0
        fan_in = shape[1]
        gain = 1.0
        if name == "lm_head.weight":
            gain = self.LOGIT_GAIN
        elif name.endswith("mlp.gate.weight"):
            gain = self.ROUTER_GAIN
        return gain / math.sqrt(fan_in), 0.0

    def rows(self, name: str, shape: tuple[int, ...], r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of tensor `name` (1-D tensors: elements), float32."""
        std, mean = self._std_mean(name, shape)
        ncol = shape[1] if len(shape) == 2 else 1
        R = self.s.row_block
        parts = []
        b = r0 // R
        while b * R < r1:
            lo, hi = max(r0, b * R), min(r1, (b + 1) * R)
            nrow_b = min(R, shape[0] - b * R)
            blk = self._rng(name, b).standard_normal((nrow_b, ncol), dtype=np.float32)
            parts.append(blk[lo - b * R:hi - b * R])
            b += 1
        a = np.concatenate(parts, axis=0) if len(parts) != 1 else parts[0]
        a = (a * np.float32(std) + np.float32(mean)).astype(np.float32)
        return a.reshape(-1) if len(shape) == 1 else a

    def full(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return self.rows(name, shape, 0, shape[0])


# --------------------------------------------------------------------------------------------
# types and quantisation
# --------------------------------------------------------------------------------------------

TYPE_NAMES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
K_TYPES = {QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K}
CONVERTER_TYPES = {QT.F32, QT.F16, QT.BF16, QT.Q8_0}  # convert_hf_to_gguf --outtype
K_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0, QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0}
FILE_TYPE = {QT.F32: 0, QT.F16: 1, QT.BF16: 32, QT.Q8_0: 7, QT.Q4_0: 2, QT.Q4_1: 3, QT.Q5_0: 8, QT.Q5_1: 9,
             QT.Q2_K: 10, QT.Q3_K: 11, QT.Q4_K: 14, QT.Q5_K: 16, QT.Q6_K: 18}


def row_bytes(qt: QT, n: int) -> int:
    bs, ts = gguf.GGML_QUANT_SIZES[qt]
    assert n % bs == 0, (qt, n)
    return n // bs * ts


def tensor_type(gname: str, ne: list[int], want: QT) -> QT:
    """Type of GGUF tensor `gname` (ne in ggml order) in a file of requested type `want`."""
    if len(ne) == 1 or gname.endswith("_norm.weight") or gname.endswith(".bias") or ".ffn_gate_inp." in gname:
        return QT.F32
    if want in CONVERTER_TYPES:
        t = want
    elif gname == "output.weight":
        t = QT.Q6_K
    else:
        t = want
    if t in K_TYPES and ne[0] % 256 != 0:
        t = QT.Q8_0 if gname == "output.weight" else K_FALLBACK[t]
    if ne[0] % gguf.GGML_QUANT_SIZES[t][0] != 0:
        t = QT.F16
    return t


class CQuant:
    """numoe's C quantiser (kernels/, nm_quantize_row) through ctypes."""

    _lib = None

    @classmethod
    def lib(cls):
        if cls._lib is None:
            build = Path(os.environ.get("NUMOE_BUILD", "build"))
            if not build.is_absolute():
                build = REPO_ROOT / build
            path = build / "lib" / "libnumoe_kernels.so"
            if not path.is_file():
                raise SystemExit(
                    f"error: {path} not found. K-quant types (Q2_K..Q6_K) are quantised by numoe's C "
                    f"quantiser: build it with `make BUILD={build} {path}` (from {REPO_ROOT}) "
                    f"or point NUMOE_BUILD at a build directory that has lib/libnumoe_kernels.so.")
            lib = ctypes.CDLL(str(path))
            lib.nm_quantize_row.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            lib.nm_quantize_row.restype = ctypes.c_int
            cls._lib = lib
        return cls._lib

    @classmethod
    def quantize(cls, qt: QT, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a, dtype=np.float32)
        n = a.shape[-1]
        nrow = a.size // n
        out = np.empty(nrow * row_bytes(qt, n), dtype=np.uint8)
        rc = cls.lib().nm_quantize_row(int(qt), a.ctypes.data, out.ctypes.data, ctypes.c_int64(a.size))
        if rc != 0:
            raise SystemExit(f"error: nm_quantize_row({qt.name}) failed (rc {rc})")
        return out


def quantize(qt: QT, a: np.ndarray) -> np.ndarray:
    """Rows of `a` (last axis = ne[0]) in type qt, as raw bytes (uint8, flat)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if qt == QT.F32:
        return a.reshape(-1).view(np.uint8)
    if qt == QT.F16:
        return a.astype(np.float16).reshape(-1).view(np.uint8)
    if qt in K_TYPES:
        return CQuant.quantize(qt, a)
    return gguf.quants.quantize(a.reshape(-1, a.shape[-1]), qt).reshape(-1)


def dequantize(qt: QT, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes -> float32 array of numpy shape `shape` (last axis = ne[0])."""
    if qt == QT.F32:
        return raw.view(np.float32).reshape(shape).copy()
    n = shape[-1]
    rows = raw.reshape(-1, row_bytes(qt, n))
    return gguf.quants.dequantize(rows, qt).astype(np.float32).reshape(shape)


# --------------------------------------------------------------------------------------------
# GGUF tensor plan
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PlanTensor:
    name: str
    ne: list[int]  # ggml order
    qt: QT
    chunks: Callable[[], Iterator[np.ndarray]]  # yields float32 arrays of whole rows (last axis ne[0])
    hf: list[str]  # HF tensors it comes from (for --hf-dequant)

    @property
    def nbytes(self) -> int:
        return row_bytes(self.qt, self.ne[0]) * math.prod(self.ne[1:])


def kv_b_split(s: Shape, kv_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF kv_b_proj [n_head*(d_nope+d_v), kv_lora] -> (k_b [n_head, kv_lora, d_nope], v_b [n_head, d_v, kv_lora])
    exactly as the converter: view(n_head, d_nope+d_v, kv_lora), split, k_b.transpose(1, 2)."""
    kv = kv_b.reshape(s.n_head, s.d_nope + s.d_v, s.kv_lora)
    k_b = np.ascontiguousarray(kv[:, :s.d_nope, :].transpose(0, 2, 1))
    v_b = np.ascontiguousarray(kv[:, s.d_nope:, :])
    return k_b, v_b


def build_plan(W: Weights, layout: str, want: QT) -> list[PlanTensor]:
    s = W.s
    H, V = s.hidden, W.vocab
    hf_shape = dict(W.hf_names())
    plan: list[PlanTensor] = []

    def simple(gname: str, hname: str):
        shp = hf_shape[hname]
        ne = list(reversed(shp))
        qt = tensor_type(gname, ne, want)
        # row chunks sized to about 64 MB of float32
        step = max(1, (16 << 20) // (shp[1] if len(shp) == 2 else 1)) if len(shp) == 2 else shp[0]

        def gen():
            if len(shp) == 1:
                yield W.full(hname, shp)
                return
            for r in range(0, shp[0], step):
                yield W.rows(hname, shp, r, min(shp[0], r + step))
        plan.append(PlanTensor(gname, ne, qt, gen, [hname]))

    def stacked(gname: str, hnames: list[str]):
        shp = hf_shape[hnames[0]]
        ne = [shp[1], shp[0], len(hnames)]
        qt = tensor_type(gname, ne, want)

        def gen():
            for h in hnames:
                yield W.full(h, shp)
        plan.append(PlanTensor(gname, ne, qt, gen, hnames))

    simple("token_embd.weight", "model.embed_tokens.weight")
    for i in range(s.n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        simple(b + "attn_norm.weight", p + "input_layernorm.weight")
        if s.q_lora:
            simple(b + "attn_q_a.weight", p + "self_attn.q_a_proj.weight")
            simple(b + "attn_q_a_norm.weight", p + "self_attn.q_a_layernorm.weight")
            simple(b + "attn_q_b.weight", p + "self_attn.q_b_proj.weight")
        else:
            simple(b + "attn_q.weight", p + "self_attn.q_proj.weight")
        simple(b + "attn_kv_a_mqa.weight", p + "self_attn.kv_a_proj_with_mqa.weight")
        simple(b + "attn_kv_a_norm.weight", p + "self_attn.kv_a_layernorm.weight")
        kvn = p + "self_attn.kv_b_proj.weight"
        if layout in ("legacy", "ik"):
            simple(b + "attn_kv_b.weight", kvn)
        if layout in ("ik", "mla"):
            kv_shape = hf_shape[kvn]
            if layout == "ik":
                ne_k, ne_v = [s.d_nope, s.n_head * s.kv_lora], [s.kv_lora, s.n_head * s.d_v]
            else:
                ne_k, ne_v = [s.d_nope, s.kv_lora, s.n_head], [s.kv_lora, s.d_v, s.n_head]

            def gen_k(kvn=kvn, kv_shape=kv_shape):
                yield kv_b_split(s, W.full(kvn, kv_shape))[0].reshape(-1, s.d_nope)

            def gen_v(kvn=kvn, kv_shape=kv_shape):
                yield kv_b_split(s, W.full(kvn, kv_shape))[1].reshape(-1, s.kv_lora)
            plan.append(PlanTensor(b + "attn_k_b.weight", ne_k, tensor_type(b + "attn_k_b.weight", ne_k, want), gen_k, [kvn]))
            plan.append(PlanTensor(b + "attn_v_b.weight", ne_v, tensor_type(b + "attn_v_b.weight", ne_v, want), gen_v, [kvn]))
        simple(b + "attn_output.weight", p + "self_attn.o_proj.weight")
        simple(b + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        if i < s.n_dense:
            simple(b + "ffn_gate.weight", p + "mlp.gate_proj.weight")
            simple(b + "ffn_up.weight", p + "mlp.up_proj.weight")
            simple(b + "ffn_down.weight", p + "mlp.down_proj.weight")
        else:
            simple(b + "ffn_gate_inp.weight", p + "mlp.gate.weight")
            if s.style == "v3":
                simple(b + "exp_probs_b.bias", p + "mlp.gate.e_score_correction_bias")
            for g, h in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                stacked(b + f"ffn_{g}_exps.weight", [p + f"mlp.experts.{e}.{h}.weight" for e in range(s.n_expert)])
            for g, h in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                simple(b + f"ffn_{g}_shexp.weight", p + f"mlp.shared_experts.{h}.weight")
    simple("output_norm.weight", "model.norm.weight")
    simple("output.weight", "lm_head.weight")
    return plan


# --------------------------------------------------------------------------------------------
# GGUF writing
# --------------------------------------------------------------------------------------------


def add_metadata(w: gguf.GGUFWriter, s: Shape, tok: Tokenizer, layout: str, want: QT, name: str) -> None:
    """Keys in the order mainline's TextModel.set_gguf_parameters + DeepseekV2Model write them."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(s.n_layer)
    w.add_context_length(s.ctx)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(1 if layout == "mla" else s.n_head)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(s.yarn_factor)
    w.add_rope_scaling_orig_ctx_len(s.orig_ctx)
    w.add_rope_scaling_yarn_beta_fast(32.0)
    w.add_rope_scaling_yarn_beta_slow(1.0)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.eps)
    w.add_expert_count(s.n_expert)
    w.add_expert_used_count(s.n_used)
    w.add_expert_group_count(s.n_group)
    w.add_expert_group_used_count(s.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if s.gating == 2 else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_file_type(FILE_TYPE[want])
    w.add_leading_dense_block_count(s.n_dense)
    w.add_vocab_size(len(tok.tokens))
    if s.q_lora:
        w.add_q_lora_rank(s.q_lora)
    w.add_kv_lora_rank(s.kv_lora)
    if layout == "mla":
        w.add_key_length(s.kv_lora + s.d_rope)
        w.add_value_length(s.kv_lora)
        w.add_key_length_mla(s.d_k)
        w.add_value_length_mla(s.d_v)
    else:
        w.add_key_length(s.d_k)
        w.add_value_length(s.d_v)
    w.add_expert_feed_forward_length(s.n_ff_exp)
    w.add_expert_shared_count(s.n_shared)
    w.add_expert_weights_scale(s.scale)
    w.add_expert_weights_norm(s.norm_topk)
    w.add_rope_dimension_count(s.d_rope)
    w.add_rope_scaling_yarn_log_mul(0.1 * s.mscale_all_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # tokenizer (gguf.SpecialVocab order: model, pre, tokens, types, merges, ids, add_*, template)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.types)
    w.add_token_merges(tok.merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(tok.chat_template)


# Byte offsets of the fp16 block scales (d, and dmin where the type has one) inside one block, from
# ggml's block layouts (kernels/quant.h): --random-blocks overwrites them with sane values.
SCALE_FIELDS: dict[QT, tuple[int, ...]] = {
    QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q5_0: (0,), QT.Q4_1: (0, 2), QT.Q5_1: (0, 2),
    QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
}


def random_raw_chunks(t: PlanTensor, seed: int, chunk_bytes: int = 64 << 20, route_skew: float = 0.0,
                      hidden: int = 0) -> Iterator[np.ndarray]:
    """The bytes of tensor t for a speed-only model: uniformly random quant blocks whose fp16 scales are
    replaced by small values (weights of magnitude ~0.01-0.05, zero-mean, no inf/NaN), float matrices
    N(0, 0.02), norm weights 1, biases 0. Correctness of the model's output means nothing; the bytes,
    types and shapes are those of the real plan, so every engine reads and computes exactly as much.

    route_skew > 0 (sigmoid-gated shapes): the router's expert bias (exp_probs_b, which the router adds
    to each expert's score before the top-k) is route_skew * sigma * N(0, 1) per expert, sigma being the
    spread of the scores themselves (sigmoid'(0) * 0.02 * sqrt(hidden): the router rows are N(0, 0.02)
    and the normed hidden states have unit RMS), so some experts of every layer are picked far more
    often than others, as in real traffic where a few experts per layer are hot; each layer draws its
    own hot set (the tensor's name seeds it)."""
    rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
    if len(t.ne) == 1 or t.name.endswith("_norm.weight") or t.name.endswith(".bias"):
        n = math.prod(t.ne)
        if t.name.endswith("exp_probs_b.bias") and route_skew > 0:
            sigma = 0.25 * 0.02 * math.sqrt(hidden)
            v = (rng.standard_normal(n) * (route_skew * sigma)).astype(np.float32)
        else:
            v = np.zeros(n, np.float32) if t.name.endswith(".bias") else np.ones(n, np.float32)
        yield v.view(np.uint8)
        return
    if t.qt in (QT.F32, QT.F16, QT.BF16):
        per = {QT.F32: 4, QT.F16: 2, QT.BF16: 2}[t.qt]
        left = t.nbytes // per
        step = max(1, chunk_bytes // per)
        while left > 0:
            n = min(step, left)
            a = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
            if t.qt == QT.F32:
                yield a.view(np.uint8)
            elif t.qt == QT.F16:
                yield a.astype(np.float16).view(np.uint8)
            else:
                yield (a.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
            left -= n
        return
    bs, ts = gguf.GGML_QUANT_SIZES[t.qt]
    fields = SCALE_FIELDS[t.qt]
    # values are d * small integers (up to ~64 * 32 for the K types): d ~ 1e-5 keeps weights ~0.01-0.05
    d = 2e-3 / bs if t.qt in (QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q4_1, QT.Q5_1) else 1.5e-5
    # The projections that write into the residual stream (attention output, FFN / expert down) are
    # 10x smaller, so each token's hidden state stays its own: random attention averages the values
    # of all positions, and at full size that common part grew layer by layer until the deep layers
    # sent most tokens to the same few experts (measured: 47 of 64 experts used, the top 6 taking
    # 56% of 256 tokens' picks in layer 7 of 8; real DeepSeek routing is balanced by training).
    if "attn_output" in t.name or "ffn_down" in t.name:
        d *= 0.1
    d = np.float16(d)
    # The second field (the min) makes every matrix zero-mean. With a positive mean every row has a
    # common component, all tokens' hidden states line up, and the router sends every token to the
    # same few experts - unlike real traffic, and a gift to engines that copy only the experts a
    # batch uses (ik_llama.cpp's llama-bench does by default). E[q] of uniform random quants:
    #   Q4_1 / Q5_1  w = d q + m          q in 0..15 / 0..31        -> m    = -7.5 d / -15.5 d
    #   Q2_K         w = d sc q - dmin mn sc, mn, q uniform, q 0..3  -> dmin = 1.5 d
    #   Q4_K / Q5_K  w = d sc q - dmin mn q in 0..15 / 0..31        -> dmin = 7.5 d / 15.5 d
    mean_q = {QT.Q4_1: -7.5, QT.Q5_1: -15.5, QT.Q2_K: 1.5, QT.Q4_K: 7.5, QT.Q5_K: 15.5}.get(t.qt)
    vals = [d] if mean_q is None else [d, np.float16(float(d) * mean_q)]
    nblk = t.nbytes // ts
    step = max(1, chunk_bytes // ts)
    while nblk > 0:
        n = min(step, nblk)
        raw = rng.integers(0, 256, size=(n, ts), dtype=np.uint8)
        for off, v in zip(fields, vals):
            raw[:, off:off + 2] = np.frombuffer(v.tobytes(), np.uint8)
        # half the blocks negated (the fp16 sign bits of d and the min): types whose quants are offset
        # (Q4_0's q - 8 has mean -0.5) are zero-mean too
        neg = rng.integers(0, 2, size=n, dtype=np.uint8).astype(bool)
        for off in fields:
            raw[neg, off + 1] ^= 0x80
        yield raw.reshape(-1)
        nblk -= n


def write_gguf(path: Path, plan: list[PlanTensor], meta: Callable[[gguf.GGUFWriter], None],
               progress: bool, threads: int, keep_raw: bool = False,
               random_seed: int | None = None, route_skew: float = 0.0, hidden: int = 0) -> dict[str, np.ndarray]:
    """Header + KV + tensor infos via GGUFWriter, then the data streamed chunk by chunk."""
    w = gguf.GGUFWriter(str(path), "deepseek2")
    meta(w)
    for t in plan:
        # numpy-order shape, float32 dtype + raw_dtype: GGUFWriter stores ne = reversed(shape)
        w.add_tensor_info(t.name, list(reversed(t.ne)), np.dtype(np.float32), t.nbytes, raw_dtype=t.qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    align = w.data_alignment
    total = sum(t.nbytes for t in plan)
    done = 0
    t0 = time.time()
    raw_keep: dict[str, np.ndarray] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads) if threads > 1 else None

    def q(chunk: np.ndarray, qt: QT) -> np.ndarray:
        if pool is None or chunk.shape[0] < 2 * threads or qt not in K_TYPES:
            return quantize(qt, chunk)
        parts = np.array_split(chunk, threads, axis=0)
        return np.concatenate(list(pool.map(lambda a: quantize(qt, a), parts)))

    for idx, t in enumerate(plan):
        pad = (-fout.tell()) % align
        fout.write(b"\0" * pad)
        start = fout.tell()
        keep = []
        raws = (random_raw_chunks(t, random_seed, route_skew=route_skew, hidden=hidden) if random_seed is not None
                else (q(chunk, t.qt) for chunk in t.chunks()))
        for raw in raws:
            fout.write(raw.tobytes())
            if keep_raw:
                keep.append(raw.copy())
            done += raw.nbytes
            if progress:
                el = time.time() - t0
                sys.stderr.write(f"\r[{idx + 1}/{len(plan)}] {t.name:<32} {t.qt.name:<5} "
                                 f"{done / 2**30:7.2f}/{total / 2**30:.2f} GiB  {el:6.0f} s ")
                sys.stderr.flush()
        if fout.tell() - start != t.nbytes:
            raise RuntimeError(f"{t.name}: wrote {fout.tell() - start} bytes, expected {t.nbytes}")
        if keep_raw:
            raw_keep[t.name] = np.concatenate(keep)
    fout.write(b"\0" * ((-fout.tell()) % align))
    w.close()
    if pool is not None:
        pool.shutdown()
    if progress:
        sys.stderr.write("\n")
    return raw_keep


# --------------------------------------------------------------------------------------------
# HF folder
# --------------------------------------------------------------------------------------------


def hf_config(s: Shape, tok: Tokenizer) -> dict:
    v3 = s.style == "v3"
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "first_k_dense_replace": s.n_dense,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": 0.02,
        "intermediate_size": s.n_ff,
        "kv_lora_rank": s.kv_lora,
        "max_position_embeddings": s.ctx,
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "moe_intermediate_size": s.n_ff_exp,
        "moe_layer_freq": 1,
        "n_group": s.n_group,
        "n_routed_experts": s.n_expert,
        "n_shared_experts": s.n_shared,
        "norm_topk_prob": s.norm_topk,
        "num_attention_heads": s.n_head,
        "num_experts_per_tok": s.n_used,
        "num_hidden_layers": s.n_layer,
        "num_key_value_heads": s.n_head,
        "q_lora_rank": s.q_lora if s.q_lora else None,
        "qk_nope_head_dim": s.d_nope,
        "qk_rope_head_dim": s.d_rope,
        "rms_norm_eps": s.eps,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": s.yarn_factor,
            "mscale": s.mscale_all_dim,
            "mscale_all_dim": s.mscale_all_dim,
            "original_max_position_embeddings": s.orig_ctx,
            "type": "yarn",
        },
        "rope_theta": s.rope_theta,
        "routed_scaling_factor": s.scale,
        "scoring_func": "sigmoid" if v3 else "softmax",
        "tie_word_embeddings": False,
        "topk_group": s.topk_group,
        "topk_method": "noaux_tc" if v3 else "greedy",
        "torch_dtype": "float32",
        "use_cache": True,
        "v_head_dim": s.d_v,
        "vocab_size": len(tok.tokens),
    }
    if v3:
        cfg["ep_size"] = 1
        cfg["num_nextn_predict_layers"] = 0  # no MTP layer in these files
        cfg["rope_interleave"] = True  # transformers >= 4.5x: rotate adjacent pairs = ggml NORM rope
    else:
        cfg["aux_loss_alpha"] = 0.001
        cfg["seq_aux"] = True
    return dict(sorted(cfg.items()))


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf(out: Path, s: Shape, tok: Tokenizer, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", hf_config(s, tok))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "tokenizer.json", tokenizer_json(tok))
    bos, eos = tok.tokens[tok.bos_id], tok.tokens[tok.eos_id]
    write_json(out / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": bos, "eos_token": eos, "pad_token": eos,
        "chat_template": tok.chat_template, "clean_up_tokenization_spaces": False, "legacy": True,
        "model_max_length": s.ctx, "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": None})
    write_json(out / "generation_config.json", {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                                                "do_sample": False})


def hf_from_raw(s: Shape, plan: list[PlanTensor], raw: dict[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
    """De-quantised GGUF tensors back to HF names/shapes (for --hf-dequant)."""
    out: dict[str, np.ndarray] = {}
    kb: dict[str, np.ndarray] = {}
    vb: dict[str, np.ndarray] = {}
    for t in plan:
        a = dequantize(t.qt, raw[t.name], tuple(reversed(t.ne)))
        if t.name.endswith("attn_k_b.weight") or t.name.endswith("attn_v_b.weight"):
            if layout == "mla":
                (kb if "attn_k_b" in t.name else vb)[t.hf[0]] = a.reshape(s.n_head, -1, a.shape[-1])
            continue
        if len(t.hf) > 1:  # stacked experts
            for e, h in enumerate(t.hf):
                out[h] = a[e]
        else:
            out[t.hf[0]] = a
    for h, k in kb.items():  # kv_b rows per head: k part [d_nope, kv_lora] = k_b[h].T, then v part
        v = vb[h]
        out[h] = np.concatenate([k.transpose(0, 2, 1), v], axis=1).reshape(-1, s.kv_lora)
    return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--style", choices=["v2", "v3"], help="tiny model style (default v3; implied by --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default tiny-<style>)")
    ap.add_argument("--layers", type=int, help="override the shape's layer count (a shorter model with the same "
                    "per-layer work, for quick benchmarks)")
    ap.add_argument("--q-lora", type=int, help="override the shape's q_lora rank (0: attn_q without q-LoRA); "
                    "ik_llama.cpp loads a q_lora 0 deepseek2 file only with 26 or 27 layers")
    ap.add_argument("--random-blocks", action="store_true",
                    help="speed-only model: random quant blocks with sane scales, written at disk speed (output "
                         "is meaningless; bytes, types and shapes are the real plan's)")
    ap.add_argument("--route-skew", type=float, default=0.0, metavar="S",
                    help="with --random-blocks on a sigmoid-gated (V3-style) shape: skew the routing like real "
                         "traffic, the router's expert bias S times the spread of its scores, per expert at random "
                         "(0: balanced; 1: a few experts per layer take a large share of the picks)")
    ap.add_argument("--type", default="F32", choices=TYPE_NAMES, help="tensor type of the matrices")
    ap.add_argument("--attn-layout", default="mla", choices=["legacy", "ik", "mla"])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("-o", "--out", required=True, help="output .gguf")
    ap.add_argument("--hf-out", help="also write the HF folder (config.json, model.safetensors, tokenizer.json)")
    ap.add_argument("--hf-dequant", action="store_true",
                    help="HF folder holds the de-quantised weights of this GGUF instead of the float32 originals")
    ap.add_argument("--vocab-gguf", default=None,
                    help="take the tokenizer from this ggml-vocab GGUF (default for --shape v2-lite: "
                         "tests/fixtures/vocab/ggml-vocab-deepseek-llm.gguf)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="quantisation threads (K types)")
    ap.add_argument("--name", default=None, help="general.name")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)

    if args.shape is None:
        args.shape = f"tiny-{args.style or 'v3'}"
    shape = SHAPES[args.shape]
    if args.layers:
        if args.layers <= shape.n_dense:
            ap.error(f"--layers must exceed the {shape.n_dense} leading dense layer(s)")
        shape = dataclasses.replace(shape, n_layer=args.layers)
    if args.q_lora is not None:
        if args.q_lora < 0:
            ap.error("--q-lora must be >= 0")
        shape = dataclasses.replace(shape, q_lora=args.q_lora)
    if shape.name == "v3-width" and not args.random_blocks:
        ap.error("--shape v3-width is written only with --random-blocks (its float weights would take hours)")
    if args.route_skew < 0 or (args.route_skew > 0 and (not args.random_blocks or shape.style != "v3")):
        ap.error("--route-skew needs --random-blocks and a sigmoid-gated V3-style shape (its expert bias), and >= 0")
    if args.random_blocks and args.hf_out:
        ap.error("--random-blocks writes no HF folder (its weights are random blocks, not a float model)")
    if args.style and args.style != shape.style:
        ap.error(f"--style {args.style} contradicts --shape {args.shape}")
    want = QT[args.type]
    big = shape.vocab_size > 0
    if big and args.hf_out:
        ap.error("--hf-out is not supported for the big shapes (tens of GB of float32)")
    if args.hf_dequant and not args.hf_out:
        ap.error("--hf-dequant needs --hf-out")

    vocab_path = args.vocab_gguf
    if vocab_path is None and big and shape.style == "v2":
        # the real DeepSeek-LLM vocabulary, committed with llama.cpp's vocab tests
        cand = REPO_ROOT / "tests" / "fixtures" / "vocab" / "ggml-vocab-deepseek-llm.gguf"
        vocab_path = str(cand) if cand.is_file() else None
    if vocab_path is None and shape.name == "v3-width":
        # DeepSeek-V3's vocabulary is not committed; for a speed-only model the DeepSeek-LLM one padded to
        # V3's 129280 ids reads and computes exactly the same (embedding rows, head rows)
        cand = REPO_ROOT / "tests" / "fixtures" / "vocab" / "ggml-vocab-deepseek-llm.gguf"
        vocab_path = str(cand) if cand.is_file() else None
    if vocab_path:
        tok = load_vocab_gguf(Path(vocab_path), CHAT_TEMPLATE_V3 if shape.style == "v3" else CHAT_TEMPLATE_V2)
        if shape.vocab_size and len(tok.tokens) < shape.vocab_size and args.random_blocks:
            n0 = len(tok.tokens)
            tok = dataclasses.replace(tok, tokens=tok.tokens + [f"[PAD{n0 + i}]" for i in range(shape.vocab_size - n0)],
                                      types=tok.types + [int(gguf.TokenType.UNUSED)] * (shape.vocab_size - n0))
        if shape.vocab_size and len(tok.tokens) != shape.vocab_size:
            ap.error(f"{vocab_path} has {len(tok.tokens)} tokens, shape {shape.name} needs {shape.vocab_size}")
    else:
        tok = build_tokenizer(shape)

    W = Weights(shape, len(tok.tokens), args.seed)
    plan = build_plan(W, args.attn_layout, want)
    if any(t.qt in K_TYPES for t in plan) and not args.random_blocks:
        CQuant.lib()  # fail early with a clear message
    name = args.name or f"numoe-synthetic-deepseek-{shape.name}-{args.attn_layout}-{args.type}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = write_gguf(out, plan, lambda w: add_metadata(w, shape, tok, args.attn_layout, want, name),
                     progress=not args.quiet and big, threads=max(1, args.threads),
                     keep_raw=bool(args.hf_out and args.hf_dequant),
                     random_seed=args.seed if args.random_blocks else None, route_skew=args.route_skew,
                     hidden=shape.hidden)
    if args.hf_out:
        if args.hf_dequant:
            tensors = hf_from_raw(shape, plan, raw, args.attn_layout)
        else:
            tensors = {n: W.full(n, shp) for n, shp in W.hf_names()}
        write_hf(Path(args.hf_out), shape, tok, tensors)
    if not args.quiet:
        n_par = sum(math.prod(shp) for _, shp in W.hf_names())
        types = Counter(t.qt.name for t in plan)
        print(f"{out}: {shape.name} {args.attn_layout} {args.type}: {len(plan)} tensors "
              f"({', '.join(f'{k} {v}' for k, v in sorted(types.items()))}), {n_par / 1e6:.2f} M params, "
              f"vocab {len(tok.tokens)}, {out.stat().st_size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
