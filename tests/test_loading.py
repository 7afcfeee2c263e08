"""Loading and exporting checkpoints: logits equal transformers' LlamaForCausalLM for HF folders (sharded
safetensors, sharded .bin), Meta folders written here (interleaved q/k rows, two shards), and our save_hf export
of a LoRA-merged model read back by transformers; dtypes; that loading maps the files instead of copying them;
and a clear error for each kind of bad input."""
import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import random_hf_llama

from lora import apply_lora, lora_layers, merge_lora
from weights import from_pretrained, save_hf

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (the reference reader/writer, test-only)

VOCAB = 96
# 20 positions, batch of 2: RoPE is the identity at position 0, so only later positions can catch a wrong layout
IDX = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
CASES = {  # LLaMA-style hyper-parameters as Meta's params.json would state them
    "gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5),
    "mha": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-6),
}


def ffn_width(dim, multiple_of, ffn_dim_multiplier):
    """Meta's format (docs/design.md#metas-release), written out again here so the test does not trust the code
    under test."""
    h = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier:
        h = int(ffn_dim_multiplier * h)
    return multiple_of * math.ceil(h / multiple_of)


def hf_model(case, rope_theta=10000.0, seed=0):
    """transformers' LlamaForCausalLM with weights of std 0.1 and RMSNorm weights that are not all ones."""
    c = CASES[case]
    cfg = transformers.LlamaConfig(
        hidden_size=c["dim"], num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
        num_key_value_heads=c["n_kv_heads"], vocab_size=VOCAB, rms_norm_eps=c["norm_eps"], rope_theta=rope_theta,
        intermediate_size=ffn_width(c["dim"], c["multiple_of"], c["ffn_dim_multiplier"]),
        max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.1, attn_implementation="eager")
    return random_hf_llama(transformers, cfg, seed)


def hf_logits(model, idx=IDX):
    with torch.no_grad():
        return model(idx).logits


def assert_same_logits(ours, expected, idx=IDX):
    with torch.no_grad():
        got = ours(idx)[0]
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4
    # the comparison means something only if positions and rows differ clearly from each other
    assert (expected[:, 1:] - expected[:, :1]).abs().amax(-1).min() > 0.1
    assert (expected[1] - expected[0]).abs().amax(-1).min() > 0.1


def save_bin_shards(model, folder, n_shards=3):
    """The pytorch_model-0000i-of-0000n.bin + index layout that older transformers wrote, with the
    rotary_emb.inv_freq buffers that 2023 LLaMA-2 conversions contain (to be skipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    keys = sorted(state)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = keys[i::n_shards]
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


HF_TO_META = [(r"model\.embed_tokens\.", "tok_embeddings."), (r"model\.norm\.", "norm."), (r"lm_head\.", "output."),
              (r"model\.layers\.(\d+)\.self_attn\.(.)_proj\.", r"layers.\1.attention.w\2."),
              (r"model\.layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.feed_forward.w1."),
              (r"model\.layers\.(\d+)\.mlp\.up_proj\.", r"layers.\1.feed_forward.w3."),
              (r"model\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
              (r"model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
              (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm.")]


def hf_to_meta_rows(w, n_heads):
    """HF pairs x[i] with x[i + hd/2]; Meta pairs x[2i] with x[2i+1]: interleave the two halves of each head."""
    out_dim, d = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, d).transpose(1, 2).reshape(out_dim, d)


def meta_state(model, case):
    """HF weights -> Meta's names and q/k row order (the layout of Meta's consolidated.NN.pth)."""
    c = CASES[case]
    state = {}
    for key, w in model.state_dict().items():
        for pattern, repl in HF_TO_META:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        else:
            raise AssertionError(f"test helper: no Meta name for {key}")
        if key.endswith("attention.wq.weight"):
            w = hf_to_meta_rows(w, c["n_heads"])
        if key.endswith("attention.wk.weight"):
            w = hf_to_meta_rows(w, c["n_kv_heads"])
        state[key] = w
    return state


def save_meta(model, case, folder, n_shards=2, dtype=None, params_override=None):
    """params.json + consolidated.NN.pth as Meta ships them: model-parallel shards (embeddings, wo and w2 split
    along dim 1, other matrices along dim 0, 1-D tensors replicated), a rope.freqs buffer, vocab_size -1."""
    folder.mkdir(parents=True, exist_ok=True)
    c = CASES[case]
    state = meta_state(model, case)
    shards = [{} for _ in range(n_shards)]
    for key, w in state.items():
        w = w.to(dtype or w.dtype)
        for i, shard in enumerate(shards):
            if w.dim() == 1:
                shard[key] = w.clone()
            else:
                split = 1 if re.search(r"tok_embeddings|wo\.|w2\.", key) else 0
                shard[key] = w.chunk(n_shards, dim=split)[i].clone()  # clone: save only this shard's bytes
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.rand(c["dim"] // c["n_heads"] // 2)
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    params = {"dim": c["dim"], "n_layers": c["n_layers"], "n_heads": c["n_heads"], "multiple_of": c["multiple_of"],
              "norm_eps": c["norm_eps"], "vocab_size": -1}
    if c["n_kv_heads"] != c["n_heads"]:  # absent means n_heads, as in the 7B and 13B releases
        params["n_kv_heads"] = c["n_kv_heads"]
    if c["ffn_dim_multiplier"]:
        params["ffn_dim_multiplier"] = c["ffn_dim_multiplier"]
    params.update(params_override or {})
    (folder / "params.json").write_text(json.dumps(params))


# ---------------------------------------------------------------------------------------------------------
# parity with transformers

@pytest.mark.parametrize("case", ["gqa", "mha"])
def test_hf_sharded_safetensors_match_transformers(case, tmp_path):
    ref = hf_model(case, rope_theta=500.0)  # not the default theta: it must be read from config.json
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    model = from_pretrained(tmp_path)
    assert model.config.rope_theta == 500.0 and model.config.norm_eps == CASES[case]["norm_eps"]
    assert_same_logits(model, hf_logits(ref))


@pytest.mark.parametrize("writer", ["transformers", "by hand"])
def test_hf_sharded_bin_matches_transformers(writer, tmp_path):
    ref = hf_model("gqa", rope_theta=500.0)
    if writer == "transformers":
        ref.save_pretrained(tmp_path, max_shard_size="40KB", safe_serialization=False)
        if not list(tmp_path.glob("pytorch_model*.bin")):
            pytest.skip(f"transformers {transformers.__version__} ignores safe_serialization=False and writes "
                        f"safetensors only; the 'by hand' variant covers pytorch_model-*.bin + index")
    else:
        save_bin_shards(ref, tmp_path)
    assert (tmp_path / "pytorch_model.bin.index.json").exists()
    assert_same_logits(from_pretrained(tmp_path), hf_logits(ref))


@pytest.mark.parametrize("case", ["gqa", "mha"])
def test_meta_two_shards_match_transformers(case, tmp_path):
    ref = hf_model(case)  # Meta's params.json has no rope_theta: 10000
    save_meta(ref, case, tmp_path)
    model = from_pretrained(tmp_path)
    c = CASES[case]
    assert model.config.vocab_size == VOCAB  # vocab_size -1: taken from the embedding
    assert model.config.n_kv_heads == c["n_kv_heads"]
    assert model.config.hidden_dim == {"gqa": 224, "mha": 176}[case]  # 1.3 * 170 -> 221 -> 224; 170 -> 176
    assert_same_logits(model, hf_logits(ref))


def test_one_token_cannot_tell_the_rope_layouts_apart(tmp_path):
    """The trap of docs/design.md#rope-layouts: Meta's q/k rows loaded without the permutation give the right logits at
    position 0 and wrong ones after. The parity tests above use 20 positions, so they catch it."""
    ref = hf_model("gqa")
    expected = hf_logits(ref)
    save_meta(ref, "gqa", tmp_path)
    model = from_pretrained(tmp_path)
    meta = meta_state(ref, "gqa")
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.attn.q.weight.copy_(meta[f"layers.{i}.attention.wq.weight"])
            layer.attn.k.weight.copy_(meta[f"layers.{i}.attention.wk.weight"])
        wrong = model(IDX)[0]
    assert (wrong[:, 0] - expected[:, 0]).abs().max() <= 1e-4
    assert (wrong[:, 1:] - expected[:, 1:]).abs().max() > 1e-2


@pytest.mark.parametrize("merge_first", [False, True])
def test_save_hf_of_lora_model_loads_in_transformers(make_model, tmp_path, merge_first):
    ours = make_model(n_layers=2, n_kv_heads=2, vocab_size=VOCAB, rope_theta=500.0, norm_eps=1e-5)
    with torch.no_grad():
        base = ours(IDX)[0]
    apply_lora(ours, rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"), verbose=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_layers(ours):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
        expected = ours(IDX)[0]
    assert (expected - base).abs().max() > 0.05  # the adapters matter, so forgetting to merge them would show
    if merge_first:
        merge_lora(ours)  # save_hf must not add the adapters a second time
    save_hf(ours, tmp_path)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert ref.dtype == torch.float32
    assert (hf_logits(ref) - expected).abs().max() <= 1e-4
    with torch.no_grad():  # exporting leaves our model as it was
        assert (ours(IDX)[0] - expected).abs().max() <= 1e-5
    assert all(m.merged == merge_first for m in lora_layers(ours))
    assert_same_logits(from_pretrained(tmp_path), expected)


# ---------------------------------------------------------------------------------------------------------
# dtypes and memory

def test_dtype_is_kept_unless_given(make_model, tmp_path):
    ours = make_model(n_layers=2, vocab_size=VOCAB)
    save_hf(ours, tmp_path / "hf", dtype=torch.bfloat16)
    save_meta(hf_model("gqa"), "gqa", tmp_path / "meta", dtype=torch.bfloat16)
    file_weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert file_weights["model.embed_tokens.weight"].dtype == torch.bfloat16
    for folder in ("hf", "meta"):
        model = from_pretrained(tmp_path / folder)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, folder
        with torch.no_grad():
            assert model(IDX)[0].dtype == torch.bfloat16
    model = from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.embed.weight, file_weights["model.embed_tokens.weight"].float())
    with torch.no_grad():  # bf16 weights in an fp32 model: close to the original fp32 model
        torch.testing.assert_close(model(IDX)[0], ours(IDX)[0], rtol=0, atol=0.1)


def mapped_ranges(paths):
    """Address ranges of this process's memory mappings of the given files (from /proc/self/maps)."""
    names = {str(Path(p).resolve()) for p in paths}
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in names:
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_loaded_parameters_are_the_file_mappings(tmp_path):
    ref = hf_model("gqa")
    ref.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    save_meta(ref, "gqa", tmp_path / "meta", n_shards=1)
    model = from_pretrained(tmp_path / "hf")
    ranges = mapped_ranges((tmp_path / "hf").glob("*.safetensors"))
    for name, p in model.named_parameters():
        assert any(lo <= p.data_ptr() and p.data_ptr() + p.nbytes <= hi for lo, hi in ranges), name
    # the mapping is copy-on-write: changing a parameter (training) never writes into the checkpoint
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    on_disk = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        on_disk.update(load_file(f))
    assert torch.equal(on_disk["model.embed_tokens.weight"], ref.model.embed_tokens.weight)

    # Meta, one shard: everything but q and k (permuted, hence new tensors) stays in the mapped .pth
    model = from_pretrained(tmp_path / "meta")
    ranges = mapped_ranges([tmp_path / "meta" / "consolidated.00.pth"])
    for name, p in model.named_parameters():
        inside = any(lo <= p.data_ptr() < hi for lo, hi in ranges)
        assert inside == (".attn.q." not in name and ".attn.k." not in name), name


def rss_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc/self/status")
def test_loading_a_larger_checkpoint_adds_no_anonymous_memory(make_model, tmp_path):
    """96 MiB of weights: after loading and reading every parameter, the process's anonymous memory (what a
    copy would take) grows by far less than the file; the weights count as file-backed pages instead."""
    big = make_model(dim=256, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=45000, hidden_dim=512)
    save_hf(big, tmp_path)
    size_kib = (tmp_path / "model.safetensors").stat().st_size // 1024
    del big
    from_pretrained(tmp_path)  # torch's first use of the meta device costs ~65 MiB once: not part of loading
    anon, file = rss_kib("RssAnon"), rss_kib("RssFile")
    model = from_pretrained(tmp_path)
    with torch.no_grad():
        total = sum(float(p.float().sum()) for p in model.parameters())  # touch every page of every weight
    assert math.isfinite(total)
    grown_anon, grown_file = rss_kib("RssAnon") - anon, rss_kib("RssFile") - file
    assert size_kib > 90_000
    print(f"file {size_kib} KiB: RssAnon +{grown_anon} KiB, RssFile +{grown_file} KiB")
    assert grown_anon < 0.15 * size_kib, f"anonymous memory grew {grown_anon} KiB for a {size_kib} KiB file"
    assert grown_file > 0.8 * size_kib, f"file-backed memory grew {grown_file} KiB for a {size_kib} KiB file"


# ---------------------------------------------------------------------------------------------------------
# bad input: each error names the problem

@pytest.fixture
def hf_dir(make_model, tmp_path):
    """A valid one-file HF checkpoint of a tiny model, to break in different ways."""
    save_hf(make_model(n_layers=2, vocab_size=VOCAB), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nope'}: no such checkpoint folder")):
        from_pretrained(tmp_path / "nope")


def test_folder_in_neither_format(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: neither Meta's format")) as e:
        from_pretrained(tmp_path)
    assert "weights.npz" in str(e.value)


def write_safetensors_raw(path, header, data=b""):
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + data)


@pytest.mark.parametrize("variant, message", [
    ("shorter than 8 bytes", r"header length -1, file size 5"),
    ("header length beyond the file", r"header length 1000000, file size"),
    ("header not JSON", r"corrupt safetensors header"),
    ("header not an object", r"corrupt safetensors header"),
    ("unknown dtype", r"corrupt safetensors entry for 'lm_head.weight'"),
    ("shape not a list of sizes", r"corrupt safetensors entry for 'lm_head.weight'"),
    ("offsets beyond the data", r"tensor 'lm_head.weight' \(F32 \[2, 2\]\) has data offsets \[0, 16\]"),
    ("offsets do not fit the shape", r"tensor 'lm_head.weight' \(F32 \[2, 2\]\) has data offsets \[0, 8\]"),
    ("truncated file", r"has data offsets"),
])
def test_corrupt_safetensors(hf_dir, variant, message):
    path = hf_dir / "model.safetensors"
    good = path.read_bytes()
    entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    if variant == "shorter than 8 bytes":
        path.write_bytes(b"\x10\x00\x00\x00\x00")
    elif variant == "header length beyond the file":
        path.write_bytes((10 ** 6).to_bytes(8, "little") + b"{}")
    elif variant == "header not JSON":
        write_safetensors_raw(path, b'{"lm_head.weight": {"dtype": "F32",', bytes(16))
    elif variant == "header not an object":
        write_safetensors_raw(path, [1, 2], bytes(16))
    elif variant == "unknown dtype":
        write_safetensors_raw(path, {"lm_head.weight": {**entry, "dtype": "F33"}}, bytes(16))
    elif variant == "shape not a list of sizes":
        write_safetensors_raw(path, {"lm_head.weight": {**entry, "shape": "2x2"}}, bytes(16))
    elif variant == "offsets beyond the data":
        write_safetensors_raw(path, {"lm_head.weight": entry}, bytes(12))
    elif variant == "offsets do not fit the shape":
        write_safetensors_raw(path, {"lm_head.weight": {**entry, "data_offsets": [0, 8]}}, bytes(16))
    elif variant == "truncated file":
        path.write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match=message) as e:
        from_pretrained(hf_dir)
    assert str(path) in str(e.value)


def test_shard_named_in_the_index_is_missing(tmp_path):
    hf_model("mha").save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    missing = tmp_path / index["weight_map"]["model.norm.weight"]
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: shard named in")) as e:
        from_pretrained(tmp_path)
    assert "model.safetensors.index.json" in str(e.value)


def test_shape_mismatch_names_the_key_and_both_shapes(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 80  # the file's MLP is 112 wide
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatch for layers\.\d\.mlp\.(gate|up|down)\.weight") as e:
        from_pretrained(hf_dir)
    assert ("(112, 64)" in str(e.value) and "(80, 64)" in str(e.value)) or \
           ("(64, 112)" in str(e.value) and "(64, 80)" in str(e.value))
    assert str(hf_dir / "model.safetensors") in str(e.value)

    # Meta: multiple_of 64 instead of 32 makes the rule give 256 instead of 224
    save_meta(hf_model("gqa"), "gqa", tmp_path / "meta", params_override={"multiple_of": 64})
    with pytest.raises(ValueError, match=r"shape mismatch for layers\.0\.mlp\.gate\.weight") as e:
        from_pretrained(tmp_path / "meta")
    assert "layers.0.feed_forward.w1.weight" in str(e.value)
    assert "(224, 64)" in str(e.value) and "(256, 64)" in str(e.value)


def test_unexpected_and_missing_tensors(hf_dir):
    path = hf_dir / "model.safetensors"
    weights = load_file(path)
    save_file({**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, path)
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias in ") as e:
        from_pretrained(hf_dir)
    assert str(path) in str(e.value)
    save_file({**weights, "vision_tower.proj": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=r"unexpected tensor vision_tower\.proj"):
        from_pretrained(hf_dir)
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, path)
    with pytest.raises(ValueError, match=r"lacks 1 tensors, e\.g\. \['layers\.1\.mlp\.down\.weight'\]"):
        from_pretrained(hf_dir)


class RunsCodeWhenUnpickled:
    """What a malicious checkpoint holds: unpickling it calls open(marker, "w"), i.e. runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("layout", ["meta", "hf bin"])
def test_pickle_code_is_refused_never_run(tmp_path, layout):
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    payload = {"tok_embeddings.weight": torch.zeros(VOCAB, 64), "evil": RunsCodeWhenUnpickled(marker)}
    if layout == "meta":
        (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": -1}))
        path = folder / "consolidated.00.pth"
    else:
        hf_model("mha").config.save_pretrained(folder)
        path = folder / "pytorch_model.bin"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: refused to load")) as e:
        from_pretrained(folder)
    assert "weights_only" in str(e.value)
    assert not marker.exists()
    # the file really is malicious: full unpickling runs its code (here harmless: it creates an empty file)
    torch.load(path, weights_only=False)["evil"].close()
    assert marker.exists()


def test_unreadable_pth_and_missing_meta_shards(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    with pytest.raises(FileNotFoundError, match="params.json but no consolidated.NN.pth"):
        from_pretrained(tmp_path)
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a zip archive at all")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'consolidated.00.pth'}: not a readable PyTorch")):
        from_pretrained(tmp_path)


def test_unsupported_rope_scaling_is_refused(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope_scaling"):
        from_pretrained(hf_dir)
    del config["rope_scaling"]
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}  # transformers 5
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="llama3"):
        from_pretrained(hf_dir)


def test_meta_shards_with_different_tensors_are_named(tmp_path):
    save_meta(hf_model("gqa"), "gqa", tmp_path)
    second = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    del second["layers.1.attention.wq.weight"]
    torch.save(second, tmp_path / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth.*layers\.1\.attention\.wq\.weight"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda index: index.pop("weight_map"), r"key 'weight_map' must be a non-empty object"),
    (lambda index: index.update(weight_map=sorted(index["weight_map"])), r"key 'weight_map' must be a non-empty"),
    (lambda index: index["weight_map"].update({"model.norm.weight": 3}), r"maps 'model.norm.weight' to 3"),
    (lambda index: index["weight_map"].update({"model.norm.weight": "../x.safetensors"}), r"not a file name"),
])
def test_malformed_index_names_the_file_and_the_key(tmp_path, edit, message):
    hf_model("mha").save_pretrained(tmp_path, max_shard_size="40KB")
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message) as e:
        from_pretrained(tmp_path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("key, value", [("num_hidden_layers", "8"), ("hidden_size", 64.0), ("vocab_size", -1),
                                        ("num_attention_heads", True), ("rms_norm_eps", "1e-5"),
                                        ("rope_theta", float("nan")), ("tie_word_embeddings", "yes")])
def test_config_values_of_the_wrong_type_name_the_file_and_the_key(hf_dir, key, value):
    config = json.loads((hf_dir / "config.json").read_text())
    config[key] = value
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(f"{hf_dir / 'config.json'}: key {key!r} must be")):
        from_pretrained(hf_dir)
    (hf_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        from_pretrained(hf_dir)


def test_a_tensor_in_two_shards_is_an_error(tmp_path):
    hf_model("mha").save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    first, last = load_file(tmp_path / shards[0]), load_file(tmp_path / shards[-1])
    name = next(iter(first))
    save_file({**last, name: torch.zeros_like(first[name])}, tmp_path / shards[-1])  # a stale copy in another
    with pytest.raises(ValueError, match=re.escape(f"tensor {name!r} is in two shards, {shards[0]} and {shards[-1]}")):
        from_pretrained(tmp_path)
