"""tokenizer.py against sentencepiece (the oracle) on LLaMA-2's real tokenizer.model, plus the byte tokenizer."""
import random
import re
from pathlib import Path

import pytest

from tokenizer import load_tokenizer  # the repo root is on sys.path (conftest.py)

MODEL = Path(__file__).resolve().parents[2] / "shared" / "llama2" / "tokenizer.model"

WORDS = ("the of and to in is was for that with as on by he at from his it an were are which this be or "
         "tokenizer model Llama ensemble layer mixture depth gradient natural language processing "
         "Hello World don't can't it's I'm we'll 1st 2nd 3.14159 1,000,000 e.g. U.S.A. x86_64 snake_case "
         "camelCase http://example.com/path?q=1&r=2 user@mail.org #hashtag @mention $100 50% (parens) "
         "[brackets] {braces} <tags> <s> </s> <unk> <0x41> ▁ ▁▁x").split()
SCRIPTS = ["中文分词测试的一是不了人我在有他这为之大来以个们到说国和地也子时道出而要于就下得可你年生",
           "日本語のテキストです。カタカナとひらがな、漢字。", "한국어 텍스트입니다", "مرحبا بالعالم، هذا نص عربي",
           "שלום עולם", "Привет, мир! Ёжик", "Γειά σου Κόσμε", "नमस्ते दुनिया", "สวัสดีชาวโลก",
           "Ça va? Œuvre naïve façade São Paulo Straße", "e\u0301 a\u0308 n\u0303 (combining)", "ﬁ ﬀ Ⅻ ① ＡＢＣ １２３"]
SPACES = [" ", "  ", "   ", " " * 17, " " * 40, "\t", "\n", "\n\n", "\r\n", "\u2581", "\u3000", "\xa0", "\x0b", "\x0c"]
EDGE = ["", " ", "  ", " " * 16, " " * 33, "\u2581", "\u2581\u2581a", "a\u2581", " \u2581 ", "<s>", "</s>", "<s></s>",
        " <s> hi </s> ", "<unk>", "\x00", "\x00\x01\x1f\x7f", "\n", "\t\t", " leading", "trailing ", "\ufffd",
        "\U0010ffff", "\U000e0001", "a" * 300, "\u4e2d" * 200, "x" + " " * 100 + "y", "1234567890" * 20]
def random_id_sequences(n, vocab_size, seed=1):
    """Id sequences mixing normal pieces, byte pieces (often invalid UTF-8), control ids, unk and '▁' pieces."""
    r = random.Random(seed)
    utf8 = [list(c.encode()) for c in "é中😀\u2581"]
    out = []
    for _ in range(n):
        ids = []
        for _ in range(r.randrange(0, 25)):
            x = r.random()
            if x < 0.35:
                ids.append(r.randrange(259, vocab_size))
            elif x < 0.6:
                ids.append(3 + r.choice([r.randrange(256), r.randrange(0x80, 0x100), 0x20, 0x41]))
            elif x < 0.7:
                ids.extend(3 + b for b in r.choice(utf8)[: r.randrange(1, 5)])  # whole or truncated characters
            elif x < 0.85:
                ids.append(r.choice([0, 1, 2]))
            else:
                ids.append(r.choice([29871, 259, 1678, 462, 263]))  # '▁', '▁▁', '▁▁▁', 16 x '▁', '▁a'
        out.append(ids)
    return out


@pytest.fixture(scope="module")
def model_bytes():
    if not MODEL.is_file():
        pytest.skip(f"LLaMA-2 tokenizer not found at {MODEL}")
    return MODEL.read_bytes()


@pytest.fixture(scope="module")
def sp(model_bytes):
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_proto=model_bytes)


@pytest.fixture(scope="module")
def tok(model_bytes):
    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def llama_strings(make_strings):
    """Factory: llama_strings(n, seed=0, pieces=()), varied strings (conftest.make_strings); pieces: runs of a
    vocabulary's own pieces among them."""
    return lambda n, seed=0, pieces=(): make_strings(n, WORDS, SCRIPTS, SPACES, edge=EDGE, pieces=pieces, seed=seed)


@pytest.fixture(scope="module")
def strings(sp, llama_strings):
    """With runs of the vocabulary's own pieces."""
    normal = [sp.id_to_piece(i).replace("\u2581", " ") for i in range(259, sp.get_piece_size())]
    return llama_strings(6000, pieces=normal)


def test_special_ids(sp, tok):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.get_piece_size())
    assert tok.pad_id is None and sp.pad_id() == -1


def test_encode_matches_sentencepiece(sp, tok, strings):
    expected = sp.encode(strings)
    mismatches = [(s, a, b) for s, a, b in zip(strings, map(tok.encode, strings), expected) if a != b]
    assert not mismatches[:5]
    assert tok.encode_batch(strings) == expected


def piece_texts(sp):
    return [sp.id_to_piece(i).replace("\u2581", " ") for i in range(sp.get_piece_size())]


def test_every_piece_encodes_like_sentencepiece(sp, tok):
    # Each piece, as text and (for '▁x') as 'x', which the dummy prefix turns into one whole chunk '▁x': tiktoken
    # looks such a chunk up instead of running BPE. (Pieces without '▁' are whole chunks without the dummy prefix,
    # in test_normalizer_flags.)
    texts = piece_texts(sp)
    texts += [t[1:] for t in texts if t.startswith(" ")]
    assert tok.encode_batch(texts) == sp.encode(texts)


def test_bos_eos(sp, tok, strings):
    for s in strings[:300]:
        assert tok.encode(s, bos=True) == sp.encode(s, add_bos=True)
        assert tok.encode(s, eos=True) == sp.encode(s, add_eos=True)
        assert tok.encode(s, bos=True, eos=True) == sp.encode(s, add_bos=True, add_eos=True)
    assert tok.encode_batch(["a", ""], bos=True, eos=True) == [[1, 263, 2], [1, 2]]
    assert 1 not in tok.encode("<s>") and 2 not in tok.encode("</s>")


def test_decode_matches_sentencepiece(sp, tok, strings):
    for ids in random_id_sequences(3000, sp.get_piece_size()):
        assert tok.decode(ids) == sp.decode(ids), ids
    for s in strings[:1000]:
        ids = sp.encode(s)
        assert tok.decode(ids) == sp.decode(ids)


def test_decode_accepts_arrays_and_rejects_bad_ids(tok):
    np = pytest.importorskip("numpy")
    assert tok.decode(np.array([15043, 3186])) == "Hello world"
    with pytest.raises(IndexError):
        tok.decode([-1])
    with pytest.raises(IndexError):
        tok.decode([tok.vocab_size])


def _with_normalizer(data, payload):
    """Append a normalizer_spec (field 3) to a ModelProto; protobuf merges it into the existing one."""
    return data + bytes([3 << 3 | 2, len(payload)]) + payload


NO_DUMMY_PREFIX, REMOVE_EXTRA_WHITESPACES = bytes([3 << 3, 0]), bytes([4 << 3, 1])  # normalizer_spec fields 3, 4


@pytest.mark.parametrize("payload", [NO_DUMMY_PREFIX, REMOVE_EXTRA_WHITESPACES,
                                     NO_DUMMY_PREFIX + REMOVE_EXTRA_WHITESPACES],
                         ids=["no_dummy_prefix", "remove_extra_whitespaces", "both"])
def test_normalizer_flags(sp, model_bytes, tmp_path, payload, llama_strings):
    spm = pytest.importorskip("sentencepiece")
    data = _with_normalizer(model_bytes, payload)
    (tmp_path / "tokenizer.model").write_bytes(data)
    oracle, ours = spm.SentencePieceProcessor(model_proto=data), load_tokenizer(tmp_path)
    strings = llama_strings(500, seed=2) + [" ▁ ", "a ▁ b", "a  ▁", "▁", "   "]
    if payload == NO_DUMMY_PREFIX:
        strings += piece_texts(sp)
    assert ours.encode_batch(strings) == oracle.encode(strings)
    for ids in random_id_sequences(500, sp.get_piece_size(), seed=3):
        assert ours.decode(ids) == oracle.decode(ids), ids


def test_load_from_folder(model_bytes, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(model_bytes)
    assert load_tokenizer(str(tmp_path)).encode("Hello world") == [15043, 3186]


def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)


def test_folder_without_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("cut", [1000, 250_000, -3])
def test_truncated_model(model_bytes, tmp_path, cut):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(model_bytes[:cut])
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        load_tokenizer(bad)


@pytest.mark.parametrize("content", [b"", b'{"model": {"type": "BPE"}}', bytes(range(256)) * 4])
def test_not_a_model(tmp_path, content):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_tokenizer(bad)


def test_unigram_model_rejected(model_bytes, tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(model_bytes + bytes([2 << 3 | 2, 2, 3 << 3, 1]))  # trainer_spec.model_type = UNIGRAM
    with pytest.raises(ValueError, match="not BPE"):
        load_tokenizer(bad)


# ---- the byte tokenizer ----

def test_byte_layout():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 1, 2, None)
    assert tok.encode("A é", bos=True, eos=True) == [1, 3 + 0x41, 3 + 0x20, 3 + 0xC3, 3 + 0xA9, 2]
    assert tok.encode("<s>\u2581") == [3 + b for b in "<s>\u2581".encode()]
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_byte_round_trip(llama_strings):
    tok = load_tokenizer("byte")
    strings = llama_strings(3000, seed=4)
    assert [tok.decode(ids) for ids in tok.encode_batch(strings)] == strings
    for s in strings[:500]:
        ids = tok.encode(s, bos=True, eos=True)
        assert ids == [1] + [3 + b for b in s.encode()] + [2] and tok.decode(ids) == s


def test_byte_decode_invalid_utf8():
    tok = load_tokenizer("byte")
    # Each invalid byte becomes one U+FFFD; control ids decode to nothing.
    assert tok.decode([3 + 0xE4, 3 + 0xB8, 3 + 0x41, 1, 3 + 0xFF, 2, 3 + 0xC3, 3 + 0xA9]) == "\ufffd\ufffdA\ufffdé"


def test_byte_decode_matches_sentencepiece(sp):
    # LLaMA's byte pieces use the same ids (3 + b), so sentencepiece decodes byte-only sequences as the oracle.
    tok, r = load_tokenizer("byte"), random.Random(5)
    for _ in range(1000):
        ids = [r.choice([1, 2, 3 + r.randrange(256), 3 + r.randrange(0x80, 0x100)]) for _ in range(r.randrange(12))]
        assert tok.decode(ids) == sp.decode(ids), ids
