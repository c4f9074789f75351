#!/usr/bin/env python3
"""make_chat_fixtures.py - transformers' chat-template renderings for numoe's C chat formats.

Writes tests/fixtures/chat/deepseek_chat.json: conversations (single and multi-turn, with and
without system prompts and the generation prompt, non-ASCII text, tool results, odd content)
rendered by transformers' own `apply_chat_template(..., tokenize=False)` with the Jinja chat
templates stored in the fixture GGUFs (tokenizer.chat_template of
tests/fixtures/models/deepseek-v3-tiny-F32-mla.gguf and deepseek-v2-tiny-F32-legacy.gguf, which
are the real DeepSeek-V3-0324 and DeepSeek-V2-Chat templates, see tests/gen_deepseek.py).
tests/unit/test_chat_template.c renders the same conversations in C and compares bytes.

The tokenizer whose bos_token / eos_token the templates see is the HF folder of the fixture
model when it exists (tests/fixtures/models/deepseek-v*-tiny-hf, made by make_fixtures.sh, or under
--hf-root; its
chat_template must equal the GGUF's), otherwise a minimal PreTrainedTokenizerFast with the same
special tokens; a few cases use other BOS/EOS texts to check that the C side uses the ones it is
given. Only the template text and the two token strings matter to the rendering.

force_think cases have no transformers counterpart: their expected text is the transformers
rendering with "<think>\\n" appended (what KTransformers' --force_think does to the prompt).

Usage:
  python3 tests/make_chat_fixtures.py            # (re)write the fixture
  python3 tests/make_chat_fixtures.py --check    # render again, compare with the stored file
Needs transformers (and tokenizers), gguf.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "fixtures" / "models"
OUT = ROOT / "tests" / "fixtures" / "chat" / "deepseek_chat.json"

sys.path.insert(0, str(ROOT / "tests"))
import gen_deepseek  # noqa: E402  (template constants, BOS/EOS texts)

SOURCES = {
    "deepseek3": ("deepseek-v3-tiny-F32-mla.gguf", "deepseek-v3-tiny-hf", gen_deepseek.CHAT_TEMPLATE_V3),
    "deepseek2": ("deepseek-v2-tiny-F32-legacy.gguf", "deepseek-v2-tiny-hf", gen_deepseek.CHAT_TEMPLATE_V2),
}


def S(c):
    return {"role": "system", "content": c}


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def T(c):
    return {"role": "tool", "content": c}


# (name, messages, which formats; None = both)
CONVERSATIONS = [
    ("single_user", [U("Hello!")], None),
    ("system_user", [S("You are a helpful assistant."), U("What is 2+2?")], None),
    ("multi_turn", [U("Hi"), A("Hello! How can I help?"), U("Tell me a joke."), A("Why did the GPU cross the bus?"),
                    U("Why?")], None),
    ("multi_turn_system", [S("Answer briefly."), U("Capital of France?"), A("Paris."), U("And of Japan?")], None),
    ("ends_with_assistant", [S("sys"), U("q1"), A("a1")], None),
    ("assistant_first", [A("I start."), U("ok")], None),
    ("two_systems", [S("First rule."), U("u1"), S("Second rule."), A("a1"), U("u2")], None),
    ("system_only", [S("Only a system prompt.")], None),
    ("empty_contents", [S(""), U(""), A(""), U("")], None),
    ("non_ascii", [S("你是一个乐于助人的助手。"), U("你好，世界！🙂 Ça va? Grüße, 日本語, שלום, e\u0301"),
                   A("很好，谢谢！😀"), U("Ещё раз — ещё?")], None),
    ("special_text_in_content", [U("literal <｜User｜> and <｜Assistant｜> and {{ bos_token }} {% if %}"),
                                 A("<think>\nreasoning\n</think>\n\nthe answer<｜end▁of▁sentence｜>"), U("next")], None),
    ("whitespace", [S("  leading and trailing  \n"), U("\n\nline one\nline two\n\n"), A(" \t "), U("\r\n")], None),
    ("consecutive_users", [U("one"), U("two"), A("x"), A("y")], None),
    ("tool_results", [S("You can call tools."), U("Weather in Paris?"), A("Let me check."),
                      T('{"temp_c": 21}'), T('{"rain": false}'), A("21 °C and dry."), U("Thanks"),
                      A("Welcome."), T("late output")], None),
    ("tool_last", [U("run it"), T("result 1")], None),
]

CUSTOM_SPECIALS = ("<s>", "</s>")


def gguf_template(path: Path) -> str:
    import gguf
    r = gguf.GGUFReader(str(path))
    return str(r.fields["tokenizer.chat_template"].contents())


def make_tokenizer(hf_dir: Path, bos: str, eos: str, want_template: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if hf_dir.is_dir() and (bos, eos) == (gen_deepseek.BOS_TEXT, gen_deepseek.EOS_TEXT):
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        if tok.chat_template != want_template:
            raise SystemExit(f"{hf_dir}: chat_template differs from the GGUF's")
        if (tok.bos_token, tok.eos_token) != (bos, eos):
            raise SystemExit(f"{hf_dir}: bos/eos tokens {tok.bos_token!r}/{tok.eos_token!r} are not {bos!r}/{eos!r}")
        return tok, f"AutoTokenizer(<HF folder {hf_dir.name}>)"
    from tokenizers import Tokenizer, models
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), bos_token=bos, eos_token=eos)
    return tok, "PreTrainedTokenizerFast(bos_token, eos_token)"


def template_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def case_specs():
    """Every case the fixture holds, in order, without its expected text: needs no
    transformers, so tests/test_chat_template.py checks the stored fixture against
    it in every run. Yields (fmt, tokenizer specials, case dict)."""
    for fmt in SOURCES:
        for bos, eos in ((gen_deepseek.BOS_TEXT, gen_deepseek.EOS_TEXT), CUSTOM_SPECIALS):
            custom = (bos, eos) == CUSTOM_SPECIALS
            for name, msgs, only in CONVERSATIONS:
                if only and fmt not in only:
                    continue
                if custom and name not in ("multi_turn_system", "ends_with_assistant", "system_only"):
                    continue
                for agp in (False, True):
                    base = {"name": f"{fmt}/{name}{'/custom_specials' if custom else ''}",
                            "template": fmt, "bos": bos, "eos": eos, "messages": msgs,
                            "add_generation_prompt": agp}
                    yield fmt, (bos, eos), {**base, "force_think": False}
                    if agp and not custom and name in ("single_user", "multi_turn_system", "ends_with_assistant"):
                        yield fmt, (bos, eos), {**base, "name": base["name"] + "/force_think", "force_think": True}


def templates() -> dict:
    """fmt -> the chat template of its fixture GGUF (which must be gen_deepseek's constant)."""
    out = {}
    for fmt, (gguf_name, _, const) in SOURCES.items():
        tmpl = gguf_template(MODELS / gguf_name)
        if tmpl != const:
            raise SystemExit(f"{gguf_name}: tokenizer.chat_template differs from gen_deepseek's constant")
        out[fmt] = tmpl
    return out


def render_all(hf_root: Path) -> dict:
    import transformers
    cases = []
    sources = {}
    tmpls = templates()
    toks = {}
    for fmt, specials, case in case_specs():
        tmpl = tmpls[fmt]
        if (fmt, specials) not in toks:
            toks[(fmt, specials)] = make_tokenizer(hf_root / SOURCES[fmt][1], *specials, tmpl)
        tok, how = toks[(fmt, specials)]
        src = sources.setdefault(fmt, {"template_from": f"tests/fixtures/models/{SOURCES[fmt][0]}",
                                       "template_sha256": template_sha256(tmpl), "tokenizers": []})
        if how not in src["tokenizers"]:
            src["tokenizers"].append(how)
        text = tok.apply_chat_template(case["messages"], tokenize=False,
                                       add_generation_prompt=case["add_generation_prompt"], chat_template=tmpl)
        assert isinstance(text, str)
        # force_think has no transformers counterpart: KTransformers appends "<think>\n"
        cases.append({**case, "expected": text + ("<think>\n" if case["force_think"] else "")})
    return {
        "generator": "tests/make_chat_fixtures.py",
        "transformers": transformers.__version__,
        "sources": sources,
        "cases": cases,
    }


def dump(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the stored fixture instead of writing it")
    ap.add_argument("--hf-root", type=Path, default=MODELS,
                    help="where the fixture models' HF folders are (default tests/fixtures/models)")
    args = ap.parse_args()
    obj = render_all(args.hf_root)
    if args.check:
        stored = json.loads(OUT.read_text(encoding="utf-8"))
        got = {c["name"] + str(c["add_generation_prompt"]): c for c in obj["cases"]}
        want = {c["name"] + str(c["add_generation_prompt"]): c for c in stored["cases"]}
        bad = sorted(k for k in got.keys() | want.keys()
                     if got.get(k, {}).get("expected") != want.get(k, {}).get("expected")
                     or got.get(k, {}).get("messages") != want.get(k, {}).get("messages"))
        for k in bad:
            print(f"differs: {k}", file=sys.stderr)
        print(f"{len(got)} cases rendered with transformers {obj['transformers']}, {len(bad)} differ from {OUT}")
        return 1 if bad else 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(dump(obj), encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(obj['cases'])} cases (transformers {obj['transformers']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
