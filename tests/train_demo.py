#!/usr/bin/env python3
"""train_demo.py - trains the tiny DeepSeek-V3-architecture demo model and writes it as GGUF.

`make demo` runs the result, and the tests use it where random weights cannot stand in: a
perplexity to compare numoe against (tests/test_perplexity.py), a greedy continuation that reads
as English (tests/test_demo.py) and peaked, skewed expert routing (tests/test_trained_routing.py).

Corpus: the prose paragraphs of the Python 3.11 documentation as Debian ships it in the package
`python3.11-doc` (pulled in by `python3-doc`; version 3.11.2-6+deb12u9 made the committed files),
its reST sources under /usr/share/doc/python3.11/html/_sources. Licence: the Python documentation
is distributed under the PSF License Agreement (PSF-2.0; its code examples also under 0BSD), see
/usr/share/doc/python3.11-doc/copyright and the documentation's license.rst. Only paragraphs of
running text are kept (code, tables, headings, directives and markup are dropped; see prose()).
Every 16th source file (in sorted order) is held out; the first ~40 KB of the held-out paragraphs
are tests/fixtures/text/python-docs-heldout.txt.

Model: DeepSeek-V3 as numoe runs it (coordinator/forward.c; the math of tests/ref_deepseek.py):
MLA with q-LoRA, RoPE on adjacent pairs (plain RoPE: the file says yarn with factor 1, which numoe
and llama.cpp treat as no scaling), a dense first layer, then MoE layers with sigmoid routing,
e_score_correction_bias used for selection only, group-limited routing ("noaux_tc": groups of 2
scored by the sum of their two best biased scores, the best 2 of 4 groups kept), top-2 of 8
experts, weights renormalised and scaled by 2.5, one shared expert. Load balancing as in
DeepSeek-V3: the bias is updated after every step by gamma * sign(mean load - load of the expert)
(aux-loss-free balancing), plus the complementary sequence-wise balance loss with a tiny alpha.
The tokenizer is tests/gen_deepseek.py's byte-level BPE (deepseek-v3 pre-tokenizer, BOS 0, EOS 1)
with its merges learned from the training text; the GGUFs are written by gen_deepseek's writer
(add_metadata, build_plan, write_gguf; the K types through build/lib/libnumoe_kernels.so), the
weights handed over as a gen_deepseek.Weights whose rows() returns the trained tensors.

Evaluation (written to tests/fixtures/models/demo-v3-ppl.json): the held-out text is tokenized as
a whole without BOS; chunk j is BOS + tokens [j*(ctx-1), (j+1)*(ctx-1)), and every one of its
ctx-1 text tokens is scored, exactly the windows `numoe perplexity --ctx ctx` uses. The fixture
holds the float32 negative log-likelihood sum of every chunk, so a test can compare numoe over
its first K chunks.

Runs on the CPU (torch.set_num_threads, 2 by default): 1200 steps, about 10 minutes on 2 idle cores
(the committed files took 1519 s on a busy shared machine); deterministic (same bytes) for a
given torch build and thread count. The command that made the committed files is in
tests/fixtures/models/README.md (and make_fixtures.sh):

    python3 -m pip install torch gguf numpy regex && apt-get install python3-doc
    make build/lib/libnumoe_kernels.so
    python3 tests/train_demo.py
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gen_deepseek as gd  # noqa: E402

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover
    raise SystemExit(f"train_demo.py needs PyTorch (python3 -m pip install torch): {exc}")

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
MODELS = HERE / "fixtures" / "models"
TEXTS = HERE / "fixtures" / "text"
HELDOUT_NAME = "python-docs-heldout.txt"
HELDOUT_BYTES = 40_000
HELDOUT_EVERY, HELDOUT_AT = 16, 5  # file i is held out when i % 16 == 5
BPE_TRAIN_CHARS = 1_000_000  # the merges are learned from the first 1 MB of the training text

# hidden 256 (a multiple of 256, so Q4_K applies to the rows of every H-wide matrix); 1.90 M
# parameters, so the F32 + Q8_0 + Q4_K files together stay under 12 MB.
SHAPE = gd.Shape(name="demo-v3", style="v3", hidden=256, n_layer=4, n_dense=1, n_head=4, q_lora=128,
                 kv_lora=64, d_nope=32, d_rope=16, d_v=32, n_ff=256, n_ff_exp=32, n_expert=8, n_used=2,
                 n_shared=1, n_group=4, topk_group=2, scale=2.5, norm_topk=True, ctx=256, orig_ctx=256,
                 yarn_factor=1.0, mscale_all_dim=1.0, n_merges=762)

# ---------------------------------------------------------------------------------------------
# corpus: prose paragraphs of the reST sources
# ---------------------------------------------------------------------------------------------

# The parts of the documentation that are running text (c-api, distutils and whatsnew are mostly
# signatures, build recipes and change lists).
SECTIONS = ["tutorial", "faq", "howto", "glossary.rst.txt", "reference", "library", "using", "extending",
            "installing", "distributing"]
# Directives whose body is code, tables or index entries: the whole indented body is dropped.
# The others (note, warning, function, class, method, ...) keep their body text.
SKIP_DIRECTIVES = {
    "code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "testsetup", "testcleanup",
    "productionlist", "literalinclude", "highlight", "csv-table", "list-table", "table", "math", "graphviz",
    "index", "toctree", "only", "raw", "include", "image", "figure", "moduleauthor", "sectionauthor",
    "module", "currentmodule", "program", "autoclass", "availability", "impl-detail", "audit-event",
    "audit-event-table", "opcode", "pdbcommand", "cmdoption", "option", "envvar", "limited-api-list",
    "tabularcolumns", "rst-class", "role", "default-role", "contents", "sidebar", "topic", "rubric",
    "centered", "hlist", "glossary", "describe", "versionchanged", "versionadded", "deprecated",
    "deprecated-removed", "seealso"}
HEADING = re.compile(r"^\s*([=\-~*^#'\"`+:.])\1{2,}\s*$")
DIRECTIVE = re.compile(r"^\s*\.\.\s+([\w:-]+)::")
ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")


def _blocks(text: str):
    cur: list[str] = []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            yield cur
            cur = []
    if cur:
        yield cur


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _role_text(m: re.Match) -> str:
    """:func:`~os.path.join` -> join, :ref:`text <target>` -> text, :keyword:`!if` -> if."""
    t = m.group(1)
    if "<" in t and t.endswith(">"):
        t = t[:t.rindex("<")].strip()
    if t.startswith("~"):
        t = t[1:].split(".")[-1]
    return t.lstrip("!")


def _clean(s: str) -> str:
    s = ROLE.sub(_role_text, s)
    s = LINK.sub(lambda m: m.group(1), s)
    s = re.sub(r"``([^`]*)``", r"\1", s)
    s = re.sub(r"`([^`]*)`_", r"\1", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"\1", s)
    s = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", s)
    s = re.sub(r"\|[\w-]+\|", "", s)
    s = re.sub(r"\s+::$", "", s)
    s = re.sub(r"::$", ":", s)
    s = re.sub(r"\\(.)", r"\1", s)
    return re.sub(r"\s+", " ", s).strip()


def prose(text: str) -> list[str]:
    """The paragraphs of running text of one reST file, markup removed, one line each."""
    out = []
    skip_deeper = None  # drop blocks indented deeper than this (literal blocks, code directives)
    for b in _blocks(text):
        ind = min(_indent(x) for x in b)
        if skip_deeper is not None:
            if ind > skip_deeper:
                continue
            skip_deeper = None
        first = b[0].lstrip()
        if first.startswith(".."):
            m = DIRECTIVE.match(b[0])
            if m is None or m.group(1) in SKIP_DIRECTIVES or m.group(1).startswith(("c:", "cpp:")):
                skip_deeper = ind  # a comment, target or code directive with its body
                continue
            b = [x for x in b[1:] if not x.lstrip().startswith(":")]  # signature and options go
            if not b:
                continue
            ind = min(_indent(x) for x in b)
        if b[-1].endswith("::"):
            skip_deeper = ind  # the next deeper blocks are a literal (code) block
        if any(HEADING.match(x) for x in b) or first.startswith((">>>", "+", "|", "=", "$", "%")):
            continue
        if any(_indent(x) > ind + 4 for x in b[1:]):
            continue
        lines = [x.strip() for x in b]
        lines[0] = re.sub(r"^([*\-]|#\.|\d+\.)\s+", "", lines[0])
        p = _clean(" ".join(lines))
        if len(p) < 60 or "`" in p or "::" in p or not p[0].isupper() or p[-1] not in ".:!?)":
            continue
        if sum(c.isalpha() or c == " " for c in p) / len(p) < 0.88 or any(ord(c) > 126 for c in p):
            continue
        out.append(p)
    return out


def corpus(docs: Path) -> tuple[str, str]:
    """(training text, held-out text): paragraphs joined by blank lines; held-out = the first
    HELDOUT_BYTES (at a paragraph end) of the paragraphs of every HELDOUT_EVERY-th file."""
    files = []
    for sec in SECTIONS:
        p = docs / sec
        files += [p] if p.is_file() else sorted(p.rglob("*.rst.txt"))
    if len(files) < 100:
        raise SystemExit(f"error: {docs} holds {len(files)} of the documentation's reST sources; "
                         f"install the Debian package python3-doc (or pass --docs)")
    train, held = [], []
    for i, f in enumerate(files):
        (held if i % HELDOUT_EVERY == HELDOUT_AT else train).extend(prose(f.read_text(encoding="utf-8")))
    out, n = [], 0
    for p in held:
        if n + len(p) + 2 > HELDOUT_BYTES:
            break
        out.append(p)
        n += len(p) + 2
    return "\n\n".join(train) + "\n", "\n\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# the model (parameter names follow HF's DeepseekV3 where they map one to one)
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):
    """ggml's NORM rope: rotates adjacent pairs (x[2i], x[2i+1])."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)


def linear(i: int, o: int, std: float) -> nn.Linear:
    m = nn.Linear(i, o, bias=False)
    nn.init.normal_(m.weight, std=std)
    return m


class Attention(nn.Module):
    """MLA, un-absorbed (full per-head K and V), as tests/ref_deepseek.py computes it."""

    def __init__(self, s: gd.Shape, std: float, out_std: float):
        super().__init__()
        self.s = s
        self.q_a_proj = linear(s.hidden, s.q_lora, std)
        self.q_a_layernorm = RMSNorm(s.q_lora, s.eps)
        self.q_b_proj = linear(s.q_lora, s.n_head * s.d_k, std)
        self.kv_a_proj_with_mqa = linear(s.hidden, s.kv_lora + s.d_rope, std)
        self.kv_a_layernorm = RMSNorm(s.kv_lora, s.eps)
        self.kv_b_proj = linear(s.kv_lora, s.n_head * (s.d_nope + s.d_v), std)
        self.o_proj = linear(s.n_head * s.d_v, s.hidden, out_std)

    def forward(self, x, cos, sin):
        s = self.s
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(B, T, s.n_head, s.d_k)
        q_pe = rope(q[..., s.d_nope:], cos[:, None], sin[:, None])
        kv = self.kv_a_proj_with_mqa(x)
        c = self.kv_a_layernorm(kv[..., :s.kv_lora])
        k_pe = rope(kv[..., s.kv_lora:], cos, sin)
        kvb = self.kv_b_proj(c).view(B, T, s.n_head, s.d_nope + s.d_v)
        q = torch.cat([q[..., :s.d_nope], q_pe], -1).transpose(1, 2)
        k = torch.cat([kvb[..., :s.d_nope], k_pe[:, :, None].expand(B, T, s.n_head, s.d_rope)], -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, kvb[..., s.d_nope:].transpose(1, 2), is_causal=True,
                                           scale=1.0 / math.sqrt(s.d_k))
        return self.o_proj(o.transpose(1, 2).reshape(B, T, s.n_head * s.d_v))


class MLP(nn.Module):
    def __init__(self, h: int, ff: int, std: float, out_std: float):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = linear(h, ff, std), linear(h, ff, std), linear(ff, h, out_std)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Sigmoid router with e_score_correction_bias (selection only), noaux_tc group limit, top-k,
    renormalised weights * routed_scaling_factor (coordinator/router.c), one shared expert.
    The routed experts are stacked (expert e = rows [e*ff, (e+1)*ff) of gate/up, columns of down)
    and computed densely with zero weights for the experts not chosen: the same sum, and at these
    sizes faster on a CPU than gathering tokens per expert."""

    def __init__(self, s: gd.Shape, std: float, out_std: float):
        super().__init__()
        self.s = s
        E, ff, H = s.n_expert, s.n_ff_exp, s.hidden
        self.gate = nn.Parameter(torch.randn(E, H) * std)
        self.register_buffer("e_score_correction_bias", torch.zeros(E))
        self.experts_gate = nn.Parameter(torch.randn(E * ff, H) * std)
        self.experts_up = nn.Parameter(torch.randn(E * ff, H) * std)
        self.experts_down = nn.Parameter(torch.randn(H, E * ff) * out_std)
        self.shared_experts = MLP(H, ff * s.n_shared, std, out_std)

    def route(self, f):
        s = self.s
        p = torch.sigmoid(f @ self.gate.T)
        sc = p.detach() + self.e_score_correction_bias
        per = s.n_expert // s.n_group
        gscore = sc.view(-1, s.n_group, per).topk(2, -1).values.sum(-1)
        keep = torch.zeros_like(gscore).scatter(1, gscore.topk(s.topk_group, -1).indices, 1.0)
        sc = sc.masked_fill(keep.repeat_interleave(per, 1) == 0, float("-inf"))
        top = sc.topk(s.n_used, -1).indices
        w = p.gather(1, top)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * s.scale
        return p, top, w

    def forward(self, x):
        s = self.s
        B, T, H = x.shape
        f = x.reshape(-1, H)
        p, top, w = self.route(f)
        dense_w = torch.zeros_like(p).scatter(1, top, w)
        h = F.silu(f @ self.experts_gate.T) * (f @ self.experts_up.T) * dense_w.repeat_interleave(s.n_ff_exp, 1)
        y = h @ self.experts_down.T + self.shared_experts(f)
        # DeepSeek-V3's complementary sequence-wise balance loss: per sequence, sum over experts of
        # (share of the sequence's picks, times E / k) * (mean normalised affinity)
        sel = torch.zeros_like(p).scatter(1, top, 1.0).view(B, T, -1)
        fi = sel.sum(1) * (s.n_expert / (s.n_used * T))
        pi = (p / p.sum(-1, keepdim=True)).view(B, T, -1).mean(1)
        bal = (fi * pi).sum(-1).mean()
        return y.view(B, T, H), torch.bincount(top.reshape(-1), minlength=s.n_expert), bal


class Layer(nn.Module):
    def __init__(self, s: gd.Shape, i: int, std: float, out_std: float):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden, s.eps)
        self.self_attn = Attention(s, std, out_std)
        self.post_attention_layernorm = RMSNorm(s.hidden, s.eps)
        self.mlp = MLP(s.hidden, s.n_ff, std, out_std) if i < s.n_dense else MoE(s, std, out_std)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        f = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, load, bal = self.mlp(f)
            return x + y, load, bal
        return x + self.mlp(f), None, None


class Model(nn.Module):
    def __init__(self, s: gd.Shape, vocab: int, std: float = 0.02):
        super().__init__()
        self.s = s
        out_std = std / math.sqrt(2 * s.n_layer)
        self.embed_tokens = nn.Embedding(vocab, s.hidden)
        nn.init.normal_(self.embed_tokens.weight, std=std)
        self.layers = nn.ModuleList(Layer(s, i, std, out_std) for i in range(s.n_layer))
        self.norm = RMSNorm(s.hidden, s.eps)
        self.lm_head = linear(s.hidden, vocab, std)
        inv = 1.0 / s.rope_theta ** (torch.arange(0, s.d_rope, 2, dtype=torch.float64) / s.d_rope)
        ang = torch.arange(s.ctx, dtype=torch.float64)[:, None] * inv[None, :]
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.embed_tokens(idx)
        loads, bals = [], []
        for layer in self.layers:
            x, load, bal = layer(x, self.cos[:T], self.sin[:T])
            if load is not None:
                loads.append(load)
                bals.append(bal)
        return self.lm_head(self.norm(x)), loads, bals

    def hf_tensors(self) -> dict[str, np.ndarray]:
        """float32 numpy arrays by HF DeepseekV3 name (what gen_deepseek.Weights addresses)."""
        s = self.s
        out = {}
        for k, v in self.state_dict().items():
            a = v.detach().cpu().numpy().astype(np.float32)
            m = re.match(r"layers\.(\d+)\.mlp\.(experts_gate|experts_up|experts_down)$", k)
            if m:
                p = f"model.layers.{m.group(1)}.mlp.experts."
                proj = {"experts_gate": "gate_proj", "experts_up": "up_proj", "experts_down": "down_proj"}[m.group(2)]
                for e in range(s.n_expert):
                    rows = slice(e * s.n_ff_exp, (e + 1) * s.n_ff_exp)
                    out[p + f"{e}.{proj}.weight"] = np.ascontiguousarray(a[:, rows] if proj == "down_proj" else a[rows])
                continue
            if k == "lm_head.weight":
                out[k] = a
            elif k.endswith("mlp.gate"):
                out["model." + k + ".weight"] = a
            elif k.endswith("mlp.e_score_correction_bias"):
                out["model." + k.replace("mlp.", "mlp.gate.")] = a
            else:
                out["model." + k] = a
        return out


class TrainedWeights(gd.Weights):
    """gen_deepseek's weight source, returning the trained tensors instead of random ones."""

    def __init__(self, shape: gd.Shape, vocab: int, tensors: dict[str, np.ndarray]):
        super().__init__(shape, vocab, seed=0)
        self.tensors = tensors
        want = dict(self.hf_names())
        if set(want) != set(tensors):
            raise SystemExit(f"error: trained tensors do not match the shape's HF names: "
                             f"missing {sorted(set(want) - set(tensors))[:5]}, extra {sorted(set(tensors) - set(want))[:5]}")
        for n, shp in want.items():
            if tuple(tensors[n].shape) != tuple(shp):
                raise SystemExit(f"error: trained tensor {n} has shape {tensors[n].shape}, the GGUF needs {shp}")

    def rows(self, name, shape, r0, r1):
        a = self.tensors[name]
        return a if a.ndim == 1 else a[r0:r1]


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


def eval_chunks(model: Model, ids: list[int], bos: int, ctx: int) -> list[float]:
    """NLL sum (nats) of each chunk BOS + ids[j*(ctx-1):(j+1)*(ctx-1)], all ctx-1 text tokens
    scored: the windows of `numoe perplexity --ctx ctx`."""
    n = len(ids) // (ctx - 1)
    out = []
    model.eval()
    with torch.no_grad():
        for j in range(0, n, 8):
            rows = [[bos] + ids[k * (ctx - 1):(k + 1) * (ctx - 1)] for k in range(j, min(n, j + 8))]
            x = torch.tensor(rows)
            logits = model(x)[0].double()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(2, x[:, 1:, None])[..., 0]
            out += [float(-v) for v in lp.sum(1)]
    model.train()
    return out


def greedy(model: Model, tok: gd.Tokenizer, prompt: str, n: int) -> str:
    ids = tok.encode(prompt, add_bos=True)
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids[-model.s.ctx:]]))[0][0, -1].argmax())
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
    model.train()
    return tok.decode(ids[len(tok.encode(prompt, add_bos=True)):])


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--docs", type=Path, default=DOCS, help="reST sources of the Python docs (python3-doc)")
    ap.add_argument("--out-dir", type=Path, default=MODELS, help="where the GGUFs and demo-v3-ppl.json go")
    ap.add_argument("--text-dir", type=Path, default=TEXTS, help="where the held-out text goes")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (each BOS + ctx-1 tokens)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bias-rate", type=float, default=1e-3, help="gamma of the aux-loss-free bias update")
    ap.add_argument("--balance-alpha", type=float, default=1e-4, help="sequence-wise balance loss weight")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default="The Python interpreter", help="greedy sample printed at the end")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.Generator(np.random.PCG64(args.seed))
    t_start = time.time()
    s = SHAPE
    ctx = s.ctx

    train_text, held_text = corpus(args.docs)
    tok = gd.build_tokenizer(s, train_text[:BPE_TRAIN_CHARS])
    V = len(tok.tokens)
    train_ids = np.array(tok.encode(train_text, add_bos=False, parse_special=False), dtype=np.int64)
    held_ids = tok.encode(held_text, add_bos=False, parse_special=False)
    print(f"corpus: train {len(train_text)} chars / {len(train_ids)} tokens, held-out {len(held_text)} chars / "
          f"{len(held_ids)} tokens, vocab {V} ({time.time() - t_start:.0f} s)", file=sys.stderr)

    model = Model(s, V)
    n_par = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warm = max(1, args.steps // 20)
    moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
    print(f"model: {n_par / 1e6:.3f} M parameters, {args.steps} steps of {args.batch} x {ctx} tokens",
          file=sys.stderr)
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * (step + 1) / warm if step < warm else \
            args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm))))
        for g in opt.param_groups:
            g["lr"] = lr
        off = rng.integers(0, len(train_ids) - ctx, size=args.batch)
        x = torch.from_numpy(np.stack([np.concatenate([[tok.bos_id], train_ids[o:o + ctx - 1]]) for o in off]))
        y = torch.from_numpy(np.stack([train_ids[o:o + ctx - 1] for o in off]))
        logits, loads, bals = model(x)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), y.reshape(-1))
        loss = ce + args.balance_alpha * sum(bals)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # aux-loss-free balancing: under-loaded experts up, over-loaded down
            for moe, load in zip(moes, loads):
                lf = load.float()
                moe.e_score_correction_bias += args.bias_rate * torch.sign(lf.mean() - lf)
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t0
            held = ""
            if step % 250 == 0 and step:
                held = f"  held-out PPL {math.exp(sum(eval_chunks(model, held_ids, tok.bos_id, ctx)) / ((len(held_ids) // (ctx - 1)) * (ctx - 1))):.3f}"
            print(f"step {step:5d}  lr {lr:.2e}  loss {ce.item():.4f}  {el:6.0f} s  "
                  f"{(step + 1) * args.batch * ctx / max(el, 1e-9):.0f} tok/s{held}", file=sys.stderr, flush=True)

    nll = eval_chunks(model, held_ids, tok.bos_id, ctx)
    n_scored = len(nll) * (ctx - 1)
    ppl = math.exp(sum(nll) / n_scored)
    sample = greedy(model, tok, args.prompt, 48)
    print(f"held-out: {len(nll)} chunks of BOS + {ctx - 1} tokens, PPL {ppl:.4f}", file=sys.stderr)
    print(f"greedy: {args.prompt!r} -> {sample!r}", file=sys.stderr)
    for moe, layer in zip(moes, [i for i in range(s.n_layer) if i >= s.n_dense]):
        print(f"layer {layer} e_score_correction_bias {np.round(moe.e_score_correction_bias.numpy(), 3).tolist()}",
              file=sys.stderr)

    args.text_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.text_dir / HELDOUT_NAME).write_bytes(held_text.encode("utf-8"))
    W = TrainedWeights(s, V, model.hf_tensors())
    for tname in ("F32", "Q8_0", "Q4_K"):
        want = gd.QT[tname]
        plan = gd.build_plan(W, "mla", want)
        path = args.out_dir / f"demo-v3-{tname}.gguf"
        name = f"numoe-demo-deepseek-v3-{tname}"
        gd.write_gguf(path, plan, lambda w, want=want, name=name: gd.add_metadata(w, s, tok, "mla", want, name),
                      progress=False, threads=1)
        print(f"{path}: {path.stat().st_size} bytes", file=sys.stderr)
    fixture = {
        "about": "float32 perplexity of tests/train_demo.py's model on the held-out text, in the windows of "
                 "`numoe perplexity --ctx CTX`: chunk j = BOS + text tokens [j*(CTX-1), (j+1)*(CTX-1)), "
                 "every text token scored; nll = sum of -log p (nats) per chunk",
        "text": f"tests/fixtures/text/{HELDOUT_NAME}",
        "ctx": ctx,
        "n_tokens": len(held_ids),
        "scored_per_chunk": ctx - 1,
        "ppl": ppl,
        "chunk_nll": nll,
        "train": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                  "threads": args.threads, "train_tokens": int(len(train_ids)), "params": n_par,
                  "torch": torch.__version__, "seconds": round(time.time() - t_start)},
    }
    gd.write_json(args.out_dir / "demo-v3-ppl.json", fixture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
