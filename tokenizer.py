"""Tokenizers: LLaMA-2's SentencePiece BPE (tokenizer.model), reproduced exactly on tiktoken's BPE core, and a
tiny byte-level one for the built-in model. No sentencepiece or protobuf at run time.

    tok = load_tokenizer("path/to/tokenizer.model")  # or the folder holding it, or "byte"
    ids = tok.encode("Hello world", bos=True)         # [1, 15043, 3186]
    tok.decode(ids)                                   # "Hello world"

What SentencePiece BPE does (docs/design.md#llama-2s-sentencepiece-model): every " " becomes "▁" (U+2581) and
one "▁" is prepended; starting from Unicode characters it repeatedly merges the adjacent pair whose concatenation
is a piece with the highest score (ties: leftmost); a character that is no piece becomes its UTF-8 bytes as byte pieces.

tiktoken does BPE on bytes, merging the pair whose concatenation has the lowest rank, and a token's rank is
also what it outputs. Making it do the above:
  * Ranks follow scores; a rank -> ids table turns tiktoken's output into SentencePiece ids.
  * "▁" is spelled " " in tiktoken's tokens and in the text (a literal "▁" in the text is the same symbol to
    SentencePiece, so it becomes " " too).
  * SentencePiece starts from characters, tiktoken from bytes. Synthetic ranks for the UTF-8 prefixes of every
    character that occurs in a piece, all below any real merge, assemble multi-byte characters before anything
    else merges; otherwise a character's bytes could never join a real merge. Tokens left over that are no
    piece (such prefixes, characters without a piece of their own) expand back into byte pieces, which is
    SentencePiece's byte fallback.
  * The whitespace pieces ("▁▁" .. sixteen "▁") share the worst score, so SentencePiece merges them last and
    leftmost first: a run of spaces is cut 16, 16, ..., rest from the left. Ranking them last, longer before
    shorter, makes tiktoken grow the leftmost run first too.
  * Split pattern ' *[^ ]+| +': no piece has a "▁" after another character (checked at load), so nothing
    merges across a non-space -> space boundary; splitting there is exact and keeps tiktoken's chunks short.
  * tiktoken returns a chunk that is itself a token without running BPE. That is exact when every piece is
    what BPE makes of its own characters, as in a BPE-trained vocabulary (tests check all of LLaMA's).
"""
import codecs
import re
import struct
from itertools import chain
from pathlib import Path

import tiktoken

from bpe import ByteLevelBPE
from gguf_file import GGUFFile

SPACE = "\u2581"  # SentencePiece's visible space
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece piece types
SPLIT = r" *[^ ]+| +"

# SentencePiece decodes a run of byte pieces as UTF-8 and turns each invalid byte into one U+FFFD. Python's
# "replace" folds a truncated multi-byte sequence into a single U+FFFD, so resume one byte after the error.
codecs.register_error("sentencepiece", lambda err: ("\ufffd", err.start + 1))


class Tokenizer:
    """SentencePiece-compatible BPE. `pieces` is the vocabulary, a list of (piece, score, type) indexed by id."""

    def __init__(self, pieces, *, unk_id, bos_id, eos_id, pad_id=None, add_dummy_prefix=True,
                 remove_extra_whitespaces=False, escape_whitespaces=True, unk_surface=" \u2047 ", add_bos=True):
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = add_bos  # whether texts for the model start with BOS (data.format.bos reads it)
        self.end_ids = (eos_id,)  # the ids that end a generation
        self.vocab_size = len(pieces)
        self.add_dummy_prefix, self.remove_extra_ws = add_dummy_prefix, remove_extra_whitespaces
        self.escape_ws, self.unk_surface = escape_whitespaces, unk_surface
        self._pieces = [p for p, _, _ in pieces]
        self._types = [t for _, _, t in pieces]

        # Normal pieces as tiktoken sees them, "▁" spelled " " -> (id, score). A piece with a literal space
        # can never match (text spaces become "▁"), so it is left out.
        normal = {p.replace(SPACE, " "): (i, s) for i, (p, s, t) in enumerate(pieces) if t == NORMAL and " " not in p}
        byte_id = {int(p[3:5], 16): i for i, (p, _, t) in enumerate(pieces) if t == BYTE}

        # Ranks in merge order: the 256 bytes (tiktoken panics on a missing byte), then the UTF-8 prefixes of
        # every character used in a piece (whole characters included), then multi-character pieces by score.
        chars = {c.encode() for text in normal for c in text}
        prefixes = sorted({c[:k] for c in chars for k in range(2, len(c) + 1)})
        merges = sorted((t for t in normal if len(t) > 1), key=lambda t: (-normal[t][1], -len(t), normal[t][0]))
        tokens = [bytes([b]) for b in range(256)] + prefixes + [t.encode() for t in merges]
        self._enc = tiktoken.Encoding("sentencepiece-bpe", pat_str=SPLIT, special_tokens={},
                                      mergeable_ranks={tok: rank for rank, tok in enumerate(tokens)})
        # What each rank emits: its piece, or byte fallback for a token that is no piece.
        piece_id = {text.encode(): i for text, (i, _) in normal.items()}
        self._rank_ids = [(piece_id[t],) if t in piece_id else tuple(byte_id[b] for b in t) for t in tokens]
        self._rank_id = [ids[0] if len(ids) == 1 else -1 for ids in self._rank_ids]  # fast path, -1: several

    def _normalize(self, text):
        if self.remove_extra_ws:  # drop leading/trailing spaces, collapse runs of spaces
            text = " ".join(filter(None, text.split(" ")))
        if self.escape_ws:
            text = text.replace(SPACE, " ")
        if text and self.add_dummy_prefix:
            text = " " + text
        return text.rstrip(" ") if self.remove_extra_ws else text

    def _ids(self, ranks, bos, eos):
        ids = list(map(self._rank_id.__getitem__, ranks))
        if -1 in ids:  # a token that is no piece (an unknown character) expands into byte pieces
            ids = list(chain.from_iterable(map(self._rank_ids.__getitem__, ranks)))
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode(self, text, bos=False, eos=False):
        """Token ids of `text`; BOS/EOS only when asked (the text "<s>" is plain text)."""
        return self._ids(self._enc.encode_ordinary(self._normalize(text)), bos, eos)

    def encode_batch(self, texts, bos=False, eos=False, num_threads=8):
        """encode() for many texts at once, on tiktoken's thread pool."""
        batch = self._enc.encode_ordinary_batch([self._normalize(t) for t in texts], num_threads=num_threads)
        return [self._ids(ranks, bos, eos) for ranks in batch]

    def decode(self, ids):
        """Text of `ids`, exactly as sentencepiece's decode gives it."""
        if hasattr(ids, "tolist"):  # numpy array or torch tensor
            ids = ids.tolist()
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            raise IndexError(f"token id out of range [0, {self.vocab_size}): {min(ids)}..{max(ids)}")
        out, run = [], bytearray()  # run: pending byte pieces, decoded together
        # The dummy prefix: the first piece with visible text loses one leading "▁" (not for byte pieces).
        at_start = self.add_dummy_prefix or self.remove_extra_ws
        for i in ids:
            piece, kind = self._pieces[i], self._types[i]
            if kind == BYTE:
                run.append(int(piece[3:5], 16))
                continue
            if run:
                out.append(run.decode("utf-8", "sentencepiece"))
                run.clear()
            at_start = at_start and not out
            if kind == CONTROL:
                continue
            if kind == UNKNOWN:
                out.append(self.unk_surface)
                continue
            if at_start and piece.startswith(SPACE):
                piece = piece[1:]
                at_start = self.remove_extra_ws  # sentencepiece then also strips the next piece's "▁"
            if piece:
                out.append(piece.replace(SPACE, " "))
        if run:
            out.append(run.decode("utf-8", "sentencepiece"))
        return "".join(out)


def byte_tokenizer():
    """The built-in model's tokenizer, laid out like LLaMA's: 0 <unk> (never emitted), 1 <s>, 2 </s>, byte b -> 3 + b.
    vocab_size 259, no pad id. Round-trips any str (lone surrogates become U+FFFD, as in tiktoken)."""
    pieces = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    pieces += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    return Tokenizer(pieces, unk_id=0, bos_id=1, eos_id=2, add_dummy_prefix=False, escape_whitespaces=False)


def check_tokenizer_fits(tokenizer, model_vocab, name):
    """Refuse a tokenizer that cannot belong to a model with `model_vocab` embeddings: more ids than the model
    has, or far fewer (below 90%: checkpoints pad their embedding a little, never by a tenth). The message names
    both sizes. Raises SystemExit (a user's mistake, no traceback)."""
    n = tokenizer.vocab_size
    if n > model_vocab or n < 0.9 * model_vocab:
        raise SystemExit(f"{name} has {n:,} tokens but the model's vocabulary is {model_vocab:,}: it is not this "
                         f"model's tokenizer (pass the right --tokenizer, or none to use the checkpoint's own)")


def _varint(buf, pos):
    value = shift = 0
    while True:
        b = buf[pos]  # IndexError when truncated
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if b < 0x80:
            return value, pos


def _fields(buf):
    """(field number, value) pairs of one protobuf message: int for varints, bytes for the other wire types."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 2, 5):  # 64-bit, length-delimited, 32-bit
            size, pos = (8, pos) if wire == 1 else (4, pos) if wire == 5 else _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
            if pos > len(buf):
                raise IndexError
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _signed(v):  # int32 fields store negatives as 10-byte varints
    return v - (1 << 64) if v >= 1 << 63 else v


def _read_model(data, path):
    """Parse a SentencePiece ModelProto by hand: pieces (1), trainer_spec (2), normalizer_spec (3)."""
    pieces, trainer, norm = [], {}, {}
    try:
        for field, value in _fields(data):
            if field == 1:
                p = dict(_fields(value))
                pieces.append((p.get(1, b"").decode(), struct.unpack("<f", p.get(2, bytes(4)))[0], p.get(3, NORMAL)))
            elif field in (2, 3):  # a message field given twice merges, later values win
                (trainer if field == 2 else norm).update(_fields(value))
        unk, bos, eos, pad = (_signed(trainer.get(f, d)) for f, d in ((40, 0), (41, 1), (42, 2), (43, -1)))
        unk_surface = trainer.get(44, " \u2047 ".encode()).decode()
        byte_pieces = {int(p[3:5], 16) for p, _, t in pieces if t == BYTE}
    except IndexError:
        raise ValueError(f"{path}: not a valid SentencePiece model (truncated protobuf data)") from None
    except (ValueError, TypeError, AttributeError, struct.error) as e:  # wrong wire types, bad UTF-8, ...
        raise ValueError(f"{path}: not a valid SentencePiece model ({e})") from None
    problems = [msg for bad, msg in [
        (not pieces, "it has no pieces"),
        (trainer.get(3, 1) != 2, "model_type is not BPE"),
        (not trainer.get(35, 0), "byte_fallback is off"),
        (len(byte_pieces) != 256, "it lacks the 256 byte pieces"),
        (any(t not in (NORMAL, UNKNOWN, CONTROL, BYTE) for _, _, t in pieces), "it has user-defined or unused pieces"),
        (not all(0 <= i < len(pieces) for i in (unk, bos, eos)) or pad >= len(pieces), "special ids out of range"),
        (norm.get(2), "it has normalization rules (only identity is supported)"),
        (not norm.get(5, 1) or trainer.get(24, 0), "escape_whitespaces is off or treat_whitespace_as_suffix on"),
        (any(SPACE in p.lstrip(SPACE) for p, _, t in pieces if t == NORMAL), "a piece has '▁' inside"),
    ] if bad]
    if problems:
        raise ValueError(f"{path}: unsupported SentencePiece model: {'; '.join(problems)}")
    return Tokenizer(pieces, unk_id=unk, bos_id=bos, eos_id=eos, pad_id=pad if pad >= 0 else None,
                     add_dummy_prefix=bool(norm.get(3, 1)), remove_extra_whitespaces=bool(norm.get(4, 1)),
                     unk_surface=unk_surface)


def tokenizer_kind(file):
    """What a tokenizer file holds, judged by its first bytes (Meta's LLaMA-2 and LLaMA-3 both call theirs
    tokenizer.model): 'gguf', 'json' (tokenizer.json), 'tiktoken' (lines of base64 token and rank) or
    'sentencepiece' (a protobuf ModelProto, whose first field is a piece)."""
    with open(file, "rb") as f:
        head = f.read(256)
    if head[:4] == b"GGUF":
        return "gguf"
    if head.lstrip()[:1] == b"{":
        return "json"
    if re.match(rb"[A-Za-z0-9+/]+=* \d+\r?\n", head):
        return "tiktoken"
    if head[:1] == b"\x0a":  # field 1 (pieces), length-delimited
        return "sentencepiece"
    raise ValueError(f"{file}: not a tokenizer file this project reads (a SentencePiece model, tiktoken's "
                     f"'base64 rank' lines as in LLaMA-3's tokenizer.model, a tokenizer.json or a GGUF "
                     f"file); it starts with {head[:24]!r}")


def load_tokenizer(path):
    """"byte" -> the built-in byte tokenizer; a tokenizer.model (SentencePiece, or tiktoken's format as in
    Meta's LLaMA-3 release), a tokenizer.json (byte-level BPE, bpe.py) or a .gguf file (the tokenizer it carries),
    told apart by their content; or a folder holding tokenizer.model, tokenizer.json or a single .gguf,
    preferred in that order."""
    if str(path) == "byte":
        return byte_tokenizer()
    path = Path(path)
    file = path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        named = [f for f in (path / "tokenizer.model", path / "tokenizer.json") if f.is_file()]
        file = named[0] if named else ggufs[0] if len(ggufs) == 1 else None
        if file is None:
            found = f" (it has {len(ggufs)} .gguf files: give one of them)" if ggufs else ""
            raise FileNotFoundError(f"no tokenizer in the folder {path}: looked for tokenizer.model, tokenizer.json "
                                    f"or a single .gguf file{found}")
    elif not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: no such file or folder (give 'byte', a tokenizer.model, "
                                f"tokenizer.json or .gguf file, or a folder containing one)")
    kind = tokenizer_kind(file)
    if kind == "sentencepiece":
        return _read_model(file.read_bytes(), file)
    if kind == "gguf":
        return tokenizer_from_gguf(file)
    if kind == "json":
        return ByteLevelBPE.from_tokenizer_json(file)
    return ByteLevelBPE.from_tiktoken_file(file)


def tokenizer_from_gguf(gguf):
    """The tokenizer a GGUF file carries (a GGUFFile or a path): ByteLevelBPE for tokenizer.ggml.model "gpt2",
    Tokenizer (SentencePiece) for "llama"."""
    if isinstance(gguf, (str, Path)):
        with GGUFFile(gguf) as f:
            return tokenizer_from_gguf(f)
    meta, path = gguf.metadata, gguf.path
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return ByteLevelBPE.from_gguf(meta, path)
    if kind != "llama":
        raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2', byte-level BPE, and "
                         f"'llama', SentencePiece)")
    missing = [key for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores") if key not in meta]
    if missing:
        raise ValueError(f"{path}: missing metadata key {missing[0]!r}")
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    types = meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))  # same numbering as SentencePiece
    if not len(tokens) == len(scores) == len(types):
        raise ValueError(f"{path}: tokenizer.ggml.tokens, scores and token_type differ in length")
    ids = dict(unk_id=meta.get("tokenizer.ggml.unknown_token_id", 0), bos_id=meta.get("tokenizer.ggml.bos_token_id", 1),
               eos_id=meta.get("tokenizer.ggml.eos_token_id", 2), pad_id=meta.get("tokenizer.ggml.padding_token_id"))
    problems = [msg for bad, msg in [
        (sum(t == BYTE for t in types) != 256, "it lacks the 256 byte pieces <0x00>..<0xFF>"),
        (any(t not in (NORMAL, UNKNOWN, CONTROL, UNUSED, BYTE) for t in types), "it has user-defined pieces"),
        (any(not 0 <= i < len(tokens) for i in ids.values() if i is not None), "special ids out of range"),
        (any(SPACE in p.lstrip(SPACE) for p, t in zip(tokens, types) if t == NORMAL), "a piece has '▁' inside"),
    ] if bad]
    if problems:
        raise ValueError(f"{path}: unsupported SentencePiece vocabulary: {'; '.join(problems)}")
    tok = Tokenizer(list(zip(tokens, scores, types)), **ids,
                    add_dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
    tok.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp's default for SentencePiece
    return tok
