"""Byte-level BPE (GPT-2 style: SmolLM2, LLaMA-3, GPT-2) on tiktoken's BPE core, giving exactly the ids of
Hugging Face `tokenizers` for the same vocabulary, merges and pre-tokenizer. Same interface as
tokenizer.Tokenizer; tokenizer.load_tokenizer and tokenizer.tokenizer_from_gguf pick between the two.

    tok = ByteLevelBPE.from_tokenizer_json("tokenizer.json")   # or .from_gguf(metadata, path)
    ids = tok.encode("Hello world")                            # SmolLM2: [19556, 905]
    tok.decode(ids)                                            # "Hello world"

How byte-level BPE works: a regex splits the text into pieces; each piece's UTF-8 bytes start as one token per
byte and repeatedly merge the adjacent pair that comes first in the merge list. In vocab and merges every byte
is spelled as a printable character (GPT-2's bytes-to-unicode table, "Ġ" is the space).

Why tiktoken computes the same thing: tiktoken merges the adjacent pair whose concatenation has the lowest rank.
Ranking the 256 bytes first and then each merge's result in merge order makes that the same choice whenever
two adjacent parts that join into a token are that token's own merge. BPE training makes this hold in practice
(the rule is applied in the order the merges were learned), but not by construction, so the tests compare with
`tokenizers` on SmolLM2's vocabulary. tiktoken also returns a piece that is a token as it is, without merging;
`tokenizers` does that only with ignore_merges (LLaMA-3), but in a trained vocabulary every token is what merging
its own bytes gives (the tests check all of SmolLM2's). When a vocabulary's ids grow in merge order (GPT-2,
SmolLM2, LLaMA-3) the ranks are the ids; otherwise a table maps ranks to ids.

Bytes with no token (SmolLM2 lacks 21: six control characters, the lead bytes 0xF1 0xF2 of U+40000-U+BFFFF,
and bytes that never occur in UTF-8): `tokenizers` silently drops such a byte from its piece before merging, so
its neighbours can merge across the gap; tiktoken would panic. They get synthetic ranks above all others, so
they come out as tokens of their own; a text whose result holds one is redone on a slow exact path that splits
it with the same regex (the `regex` module, a dependency of tiktoken) and merges each piece without those bytes.

Special tokens ("<|im_start|>", ...) are plain text to encode() unless it is called with special=True: a prompt
that happens to contain such text cannot inject control tokens, and chat templates opt in. Added tokens that are
not special are always cut out of the text first (leftmost, longest first), as `tokenizers` and llama.cpp do
(their lstrip/rstrip flags are not applied). decode() writes added tokens out as `tokenizers` does with
skip_special_tokens=False; decode(ids, skip_special=True) drops the special ones.
"""
import json
import re
from pathlib import Path

import tiktoken

# GGUF's token types (tokenizer.ggml.token_type; SentencePiece's numbering, as in tokenizer.py)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

GPT2_SPLIT = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# SmolLM2: `tokenizers` first isolates every digit (Digits(individual_digits=True)), then applies GPT-2's regex
# to the parts between. One regex does both: a digit alone, and whitespace just before a digit ends there.
SMOLLM_SPLIT = r"\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
WHOLE = r"[\s\S]+"  # ByteLevel without its regex: the whole text is one piece
GGUF_SPLITS = {"gpt-2": GPT2_SPLIT, "gpt2": GPT2_SPLIT, "smollm": SMOLLM_SPLIT, "llama-bpe": LLAMA3_SPLIT,
               "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT}  # llama.cpp's tokenizer.ggml.pre names


def bytes_to_unicode():
    """GPT-2's table, byte -> character: printable Latin-1 bytes stand for themselves, the other 68 bytes
    (control characters, space, ...) for U+0100 onwards in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(others)}
    return [table[b] for b in range(256)]


BYTE_CHARS = bytes_to_unicode()
CHAR_BYTE = {c: b for b, c in enumerate(BYTE_CHARS)}


def token_bytes(token):
    """A vocabulary string's bytes. Like `tokenizers`' ByteLevel decoder, a token with a character outside the
    table (an added token with a real space, say) stands for its own UTF-8 instead."""
    try:
        return bytes(CHAR_BYTE[c] for c in token)
    except KeyError:
        return token.encode()


class ByteLevelBPE:
    """Byte-level BPE. `tokens`: the vocabulary by id (None for an unused id), byte-level spelled; `merges`:
    (left, right) pairs in priority order; `split`: the pre-tokenizer regex; `added`: content -> id of the added
    tokens, `special_ids` those of them that decode(skip_special=True) drops. `add_bos` / `add_eos` record
    whether the tokenizer's own settings add them (encode adds them only when asked); `end_ids` the tokens
    that end a generation (default: EOS)."""

    def __init__(self, tokens, merges, *, split=GPT2_SPLIT, added=None, special_ids=(), bos_id=None, eos_id=None,
                 pad_id=None, add_bos=False, add_eos=False, prefix_space=False, source="vocabulary",
                 ranks=None, end_ids=None):
        self.bos_id, self.eos_id, self.pad_id, self.add_bos, self.add_eos = bos_id, eos_id, pad_id, add_bos, add_eos
        # the ids that end a generation: EOS, and any other end the vocabulary has (LLaMA-3's <|eot_id|>)
        self.end_ids = tuple(end_ids) if end_ids is not None else (eos_id,) if eos_id is not None else ()
        self.vocab_size, self.prefix_space, self._split, self._split_re = len(tokens), prefix_space, split, None
        self._bytes = [b"" if t is None else token_bytes(t) for t in tokens]  # id -> bytes, for decode
        self._added = dict(added or {})
        self._special = frozenset(special_ids)
        # Where added tokens are cut out of the text: the non-special ones always, all with special=True.
        self._plain_re = _alternatives(t for t, i in self._added.items() if i not in self._special)
        self._all_re = _alternatives(self._added)
        vocab = {}
        for i, t in enumerate(tokens):
            if t is not None:
                vocab.setdefault(t, i)

        # Merge priority order: the bytes, then each live merge's result, each token once.
        order, missing = {}, []
        for b, c in enumerate(BYTE_CHARS):
            if c in vocab:
                order[bytes([b])] = vocab[c]
            else:
                missing.append(b)
        n_bytes = len(order)
        if ranks is not None:  # tiktoken's own file format: each token's bytes and its rank, which is its id
            order.update(sorted(((b, r) for b, r in ranks.items() if len(b) > 1), key=lambda kv: kv[1]))
        for k, (left, right) in enumerate(merges):
            for part in (left, right, left + right):
                if part not in vocab:
                    raise ValueError(f"{source}: merge {k} ({left!r} {right!r}): {part!r} is not in the vocabulary")
            if any(c not in CHAR_BYTE for c in left + right):
                continue  # spelled with characters no byte maps to: `tokenizers` can never apply it
            data = token_bytes(left + right)
            if missing and len(data.translate(None, bytes(missing))) < len(data):
                continue  # holds a byte that `tokenizers` drops before merging: it can never apply either
            order.setdefault(data, vocab[left + right])
        ids = list(order.values())
        merge_ids = ids[n_bytes:]
        if all(a < b for a, b in zip(merge_ids, merge_ids[1:])) and len(set(ids)) == len(ids):
            ranks, self._rank_id = ids, None  # the ids already are merge priorities: no table
        else:
            ranks, self._rank_id = list(range(len(ids))), ids + [-1] * len(missing)
        self._fake = max(ranks, default=-1) + 1  # synthetic ranks of missing bytes start here
        mergeable = dict(zip(order, ranks)) | {bytes([b]): self._fake + k for k, b in enumerate(missing)}
        self._missing = bytes(missing)
        try:
            self._enc = tiktoken.Encoding("byte-level-bpe", pat_str=split, mergeable_ranks=mergeable, special_tokens={})
        except ValueError as e:
            raise ValueError(f"{source}: split regex {split!r} does not compile ({e})") from None

    # -- encoding

    def _ids(self, ranks, text):
        """tiktoken's ranks -> ids; a text that hit a byte without a token is redone exactly."""
        if self._rank_id is None:
            return self._slow(text) if ranks and max(ranks) >= self._fake else ranks
        ids = list(map(self._rank_id.__getitem__, ranks))
        return self._slow(text) if -1 in ids else ids

    def _slow(self, text):
        """Split as tiktoken does, drop the bytes that have no token from each piece, merge what is left."""
        if self._split_re is None:
            import regex  # the same Unicode classes as tiktoken's Rust regex (Python's re differs on \s)
            self._split_re = regex.compile(self._split)
        try:
            text.encode()
        except UnicodeEncodeError:  # lone surrogates become U+FFFD, as tiktoken does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ranks = []
        for m in self._split_re.finditer(text):
            piece = m.group().encode().translate(None, self._missing)
            if piece:
                ranks += self._enc._encode_single_piece(piece)
        return ranks if self._rank_id is None else [self._rank_id[r] for r in ranks]

    def _prefixed(self, text):  # ByteLevel(add_prefix_space=True) puts a space before text that lacks one
        return text if not self.prefix_space or text.startswith(" ") else " " + text

    def _ordinary(self, text):
        if not text:
            return []
        text = self._prefixed(text)
        return self._ids(self._enc.encode_ordinary(text), text)

    def _with_added(self, text, pattern):
        ids, pos = [], 0
        for m in pattern.finditer(text):
            ids += self._ordinary(text[pos:m.start()])
            ids.append(self._added[m.group()])
            pos = m.end()
        return ids + self._ordinary(text[pos:])

    def _wrap(self, ids, bos, eos):
        for want, tid, what in ((bos, self.bos_id, "BOS"), (eos, self.eos_id, "EOS")):
            if want and tid is None:
                raise ValueError(f"this tokenizer has no {what} token")
        return [self.bos_id] * bos + ids + [self.eos_id] * eos if bos or eos else ids

    def encode(self, text, bos=False, eos=False, special=False):
        """Token ids of `text`; BOS/EOS only when asked. The text of special tokens ("<|im_start|>") is plain
        text unless special=True."""
        pattern = self._all_re if special else self._plain_re
        return self._wrap(self._with_added(text, pattern) if pattern else self._ordinary(text), bos, eos)

    def encode_batch(self, texts, bos=False, eos=False, num_threads=8, special=False):
        """encode() for many texts, on tiktoken's thread pool (num_threads=1: in this thread)."""
        if self._all_re if special else self._plain_re:
            return [self.encode(t, bos, eos, special) for t in texts]
        texts = [self._prefixed(t) if t else t for t in texts]
        if num_threads > 1:
            batch = self._enc.encode_ordinary_batch(texts, num_threads=num_threads)
        else:
            batch = list(map(self._enc.encode_ordinary, texts))
        return [self._wrap(self._ids(r, t), bos, eos) for r, t in zip(batch, texts)]

    def added_id(self, text):
        """The id of added token `text` ("<|eot_id|>"), or None."""
        return self._added.get(text)

    # -- decoding

    def decode(self, ids, skip_special=False):
        """Text of `ids` as `tokenizers` decodes it: all tokens' bytes joined, invalid UTF-8 as U+FFFD."""
        if hasattr(ids, "tolist"):  # numpy array or torch tensor
            ids = ids.tolist()
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            raise IndexError(f"token id out of range [0, {self.vocab_size}): {min(ids)}..{max(ids)}")
        if skip_special:
            ids = [i for i in ids if i not in self._special]
        return b"".join(map(self._bytes.__getitem__, ids)).decode("utf-8", "replace")

    # -- loading

    @classmethod
    def from_tokenizer_json(cls, path):
        """A Hugging Face tokenizer.json (and the tokenizer_config.json beside it, when there is one)."""
        path = Path(path)
        spec = _read_json(path)
        try:
            return cls._from_spec(spec, path)
        except (KeyError, IndexError, TypeError, AttributeError) as e:  # a field missing or of the wrong kind
            raise ValueError(f"{path}: malformed tokenizer.json ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_spec(cls, spec, path):
        model = spec["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: model type {model.get('type')!r} is not supported (only BPE)")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
            if model.get(key):
                raise ValueError(f"{path}: BPE option {key} = {model[key]!r} is not supported")
        for key, allowed in (("normalizer", ()), ("decoder", ("ByteLevel",))):
            if spec.get(key) is not None and spec[key].get("type") not in allowed:
                raise ValueError(f"{path}: {key} {spec[key].get('type')!r} is not supported "
                                 f"({'only ' + allowed[0] if allowed else 'only none'})")
        split, prefix_space = _split_rule(spec.get("pre_tokenizer"), path)

        vocab, added_list = model["vocab"], spec.get("added_tokens") or []
        added = {t["content"]: t["id"] for t in added_list}
        tokens = [None] * (1 + max([*vocab.values(), *added.values()], default=-1))
        for t, i in [*vocab.items(), *added.items()]:
            tokens[i] = t
        if model.get("unk_token") and any(c not in vocab for c in BYTE_CHARS):
            raise ValueError(f"{path}: an unk_token with bytes missing from the vocabulary is not supported")

        bos, eos, add_bos, add_eos = _template(spec.get("post_processor"), path)
        pad = None
        config_path = path.with_name("tokenizer_config.json")
        if config_path.is_file():  # its settings win over the post-processor's, as in transformers
            config = _read_json(config_path)

            def token_id(key, default):
                name = config.get(key)
                name = name.get("content") if isinstance(name, dict) else name
                if name is None:
                    return default
                if name not in added and name not in vocab:
                    raise ValueError(f"{config_path}: {key} {name!r} is not in the vocabulary")
                return added.get(name, vocab.get(name))

            bos, eos, pad = token_id("bos_token", bos), token_id("eos_token", eos), token_id("pad_token", None)
            add_bos = bool(config["add_bos_token"]) if config.get("add_bos_token") is not None else add_bos
            add_eos = bool(config["add_eos_token"]) if config.get("add_eos_token") is not None else add_eos
        return cls(tokens, _pairs(model["merges"], f"{path}: merge"), split=split, added=added,
                   special_ids={t["id"] for t in added_list if t.get("special")}, bos_id=bos, eos_id=eos, pad_id=pad,
                   add_bos=add_bos, add_eos=add_eos, prefix_space=prefix_space, source=str(path))

    @classmethod
    def from_tiktoken_file(cls, path):
        """Meta's LLaMA-3 tokenizer.model: tiktoken's format, one "base64(token bytes) rank" per line. As in
        Meta's tokenizer, the split is LLaMA-3's and 256 special tokens follow the ranks; their names are
        those of LLaMA-3.1 and later (3.0 calls some of 128002-128255 reserved, with the same ids). BOS
        <|begin_of_text|> starts every text for the model; EOS is <|end_of_text|>, and a generation also ends
        at <|eom_id|> or <|eot_id|> (as in Meta's reference generation)."""
        import base64
        import binascii
        ranks = {}
        lines = Path(path).read_bytes().splitlines()
        for n, line in enumerate(lines, 1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}: line {n} is not 'base64-token rank' (tiktoken's format): "
                                 f"{line[:60]!r}") from None
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"{path}: {len(missing)} single bytes have no rank (e.g. {missing[0]:#04x})")
        n = len(ranks)
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        specials = named + [f"<|reserved_special_token_{k}|>" for k in range(2, 2 + 256 - len(named))]
        tokens = [None] * (n + len(specials))
        for data, rank in ranks.items():
            tokens[rank] = "".join(BYTE_CHARS[b] for b in data)
        added = {t: n + k for k, t in enumerate(specials)}
        for t, i in added.items():
            tokens[i] = t
        return cls(tokens, [], split=LLAMA3_SPLIT, added=added, special_ids=set(added.values()), bos_id=n,
                   eos_id=n + 1, pad_id=n + 4, add_bos=True, source=str(path), ranks=ranks,
                   end_ids=(n + 1, added["<|eom_id|>"], added["<|eot_id|>"]))

    @classmethod
    def from_gguf(cls, metadata, path="<gguf>"):
        """The byte-level BPE a GGUF file carries (tokenizer.ggml.model "gpt2")."""
        tokens = _need(metadata, "tokenizer.ggml.tokens", path)
        merges = _pairs(_need(metadata, "tokenizer.ggml.merges", path), f"{path}: tokenizer.ggml.merges entry")
        types = metadata.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_SPLITS:
            raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
                             f"{', '.join(GGUF_SPLITS)})")
        added = {}
        for i, (t, kind) in enumerate(zip(tokens, types)):
            if kind in (CONTROL, USER_DEFINED):
                added.setdefault(t, i)
        get = {key: metadata.get(f"tokenizer.ggml.{key}") for key in
               ("bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token", "add_eos_token")}
        # llama.cpp's end tokens: EOS, end of turn, end of message
        ends = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return cls(tokens, merges, split=GGUF_SPLITS[pre], added=added,
                   special_ids={i for i, kind in enumerate(types) if kind == CONTROL}, bos_id=get["bos_token_id"],
                   eos_id=get["eos_token_id"], pad_id=get["padding_token_id"], add_bos=bool(get["add_bos_token"]),
                   add_eos=bool(get["add_eos_token"]), source=str(path),
                   end_ids=list(dict.fromkeys(i for i in ends if i is not None)))


def _pairs(merges, where):
    """Merges as (left, right): "left right" strings (byte-level tokens hold no real space) or [left, right]."""
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    for m, p in zip(merges, pairs):
        if len(p) != 2:
            raise ValueError(f"{where} {m!r} is not a pair of tokens")
    return pairs


def _alternatives(texts):
    """A regex for the first, longest of `texts` (as `tokenizers` matches added tokens); None for none."""
    texts = sorted(texts, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _need(metadata, key, path):
    if key not in metadata:
        raise ValueError(f"{path}: missing metadata key {key!r}")
    return metadata[key]


def _split_rule(pre, path):
    """tokenizer.json's pre_tokenizer -> (split regex, add_prefix_space), for the byte-level forms in use."""
    kind = (pre or {}).get("type")
    if kind == "ByteLevel":  # GPT-2; the defaults are those of `tokenizers`
        return (GPT2_SPLIT if pre.get("use_regex", True) else WHOLE), bool(pre.get("add_prefix_space", True))
    steps = pre.get("pretokenizers", []) if kind == "Sequence" else []
    names = [s.get("type") for s in steps]
    if len(steps) == 2 and names[1] == "ByteLevel" and not steps[1].get("add_prefix_space", True):
        byte_regex = steps[1].get("use_regex", True)
        if names[0] == "Digits" and byte_regex:  # SmolLM2
            return (r"\p{N}" if steps[0].get("individual_digits") else r"\p{N}+") + SMOLLM_SPLIT[len(r"\p{N}"):], False
        pattern = steps[0].get("pattern") or {}
        # LLaMA-3. tiktoken drops text its regex does not match where `tokenizers` keeps it as a piece; the
        # GPT-style patterns match every character, so they agree.
        if names[0] == "Split" and not byte_regex and list(pattern) == ["Regex"] and \
                steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return pattern["Regex"], False
    what = f"Sequence[{', '.join(map(str, names))}]" if kind == "Sequence" else repr(kind)
    raise ValueError(f"{path}: pre_tokenizer {what} with these options is not supported (supported: ByteLevel; "
                     f"Digits + ByteLevel(add_prefix_space=false); Split(Regex, Isolated) + ByteLevel(use_regex=false, "
                     f"add_prefix_space=false))")


def _template(post, path):
    """(bos id, eos id, add_bos, add_eos) from a TemplateProcessing post-processor (also inside a Sequence)."""
    kind = (post or {}).get("type")
    if kind == "Sequence":
        found = [_template(p, path) for p in post.get("processors", [])]
        return next((f for f in found if f != (None, None, False, False)), (None, None, False, False))
    if kind in (None, "ByteLevel"):  # ByteLevel only adjusts offsets
        return None, None, False, False
    if kind != "TemplateProcessing":
        raise ValueError(f"{path}: post_processor {kind!r} is not supported (only TemplateProcessing and ByteLevel)")
    single = post.get("single") or []

    def special(item):
        name = item.get("SpecialToken", {}).get("id")
        return None if name is None else post["special_tokens"][name]["ids"][0]

    first = special(single[0]) if single else None
    last = special(single[-1]) if len(single) > 1 else None
    return first, last, first is not None, last is not None
