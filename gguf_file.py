"""Read GGUF files (llama.cpp's format) with numpy and torch only: metadata, tensor infos, and one tensor at a
time dequantized from a memory map, so a whole model never sits in memory twice.

    f = GGUFFile("SmolLM2-135M-Instruct.Q4_1.gguf")
    f.metadata["llama.block_count"]               # 30
    f.tensors["token_embd.weight"].shape          # (49152, 576), torch order
    w = f.tensor("token_embd.weight")             # float32 torch tensor
    cfg = LlamaConfig(**llama_config_from_gguf(f.metadata, f.path))

Layout (little-endian): b"GGUF", version u32 (2 or 3), tensor count u64, metadata count u64; the metadata
(key string, value type u32, value); the tensor infos (name, n_dims u32, dims u64 each, ggml type u32, offset
u64); then the data section at the next multiple of general.alignment. Strings are a u64 length and UTF-8.
GGUF lists dims innermost first, so the torch shape is the reverse. The file is named gguf_file.py because a
gguf.py here would shadow the `gguf` package that the tests compare against.
"""
import mmap
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

# Every ggml type id, for error messages; BLOCKS says which of them this reader dequantizes.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
BLOCKS = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34)}  # type -> (values, bytes) per block

# Metadata value types: 0-7 and 10-12 are fixed-size scalars, 8 a string, 9 an array.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class TensorInfo(NamedTuple):
    name: str
    shape: tuple   # torch order (GGUF's dims reversed)
    type: int      # ggml type id, see GGML_TYPE_NAMES
    offset: int    # absolute byte offset in the file
    nbytes: int | None  # None for a type whose block size this reader does not know

    @property
    def type_name(self):
        return GGML_TYPE_NAMES.get(self.type, f"unknown type {self.type}")


class _Cursor:
    """Reads little-endian values from a buffer; any read past its end is a ValueError naming the file."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos = buf, path, 0

    def need(self, n, what):
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF file (it ends inside {what})")

    def scalar(self, fmt, what):
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def strings(self, count, what):
        """`count` strings in one tight loop (a vocabulary holds 50k+ tokens and merges)."""
        self.need(8 * count, what)
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                break
            n = length(buf, pos)[0]
            out.append(buf[pos + 8:pos + 8 + n])
            pos += 8 + n
        self.pos = pos
        if len(out) < count or pos > end:
            raise ValueError(f"{self.path}: truncated GGUF file (it ends inside {what})")
        try:
            return [s.decode("utf-8") for s in out]
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: bad UTF-8 in {what} ({e.reason} at byte {e.start})") from None

    def value(self, vtype, what):
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype], what)
        if vtype == STRING:
            return self.strings(1, what)[0]
        if vtype != ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF value type {vtype} in {what}")
        etype, count = self.scalar("I", what), self.scalar("Q", what)
        if etype in SCALARS:  # numbers in one numpy read, not a Python loop
            dtype = np.dtype("<" + SCALARS[etype])
            self.need(count * dtype.itemsize, what)
            self.pos += count * dtype.itemsize
            return np.frombuffer(self.buf, dtype, count, self.pos - count * dtype.itemsize).tolist()
        if etype == STRING:
            return self.strings(count, what)
        if etype != ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF value type {etype} in the elements of {what}")
        self.need(count, what)  # every element takes at least one byte: catches absurd counts early
        return [self.value(etype, what) for _ in range(count)]


class GGUFFile:
    """A GGUF file opened read-only: .version, .metadata (key -> value), .tensors (name -> TensorInfo), and
    .tensor(name) to dequantize one tensor. Usable as a context manager; close() releases the memory map."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            if self.path.stat().st_size == 0:
                raise ValueError(f"{self.path}: empty file, not a GGUF file")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self):
        c = _Cursor(self._map, self.path)
        magic = bytes(self._map[:4])
        if magic != b"GGUF":
            raise ValueError(f"{self.path}: not a GGUF file (it starts with {magic!r}, expected b'GGUF')")
        c.pos = 4
        self.version = c.scalar("I", "the header")
        if self.version not in (2, 3):
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            hint = " (a big-endian file: not supported)" if swapped in (2, 3) else ""
            raise ValueError(f"{self.path}: unsupported GGUF version {self.version}{hint}; this reader knows 2 and 3")
        n_tensors, n_kv = c.scalar("Q", "the header"), c.scalar("Q", "the header")

        self.metadata = {}
        for i in range(n_kv):
            key = c.strings(1, f"metadata entry {i}")[0]
            self.metadata[key] = c.value(c.scalar("I", f"metadata {key!r}"), f"metadata {key!r}")

        infos = []
        for i in range(n_tensors):
            name = c.strings(1, f"tensor info {i}")[0]
            n_dims = c.scalar("I", f"tensor info {name!r}")
            c.need(8 * n_dims, f"tensor info {name!r}")
            dims = [c.scalar("Q", f"tensor info {name!r}") for _ in range(n_dims)]
            infos.append((name, dims, c.scalar("I", f"tensor info {name!r}"), c.scalar("Q", f"tensor info {name!r}")))

        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0:
            raise ValueError(f"{self.path}: bad general.alignment {align!r}")
        self.data_offset = -(-c.pos // align) * align

        self.tensors = {}
        for name, dims, ggml_type, offset in infos:
            count = int(np.prod(dims, dtype=np.int64)) if dims else 1
            nbytes = None
            if ggml_type in BLOCKS:
                per_block, block_bytes = BLOCKS[ggml_type]
                if count % per_block:
                    raise ValueError(f"{self.path}: tensor {name!r} has {count} values, not a multiple of the "
                                     f"{GGML_TYPE_NAMES[ggml_type]} block size {per_block}")
                nbytes = count // per_block * block_bytes
                if self.data_offset + offset + nbytes > len(self._map):
                    raise ValueError(f"{self.path}: the data of tensor {name!r} runs past the end of the file "
                                     f"(truncated: {len(self._map)} bytes, it needs "
                                     f"{self.data_offset + offset + nbytes})")
            if name in self.tensors:
                raise ValueError(f"{self.path}: tensor {name!r} is listed twice")
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), ggml_type, self.data_offset + offset, nbytes)

    def tensor(self, name, dtype=torch.float32):
        """Tensor `name` as a new torch tensor of `dtype` in torch shape (dequantized in float32, then cast)."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        if info.type not in BLOCKS:
            raise ValueError(f"{self.path}: tensor {name!r} has ggml type {info.type} ({info.type_name}); this "
                             f"reader supports F32, F16, BF16, Q8_0, Q4_0 and Q4_1")
        # A copy of the raw bytes: torch wants a writable buffer, and the result must outlive the map.
        raw = np.frombuffer(self._map, np.uint8, info.nbytes, info.offset).copy()
        if info.type == 0:
            out = torch.from_numpy(raw.view("<f4"))
        elif info.type == 1:
            out = torch.from_numpy(raw.view("<f2"))
        elif info.type == 30:
            out = torch.from_numpy(raw.view("<i2")).view(torch.bfloat16)
        else:
            out = dequantize_blocks(torch.from_numpy(raw.reshape(-1, BLOCKS[info.type][1])), info.type)
        return out.reshape(info.shape).to(dtype)

    def raw(self, name):
        """Tensor `name`'s bytes as stored (quantized blocks left as they are): a uint8 copy of shape (rows, bytes
        per row), rows in torch order."""
        info = self.tensors[name]
        raw = np.frombuffer(self._map, np.uint8, info.nbytes, info.offset).copy()
        return torch.from_numpy(raw).view(info.shape[0] if len(info.shape) == 2 else 1, -1)

    def close(self):
        if getattr(self, "_map", None) is not None:
            self._map.close()
            self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"GGUFFile({str(self.path)!r}, version {self.version}, {len(self.tensors)} tensors)"


def dequantize_blocks(blocks, ggml_type):
    """(n, block bytes) uint8 -> (n, 32) float32. The same float32 operations as llama.cpp's reference
    (x = d*q, d*(q - 8), d*q + m), so the results match the gguf package's dequantize bit for bit."""
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    if ggml_type == 8:  # Q8_0: f16 scale, 32 int8
        return blocks[:, 2:].contiguous().view(torch.int8).float().mul_(d)
    packed = blocks[:, 4:] if ggml_type == 3 else blocks[:, 2:]
    # Value j < 16 is the low nibble of byte j, value j + 16 its high nibble.
    q = torch.cat([packed & 0x0F, packed >> 4], dim=1)
    if ggml_type == 2:  # Q4_0: f16 scale, centred on 8
        return (q.to(torch.int8) - 8).float().mul_(d)
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()  # Q4_1: f16 scale and f16 minimum
    return q.float().mul_(d).add_(m)


def _f32_value(x):
    """A float32 from the file as the shortest decimal that rounds to it: GGUF stores 1e-5 as 9.99999975e-06,
    and the model should see the 1e-5 its config was written with. Other values stay as they are."""
    return float(str(np.float32(x))) if float(np.float32(x)) == x else x


def llama_config_from_gguf(metadata, path="<gguf>"):
    """Keyword arguments for model.LlamaConfig from a llama-architecture GGUF's metadata."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (only 'llama')")

    def get(key, default=KeyError):
        value = metadata.get(f"llama.{key}", default)
        if value is KeyError:
            raise ValueError(f"{path}: missing metadata key 'llama.{key}'")
        if isinstance(value, list):
            raise ValueError(f"{path}: 'llama.{key}' is a per-layer list; only one value for all layers is supported")
        return value

    n_heads = get("attention.head_count")
    dim = get("embedding_length")
    vocab = get("vocab_size", None)
    if vocab is None:
        if "tokenizer.ggml.tokens" not in metadata:
            raise ValueError(f"{path}: missing metadata key 'llama.vocab_size' (and no tokenizer.ggml.tokens)")
        vocab = len(metadata["tokenizer.ggml.tokens"])
    # Variants that share the llama architecture name but not our model: refuse them rather than run wrongly.
    if get("expert_count", 0):
        raise ValueError(f"{path}: llama.expert_count = {get('expert_count')}: mixture-of-experts is not supported")
    if get("rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: llama.rope.scaling.type = {get('rope.scaling.type')!r} is not supported")
    if get("rope.dimension_count", dim // n_heads) != dim // n_heads:
        raise ValueError(f"{path}: llama.rope.dimension_count = {get('rope.dimension_count')}: only RoPE over the "
                         f"whole head ({dim // n_heads}) is supported")
    return dict(dim=dim, n_layers=get("block_count"), n_heads=n_heads,
                n_kv_heads=get("attention.head_count_kv", n_heads),  # absent: no grouping (llama.cpp's default)
                vocab_size=vocab, hidden_dim=get("feed_forward_length"),
                norm_eps=_f32_value(get("attention.layer_norm_rms_epsilon")),
                rope_theta=_f32_value(get("rope.freq_base", 10000.0)), max_seq_len=get("context_length"))


def token_ids_from_gguf(metadata):
    """The special token ids the file names: a dict with any of bos_id, eos_id, pad_id, unk_id."""
    keys = dict(bos_id="bos_token_id", eos_id="eos_token_id", pad_id="padding_token_id", unk_id="unknown_token_id")
    return {k: metadata[f"tokenizer.ggml.{v}"] for k, v in keys.items() if f"tokenizer.ggml.{v}" in metadata}
