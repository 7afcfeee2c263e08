"""gguf_file.py against the gguf package (llama.cpp's own reader, writer and dequantization): small files written
here with GGUFWriter, hand-made broken files, and the real SmolLM2-135M-Instruct GGUF when its wheel is installed."""
import struct

import numpy as np
import pytest
import torch

from gguf_file import GGUFFile, llama_config_from_gguf, token_ids_from_gguf
from tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf", reason="the reference GGUF reader/writer (pip install gguf)")
Q = gguf.GGMLQuantizationType


def write_gguf(path, tensors=(), meta=None, arch="llama", alignment=None):
    """A GGUF file from (name, numpy array, ggml type) triples and {key: (add_* method name, value)}."""
    w = gguf.GGUFWriter(path, arch)
    if alignment:
        w.add_custom_alignment(alignment)
    for key, (kind, value) in (meta or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    for name, data, qtype in tensors:
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, gguf.quants.quantize(data, qtype))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sample(shape, seed):
    r = np.random.default_rng(seed)
    x = r.standard_normal(shape) * r.choice([1e-3, 0.1, 1.0, 30.0], size=shape[:-1] + (1,))  # rows of varied scale
    x.flat[:5] = [0.0, -0.0, 1.0, -7.5, 65000.0]
    return x.astype(np.float32)


TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tensors = [(f"t.{q.name}", sample((3, 4, 64) if i % 2 else (8, 96), i), q) for i, q in enumerate(TYPES)]
    tensors.append(("vec", sample((1, 32), 9)[0], Q.F32))  # one dimension
    return write_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf", tensors, alignment=64)


def same_bits(a, b):
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_tensors_match_gguf_package(small):
    ref = gguf.GGUFReader(small)
    with GGUFFile(small) as f:
        assert f.version == 3 and f.data_offset % 64 == 0
        assert list(f.tensors) == [t.name for t in ref.tensors]
        for t in ref.tensors:
            info = f.tensors[t.name]
            assert info.shape == tuple(reversed(t.shape.tolist()))  # GGUF lists dims innermost first
            assert (info.type, info.offset, info.nbytes) == (t.tensor_type, t.data_offset, t.n_bytes)
            ours = f.tensor(t.name)
            assert ours.dtype == torch.float32 and tuple(ours.shape) == info.shape
            expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(info.shape)
            assert same_bits(ours.numpy(), expected), t.name  # bit for bit in float32
            assert torch.equal(f.tensor(t.name, torch.bfloat16), ours.to(torch.bfloat16))
        assert f.tensors["t.F32"].shape == (8, 96) and f.tensors["t.Q4_1"].shape == (3, 4, 64)
        assert f.tensors["vec"].shape == (32,) and f.tensors["t.Q4_1"].type_name == "Q4_1"


def test_quantized_values_are_close(small):
    """Independent of the gguf package: dequantized values are near what was quantized."""
    with GGUFFile(small) as f:
        for i, q in enumerate(TYPES):
            x = torch.from_numpy(sample((3, 4, 64) if i % 2 else (8, 96), i))
            tol = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.2, Q.Q4_1: 0.2}[q]
            scale = x.abs().amax(dim=-1, keepdim=True)
            assert ((f.tensor(f"t.{q.name}") - x).abs() <= tol * scale + 1e-6).all(), q.name


def test_metadata_types(tmp_path):
    meta = {"a.u8": ("uint8", 200), "a.i8": ("int8", -100), "a.u16": ("uint16", 60000), "a.i16": ("int16", -30000),
            "a.u32": ("uint32", 4_000_000_000), "a.i32": ("int32", -2_000_000_000), "a.f32": ("float32", 0.1),
            "a.u64": ("uint64", 2 ** 63 + 5), "a.i64": ("int64", -(2 ** 62)), "a.f64": ("float64", 0.1),
            "a.true": ("bool", True), "a.false": ("bool", False), "a.str": ("string", "héllo 中 😀"),
            "a.ints": ("array", [1, -2, 3]), "a.floats": ("array", [0.5, -1.25]), "a.strs": ("array", ["x", "", "ü"]),
            "a.bools": ("array", [True, False, True]), "a.nested": ("array", [[1, 2], [3]])}
    path = write_gguf(tmp_path / "m.gguf", [("w", np.ones((2, 32), np.float32), Q.F32)], meta)
    ref = gguf.GGUFReader(path)
    with GGUFFile(path) as f:
        assert set(f.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}
        for key, field in ref.fields.items():
            if not key.startswith("GGUF.") and key != "a.nested":
                assert f.metadata[key] == field.contents(), key
        assert f.metadata["a.f32"] == float(np.float32(0.1)) and f.metadata["a.f64"] == 0.1
        assert f.metadata["a.u64"] == 2 ** 63 + 5 and f.metadata["a.str"] == "héllo 中 😀"
        assert f.metadata["a.bools"] == [True, False, True] and f.metadata["a.nested"] == [[1, 2], [3]]
        assert type(f.metadata["a.true"]) is bool and f.metadata["general.architecture"] == "llama"


# -- broken files, each with a clear message naming the file

def gstr(s):
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def raw(kv=b"", n_kv=1, version=3, magic=b"GGUF"):
    return magic + struct.pack("<IQQ", version, 0, n_kv) + kv


BROKEN = {
    "wrong magic": (b"GGML" + raw()[4:], "not a GGUF file"),
    "short file": (b"GG", "not a GGUF file"),
    "old version": (raw(version=1), "unsupported GGUF version 1"),
    "big-endian": (raw(version=3 << 24), "big-endian"),
    "truncated header": (raw()[:10], "truncated GGUF file .*header"),
    "truncated key": (raw(gstr("general.name")[:9]), "truncated GGUF file .*metadata entry 0"),
    "truncated value": (raw(gstr("k") + struct.pack("<I", 8) + struct.pack("<Q", 100) + b"abc"),
                        "truncated GGUF file .*metadata 'k'"),
    "missing entries": (raw(gstr("k") + struct.pack("<II", 4, 7), n_kv=2), "truncated GGUF file .*metadata entry 1"),
    "huge array": (raw(gstr("k") + struct.pack("<IIQ", 9, 4, 2 ** 60)), "truncated GGUF file .*metadata 'k'"),
    "huge string array": (raw(gstr("k") + struct.pack("<IIQ", 9, 8, 2 ** 60)), "truncated GGUF file .*metadata 'k'"),
    "unknown value type": (raw(gstr("k") + struct.pack("<I", 99)), "unknown GGUF value type 99 in metadata 'k'"),
    "unknown element type": (raw(gstr("k") + struct.pack("<IIQ", 9, 42, 1)), "unknown GGUF value type 42"),
    "bad UTF-8 key": (raw(gstr(b"\xff\xfe") + struct.pack("<IB", 0, 1)), "bad UTF-8 in metadata entry 0"),
    "bad UTF-8 value": (raw(gstr("k") + struct.pack("<I", 8) + gstr(b"a\xc3")), "bad UTF-8 in metadata 'k'"),
    "empty": (b"", "empty file"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_files(case, tmp_path):
    data, message = BROKEN[case]
    path = tmp_path / f"{case.replace(' ', '_')}.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as e:
        GGUFFile(path)
    assert str(path) in str(e.value)


def test_truncated_tensor_data(small, tmp_path):
    data = small.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=f"{cut}: the data of tensor 'vec' runs past the end of the file"):
        GGUFFile(cut)
    cut.write_bytes(data[:200])  # inside the tensor infos
    with pytest.raises(ValueError, match="truncated GGUF file .*tensor info"):
        GGUFFile(cut)


def test_unsupported_tensor_type(tmp_path):
    x = sample((2, 256), 3)
    path = write_gguf(tmp_path / "q.gguf", [("a", x, Q.Q5_0), ("b", x, Q.F32)])
    with GGUFFile(path) as f:
        assert f.tensors["a"].type == 6 and f.tensors["a"].nbytes is None
        with pytest.raises(ValueError, match=r"tensor 'a' has ggml type 6 \(Q5_0\)"):
            f.tensor("a")
        assert torch.equal(f.tensor("b"), torch.from_numpy(x))  # the others still load
        with pytest.raises(KeyError, match="no tensor named 'c'"):
            f.tensor("c")
    # Q4_K (no quantizer in the gguf package): raw blocks of 256 values in 144 bytes
    w = gguf.GGUFWriter(tmp_path / "k.gguf", "llama")
    w.add_tensor("k", np.zeros((4, 144), np.uint8), raw_dtype=Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(tmp_path / "k.gguf") as f:
        assert f.tensors["k"].shape == (4, 256)
        with pytest.raises(ValueError, match=r"k\.gguf: tensor 'k' has ggml type 12 \(Q4_K\)"):
            f.tensor("k")


# -- llama_config_from_gguf

LLAMA = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
         "llama.feed_forward_length": 160, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
         "llama.rope.freq_base": np.float32(5e5).item(),  # float32 in a file, as read back
         "llama.attention.layer_norm_rms_epsilon": np.float32(1e-6).item(),
         "llama.context_length": 128, "llama.vocab_size": 100}


def test_llama_config():
    cfg = llama_config_from_gguf(LLAMA, "x.gguf")
    assert cfg == dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=160, norm_eps=1e-6,
                       rope_theta=500000.0, max_seq_len=128)
    from model import LlamaConfig
    assert LlamaConfig(**cfg).hidden_dim == 160
    defaults = {k: v for k, v in LLAMA.items() if k not in ("llama.rope.freq_base", "llama.attention.head_count_kv",
                                                            "llama.vocab_size")}
    cfg = llama_config_from_gguf({**defaults, "tokenizer.ggml.tokens": ["a"] * 7}, "x.gguf")
    assert (cfg["rope_theta"], cfg["n_kv_heads"], cfg["vocab_size"]) == (10000.0, 4, 7)


@pytest.mark.parametrize("change, message", [
    ({"general.architecture": "gpt2"}, "x.gguf: architecture 'gpt2' is not supported"),
    ({"general.architecture": None}, "architecture None"),
    ({"llama.block_count": None}, "x.gguf: missing metadata key 'llama.block_count'"),
    ({"llama.attention.layer_norm_rms_epsilon": None}, "missing metadata key 'llama.attention.layer_norm_rms_epsilon'"),
    ({"llama.vocab_size": None}, "missing metadata key 'llama.vocab_size'"),
    ({"llama.attention.head_count_kv": [2, 2]}, "'llama.attention.head_count_kv' is a per-layer list"),
    ({"llama.expert_count": 8}, "mixture-of-experts"),
    ({"llama.rope.scaling.type": "yarn"}, "rope.scaling.type = 'yarn'"),
    ({"llama.rope.dimension_count": 8}, "rope.dimension_count = 8"),
])
def test_llama_config_errors(change, message):
    meta = {k: v for k, v in {**LLAMA, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        llama_config_from_gguf(meta, "x.gguf")


# -- the real model

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return smollm2_gguf_path, gguf.GGUFReader(smollm2_gguf_path)  # the reference reader takes about 3 s to open: once


def test_smollm2_metadata(smollm2):
    with GGUFFile(smollm2[0]) as f:
        assert f.version == 3 and len(f.tensors) == 272 and "general.alignment" not in f.metadata
        assert llama_config_from_gguf(f.metadata, f.path) == dict(
            dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536, norm_eps=1e-5,
            rope_theta=100000.0, max_seq_len=8192)
        assert token_ids_from_gguf(f.metadata) == dict(bos_id=1, eos_id=2, pad_id=2, unk_id=0)
        kinds = [t.type_name for t in f.tensors.values()]
        assert (kinds.count("Q4_1"), kinds.count("F32"), kinds.count("Q8_0")) == (210, 61, 1)
        assert f.tensors["token_embd.weight"].shape == (49152, 576) and "output.weight" not in f.tensors
        assert f.tensors["blk.0.attn_k.weight"].shape == (192, 576)
        assert f.tensors["blk.0.ffn_down.weight"].shape == (576, 1536)
        assert f.metadata["tokenizer.ggml.model"] == "gpt2" and f.metadata["tokenizer.ggml.pre"] == "smollm"


def test_smollm2_tensors_match_gguf_package(smollm2):
    """All 272 tensors (Q8_0 embedding, Q4_1 matrices, F32 norms) bit for bit in float32; about a second."""
    path, ref = smollm2
    with GGUFFile(path) as f:
        assert list(f.tensors) == [t.name for t in ref.tensors]
        for t in ref.tensors:
            expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(f.tensors[t.name].shape)
            assert same_bits(f.tensor(t.name).numpy(), expected), t.name


def test_smollm2_tokenizer(smollm2):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers
    path, reader = smollm2
    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    ref = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = decoders.ByteLevel()
    tok = load_tokenizer(path)
    for text in ["Hello world", "Hello world 2024!\n\tx  ", "naïve 中文 😀"]:
        assert tok.encode(text) == ref.encode(text).ids
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text).ids) == text
    assert tok.encode("Hello world") == [19556, 905]
