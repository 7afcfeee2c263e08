"""bpe.py against Hugging Face `tokenizers` (the oracle): SmolLM2's vocabulary from its GGUF file, and small
tokenizer.json files written here, loaded through tokenizer.load_tokenizer."""
import json
import random
from pathlib import Path

import pytest

from bpe import BYTE_CHARS, GPT2_SPLIT, LLAMA3_SPLIT, ByteLevelBPE
from gguf_file import GGUFFile
from tokenizer import load_tokenizer, tokenizer_from_gguf

tokenizers = pytest.importorskip("tokenizers", reason="the reference tokenizer (pip install tokenizers)")
from tokenizers import AddedToken, decoders, models, pre_tokenizers  # noqa: E402


def random_ids(n, vocab_size, byte_ids, seed=1):
    """Id sequences mixing whole tokens, single bytes (often invalid UTF-8) and the first (special) ids."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        ids = []
        for _ in range(r.randrange(0, 25)):
            x = r.random()
            ids.append(r.randrange(vocab_size) if x < 0.5 else r.choice(byte_ids) if x < 0.9 else r.randrange(20))
        out.append(ids)
    return out


# -- the oracle

def reference(vocab, merges, pre, added=(), decoder=True):
    """A `tokenizers` BPE over the same vocabulary (dict) and merges (pairs). Added tokens are special; with
    encode_special_tokens on (as here) their text is plain text, as in our encode()."""
    ref = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    ref.pre_tokenizer = pre
    if decoder:
        ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    ref.encode_special_tokens = True
    return ref


SMOLLM_PRE = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


@pytest.fixture(scope="module")
def smollm(smollm2_gguf_path):
    path = smollm2_gguf_path
    with GGUFFile(path) as f:
        meta = f.metadata
        ours = tokenizer_from_gguf(f)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    ref = reference({t: i for i, t in enumerate(tokens)}, merges, SMOLLM_PRE,
                    added=[t for t, k in zip(tokens, types) if k == 3])
    return path, ours, ref


@pytest.fixture(scope="module")
def smollm2_strings(bpe_strings):
    return bpe_strings(6000)


def test_smollm2_settings(smollm):
    _, tok, ref = smollm
    assert isinstance(tok, ByteLevelBPE)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (49152, 1, 2, 2, False)
    assert tok.vocab_size == ref.get_vocab_size()
    assert tok._rank_id is None  # ids grow in merge order: tiktoken's ranks are the ids
    assert sorted(tok._missing) == [0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)]


def test_smollm2_encode_matches_tokenizers(smollm, smollm2_strings, bpe_no_token):
    _, tok, ref = smollm
    expected = [e.ids for e in ref.encode_batch(smollm2_strings)]
    got = tok.encode_batch(smollm2_strings)
    bad = [(s, g, e) for s, g, e in zip(smollm2_strings, got, expected) if g != e]
    assert not bad, f"{len(bad)} of {len(smollm2_strings)} differ, first: {bad[0]}"
    # the slow path for missing bytes was exercised, and encode() agrees with encode_batch()
    assert sum(any(c in s for c in bpe_no_token) for s in smollm2_strings) > 300
    assert all(tok.encode(s) == e for s, e in zip(smollm2_strings[::20], expected[::20]))


def test_smollm2_every_token_is_its_own_merge(smollm):
    """tiktoken returns a piece that is a token without merging: exact only if merging a token's bytes gives
    the token, which `tokenizers`' BPE model itself confirms for the whole vocabulary."""
    _, tok, ref = smollm
    vocab = ref.get_vocab()
    normal = [t for t, i in vocab.items() if i >= 17]
    assert all([x.value for x in ref.model.tokenize(t)] == [t] for t in normal)


def test_smollm2_special_text(smollm):
    path, tok, ref = smollm
    text = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n\x04<|endoftext|>"
    assert tok.encode(text) == ref.encode(text).ids  # plain text by default
    assert tok.encode(text)[:1] != [1]
    ref.encode_special_tokens = False
    try:
        for s in [text, "a<|im_end|>b", "<|im_start|><|im_start|>", " <|im_end|> ", "<|im_start"]:
            assert tok.encode(s, special=True) == ref.encode(s).ids, s
    finally:
        ref.encode_special_tokens = True
    assert tok.encode(text, special=True)[0] == 1
    assert tok.encode_batch([text, "x"], special=True) == [tok.encode(text, special=True), tok.encode("x")]


def test_smollm2_decode_matches_tokenizers(smollm):
    _, tok, ref = smollm
    byte_ids = [i for i in range(17, tok.vocab_size) if len(ref.id_to_token(i)) == 1]
    seqs = random_ids(3000, tok.vocab_size, byte_ids)
    assert [tok.decode(s) for s in seqs] == ref.decode_batch(seqs, skip_special_tokens=False)
    assert [tok.decode(s, skip_special=True) for s in seqs] == ref.decode_batch(seqs, skip_special_tokens=True)


def test_smollm2_round_trip(smollm, smollm2_strings):
    _, tok, _ = smollm
    for s in smollm2_strings[:2000]:
        if not set(s.encode()) & set(tok._missing):  # text with a byte that has no token cannot come back
            assert tok.decode(tok.encode(s)) == s


def test_encode_decode_details(smollm):
    _, tok, _ = smollm
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 19556, 905, 2]
    assert tok.encode("") == [] and tok.encode("", bos=True) == [1]
    assert tok.encode("\ud800x") == tok.encode("\ufffdx")  # lone surrogates become U+FFFD, as in tiktoken
    assert tok.encode("\ud800\x04x") == tok.encode("\ufffdx")
    torch = pytest.importorskip("torch")
    assert tok.decode(torch.tensor([19556, 905])) == "Hello world"
    with pytest.raises(IndexError, match=r"\[0, 49152\)"):
        tok.decode([1, 49152])
    with pytest.raises(IndexError, match="-1"):
        tok.decode([-1])


def test_load_tokenizer_gguf(smollm, tmp_path):
    path, tok, ref = smollm
    for given in (path, str(path)):
        assert load_tokenizer(given).encode("Hello world") == ref.encode("Hello world").ids == [19556, 905]
    (tmp_path / "model.gguf").symlink_to(path)
    assert load_tokenizer(tmp_path).encode("Hello world") == [19556, 905]
    (tmp_path / "other.gguf").symlink_to(path)
    with pytest.raises(FileNotFoundError, match="2 .gguf files"):
        load_tokenizer(tmp_path)


# -- small hand-made tokenizer.json files

CORPUS = ["Hello world, hello there! It's 2024 and 12345 numbers; don't stop.", "def f(x):\n    return x * 2\n",
          "naïve café — 中文 русский ١٢٣ 😀👍🏽", "the the the then they them there these those",
          "  spaces   and\ttabs\n\n"]


def train_tokenizer(pre, vocab_size=400, drop=()):
    """A small byte-level BPE trained by `tokenizers` itself, as (vocab dict, merges list), optionally without
    some single bytes (their merges go too)."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS * 20, trainer=trainer)
    spec = json.loads(tk.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    gone = {BYTE_CHARS[b] for b in drop}
    merges = [tuple(m) for m in merges if not any(c in gone for c in "".join(m))]
    kept = sorted((i, t) for t, i in vocab.items() if not any(c in gone for c in t))
    return {t: i for i, (_, t) in enumerate(kept)}, merges


def write_json(folder, vocab, merges, pre_json, post=None, merges_as_strings=True, config=None,
               added=("<|endoftext|>",)):
    folder.mkdir(exist_ok=True)
    spec = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "pre_tokenizer": pre_json,
            "post_processor": post, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                "use_regex": True},
            "added_tokens": [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for t in added],
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": [" ".join(m) if merges_as_strings else list(m) for m in merges]}}
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


def byte_level(prefix=False, regex=True):
    return {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True, "use_regex": regex}


CASES = {  # name -> (tokenizers pre-tokenizer, its JSON)
    "gpt2": (pre_tokenizers.ByteLevel(add_prefix_space=False), byte_level()),
    "gpt2-prefix": (pre_tokenizers.ByteLevel(add_prefix_space=True), byte_level(prefix=True)),
    "no-regex": (pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), byte_level(regex=False)),
    "smollm": (SMOLLM_PRE, {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                  byte_level()]}),
    "digit-runs": (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False)]),
                   {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False},
                                                          byte_level()]}),
    "llama3": (pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), "isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
               {"type": "Sequence", "pretokenizers": [
                   {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
                   byte_level(regex=False)]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tokenizer_json_matches_tokenizers(case, tmp_path, bpe_strings):
    pre, pre_json = CASES[case]
    drop = (0x04, 0x1D, 0xF1, 0xC0) if case in ("smollm", "gpt2") else ()
    vocab, merges = train_tokenizer(pre, drop=drop)
    path = write_json(tmp_path / case, vocab, merges, pre_json, merges_as_strings=case != "llama3")
    tok = load_tokenizer(path)
    assert isinstance(tok, ByteLevelBPE) and tok.vocab_size == len(vocab)
    ref = tokenizers.Tokenizer.from_file(str(path))
    ref.encode_special_tokens = True
    texts = bpe_strings(800, seed=list(CASES).index(case)) + CORPUS
    if case == "no-regex":
        texts = texts[:300]  # one piece per text: tiktoken merges it in quadratic time
    expected = [e.ids for e in ref.encode_batch(texts)]
    got = tok.encode_batch(texts, num_threads=1)
    bad = [(s, g, e) for s, g, e in zip(texts, got, expected) if g != e]
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[0]}"
    seqs = random_ids(300, tok.vocab_size, [vocab[BYTE_CHARS[b]] for b in range(256) if BYTE_CHARS[b] in vocab])
    assert [tok.decode(s) for s in seqs] == ref.decode_batch(seqs, skip_special_tokens=False)
    ref.encode_special_tokens = False  # special=True: added tokens' text is cut out first, in both
    texts = ["<|endoftext|>", "a<|endoftext|>b", " <|endoftext|> x", "<|endoftext|><|endoftext|>1", "<|endoftext"]
    assert [tok.encode(s, special=True) for s in texts] == [e.ids for e in ref.encode_batch(texts)]


def test_ids_not_in_merge_order(tmp_path, bpe_strings):
    """Shuffled ids: tiktoken's ranks can no longer be the ids, a table maps them."""
    vocab, merges = train_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), drop=(0x04,))
    ids = list(vocab.values())
    random.Random(3).shuffle(ids)
    vocab = dict(zip(vocab, ids))
    path = write_json(tmp_path, vocab, merges, byte_level(), merges_as_strings=False)
    tok = load_tokenizer(tmp_path)
    assert tok._rank_id is not None
    ref = tokenizers.Tokenizer.from_file(str(path))
    ref.encode_special_tokens = True
    texts = bpe_strings(500, seed=7)
    assert tok.encode_batch(texts) == [e.ids for e in ref.encode_batch(texts)]


def test_added_tokens_decode_like_tokenizers(tmp_path):
    """An added token is written out through the byte table when all its characters are in it, else as its own
    UTF-8 (here: a real space), as `tokenizers`' ByteLevel decoder does."""
    vocab, merges = train_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), vocab_size=300)
    ref = reference(vocab, merges, pre_tokenizers.ByteLevel(add_prefix_space=False), added=["<|endoftext|>"])
    ref.add_tokens([AddedToken("Ġhi there é", special=False, normalized=False)])
    ref.add_special_tokens([AddedToken("ÿéx", special=True, normalized=False), AddedToken("Ġhé", special=True)])
    (tmp_path / "tokenizer.json").write_text(ref.to_str(), encoding="utf-8")
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    new = [ref.token_to_id(t) for t in ("Ġhi there é", "ÿéx", "Ġhé")]
    seqs = [[i] for i in new] + [[vocab["a"], *new, vocab[BYTE_CHARS[0xE4]]], [new[1], vocab[BYTE_CHARS[0xA9]]]]
    for skip in (False, True):
        assert [tok.decode(s, skip_special=skip) for s in seqs] == ref.decode_batch(seqs, skip_special_tokens=skip)
    text = "a Ġhi there é bÿéx Ġhé"  # the non-special added token is cut out even in plain text
    assert tok.encode(text) == ref.encode(text).ids and new[0] in tok.encode(text)
    assert tok.encode_batch([text], num_threads=1) == [ref.encode(text).ids]
    ref.encode_special_tokens = False
    assert tok.encode(text, special=True) == ref.encode(text).ids


def test_bos_eos_from_post_processor_and_config(tmp_path):
    vocab, merges = train_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False))
    post = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                  {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<s>": {"id": "<s>", "ids": [vocab["<s>"]], "tokens": ["<s>"]}}}]}
    path = write_json(tmp_path / "a", vocab, merges, byte_level(), post=post, added=("<|endoftext|>", "<s>", "</s>"))
    tok = load_tokenizer(path)
    ref = tokenizers.Tokenizer.from_file(str(path))
    assert (tok.add_bos, tok.bos_id, tok.eos_id) == (True, vocab["<s>"], None)
    assert tok.encode("Hello there", bos=tok.add_bos) == ref.encode("Hello there").ids
    with pytest.raises(ValueError, match="no EOS"):
        tok.encode("x", eos=True)
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "__type": "AddedToken"}, "pad_token": None,
              "add_bos_token": False}
    write_json(tmp_path / "b", vocab, merges, byte_level(), post=post, config=config)
    tok = load_tokenizer(tmp_path / "b")
    assert (tok.add_bos, tok.bos_id, tok.eos_id, tok.pad_id) == (False, vocab["<s>"], vocab["</s>"], None)
    assert tok.encode("hi", bos=True, eos=True) == [vocab["<s>"], *ref.encode("hi", add_special_tokens=False).ids,
                                                    vocab["</s>"]]
    write_json(tmp_path / "c", vocab, merges, byte_level(), config={"eos_token": "<nope>"})
    with pytest.raises(ValueError, match="tokenizer_config.json.*'<nope>'"):
        load_tokenizer(tmp_path / "c")


def test_unsupported_tokenizer_json(tmp_path):
    vocab, merges = train_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), vocab_size=300)
    path = write_json(tmp_path, vocab, merges, byte_level())
    good = json.loads(path.read_text(encoding="utf-8"))
    cases = [
        ({"normalizer": {"type": "NFC"}}, "normalizer 'NFC'"),
        ({"pre_tokenizer": {"type": "Whitespace"}}, "pre_tokenizer 'Whitespace'"),
        ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Punctuation"}, byte_level()]}},
         r"Sequence\[Punctuation, ByteLevel\]"),
        ({"pre_tokenizer": None}, "pre_tokenizer None"),
        ({"decoder": {"type": "WordPiece"}}, "decoder 'WordPiece'"),
        ({"post_processor": {"type": "BertProcessing"}}, "post_processor 'BertProcessing'"),
        ({"model": {**good["model"], "type": "Unigram"}}, "model type 'Unigram'"),
        ({"model": {**good["model"], "byte_fallback": True}}, "byte_fallback"),
        ({"model": {**good["model"], "merges": ["a b c"]}}, "merge 'a b c' is not a pair"),
        ({"model": {**good["model"], "vocab": None}}, "malformed tokenizer.json"),
        ({"model": None}, "malformed tokenizer.json"),
        ({"model": {**good["model"], "merges": ["Ġ zzzz"]}}, "'zzzz' is not in the vocabulary"),
    ]
    for change, message in cases:
        path.write_text(json.dumps({**good, **change}), encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            load_tokenizer(path)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(path)


def test_load_tokenizer_folder_preference(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model, tokenizer.json or a single .gguf"):
        load_tokenizer(tmp_path)
    vocab, merges = train_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), vocab_size=300)
    write_json(tmp_path, vocab, merges, byte_level())
    (tmp_path / "junk.gguf").write_bytes(b"not read: tokenizer.json comes first")
    assert isinstance(load_tokenizer(tmp_path), ByteLevelBPE)
    assert load_tokenizer("byte").vocab_size == 259


def test_gguf_tokenizer_written_by_gguf_package(tmp_path, bpe_strings):
    """A gpt2-model GGUF written with the gguf package: the GPT-2 split from tokenizer.ggml.pre "gpt-2"."""
    gguf = pytest.importorskip("gguf")
    vocab, merges = train_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), drop=(0x04,))
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_merges([" ".join(m) for m in merges])
    w.add_token_types([3 if t.startswith("<") and len(t) > 2 else 1 for t in tokens])
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["</s>"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_tokenizer(tmp_path / "t.gguf")
    assert tok._split == GPT2_SPLIT and (tok.bos_id, tok.eos_id, tok.add_bos) == (vocab["<s>"], vocab["</s>"], False)
    ref = reference(vocab, merges, pre_tokenizers.ByteLevel(add_prefix_space=False),
                    added=["<|endoftext|>", "<s>", "</s>"])
    texts = bpe_strings(500, seed=11)
    assert tok.encode_batch(texts) == [e.ids for e in ref.encode_batch(texts)]


def test_sentencepiece_gguf(tmp_path, bpe_strings):
    """tokenizer.ggml.model "llama": LLaMA-2's pieces written into a GGUF give the same ids as tokenizer.model."""
    gguf = pytest.importorskip("gguf")
    spm = pytest.importorskip("sentencepiece")
    model = Path(__file__).resolve().parents[2] / "shared" / "llama2" / "tokenizer.model"
    if not model.is_file():
        pytest.skip(f"LLaMA-2 tokenizer not found at {model}")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    w = gguf.GGUFWriter(tmp_path / "sp.gguf", "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok, orig = load_tokenizer(tmp_path / "sp.gguf"), load_tokenizer(model)
    texts = bpe_strings(1000, seed=5)
    assert tok.encode_batch(texts) == orig.encode_batch(texts)
    assert tok.encode("Hello world", bos=True) == [1, 15043, 3186] and tok.add_bos
    assert tok.decode([1, 15043, 3186, 2]) == "Hello world"


def test_unsupported_gguf_tokenizers():
    class Fake:
        path = "x.gguf"

        def __init__(self, **meta):
            self.metadata = meta

    with pytest.raises(ValueError, match="x.gguf: tokenizer.ggml.model 'bert' is not supported"):
        tokenizer_from_gguf(Fake(**{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(ValueError, match="tokenizer.ggml.model None"):
        tokenizer_from_gguf(Fake())
    gpt2 = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": list(BYTE_CHARS), "tokenizer.ggml.merges": []}
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'default' is not supported"):
        tokenizer_from_gguf(Fake(**gpt2))
    with pytest.raises(ValueError, match="missing metadata key 'tokenizer.ggml.merges'"):
        tokenizer_from_gguf(Fake(**{k: v for k, v in gpt2.items() if k != "tokenizer.ggml.merges"}))
    llama = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a"], "tokenizer.ggml.scores": [0, 0]}
    with pytest.raises(ValueError, match="lacks the 256 byte pieces"):
        tokenizer_from_gguf(Fake(**llama))
