"""
Checkpoint files: read Meta's, Hugging Face's and GGUF's LLaMA formats into model.Llama, and write Hugging Face's.

    model = from_pretrained("path/to/llama-2-7b")       # Meta or HF folder, or a .gguf file (or a folder with one)
    save_hf(model, "out/folder", bos_id=1, eos_id=2)   # config.json + model.safetensors, LoRA merged in

Tensors are memory-mapped and assigned (never copied) into a model built on the meta device, so loading holds
one copy of the weights; what must be transformed (Meta's shards concatenated, q/k rows permuted, GGUF blocks
dequantized) is transformed one tensor at a time (safetensors_file.py and gguf_file.py read the files). Nothing is
ever unpickled with code. The formats and the RoPE row permutations are described in
docs/design.md#checkpoint-formats.
"""
import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import NamedTuple

import torch

from gguf_file import GGUFFile, llama_config_from_gguf
from lora import LoRALinear
from model import LLAMA3_ROPE_KEYS, Llama, LlamaConfig
from quant import GGML_TYPES, QuantizedLinear, dequantize, quantize
from safetensors_file import SAFETENSORS_DTYPES, MappedTensors, read_safetensors

# One row per weight: our name, Hugging Face's, Meta's, GGUF's ({i}: the layer). Every rename is derived from it.
WEIGHT_NAMES = [
    ("embed.weight", "model.embed_tokens.weight", "tok_embeddings.weight", "token_embd.weight"),
    ("norm.weight", "model.norm.weight", "norm.weight", "output_norm.weight"),
    ("lm_head.weight", "lm_head.weight", "output.weight", "output.weight"),
    *[(f"layers.{{i}}.attn.{p}.weight", f"model.layers.{{i}}.self_attn.{p}_proj.weight",
       f"layers.{{i}}.attention.w{p}.weight", f"blk.{{i}}.attn_{g}.weight")
      for p, g in [("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")]],
    *[(f"layers.{{i}}.mlp.{p}.weight", f"model.layers.{{i}}.mlp.{p}_proj.weight",
       f"layers.{{i}}.feed_forward.w{w}.weight", f"blk.{{i}}.ffn_{p}.weight")
      for p, w in [("gate", 1), ("up", 3), ("down", 2)]],
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight",
     "blk.{i}.attn_norm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight",
     "blk.{i}.ffn_norm.weight"),
]
FORMATS = ("ours", "hf", "meta", "gguf")
META_SPLIT_DIM1 = ("embed.weight", ".attn.o.", ".mlp.down.")  # Meta shards split these along the input dim


def rename(key, src, dst):
    """`key` in format `src` as it is called in format `dst` (both from FORMATS); None if it is no LLaMA weight."""
    i, j = FORMATS.index(src), FORMATS.index(dst)
    for row in WEIGHT_NAMES:
        m = re.fullmatch(re.escape(row[i]).replace(r"\{i\}", r"(\d+)"), key)
        if m:
            return row[j].replace("{i}", m.group(1)) if m.groups() else row[j]
    return None


def interleaved_to_half_rows(w, n_heads):
    """Meta's and GGUF's q/k rows rotate adjacent pairs (x[2i], x[2i+1]); ours rotate halves: permute each head."""
    out_dim, d = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, d).transpose(1, 2).reshape(out_dim, d)


def read_json(path):
    """A JSON file's contents, or an error that names the file and where it is broken."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------------------------------------
# PyTorch's files (Meta's .pth shards, Hugging Face's .bin), read without running pickle code

def plain_error(e):
    """What went wrong, in one line without terminal colour codes (torch colours parts of its messages) and without
    torch's advice to retry with weights_only=False (the opposite of what to do with an untrusted file)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    if "WeightsUnpickler error:" in text:  # keep only the reason: which global or object was refused
        text = text.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    return text.splitlines()[0] if text else type(e).__name__


def load_pickled(path):
    """torch.load that never runs pickle code: weights_only=True, mmapped."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load: this file holds pickled code or objects that are not tensors "
                         f"({plain_error(e)}). Do not load it with weights_only=False unless you trust its source; "
                         f"convert it to safetensors instead.") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({plain_error(e)})") from None


# ----------------------------------------------------------------------------------------------------------
# The three formats: each yields its LlamaConfig, then (our name, tensor, where) for every weight

# Meta's reference code for LLaMA-3.1 hard-codes its RoPE scaling; later params.json files may state factors
META_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}


def config_from_meta(params):
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = dict(META_ROPE_SCALING)
        for key, ours in (("rope_scaling_factor", "factor"), ("rope_high_freq_factor", "high_freq_factor")):
            if params.get(key) is not None:
                scaling[ours] = float(params[key])
    # context when params.json states none: LLaMA-3.1+ (scaled RoPE) 131072, LLaMA-3 8192, LLaMA-2 4096
    context = 131072 if scaling else 8192 if params.get("vocab_size", -1) >= 128000 else 4096
    return LlamaConfig(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                       n_kv_heads=params.get("n_kv_heads"), vocab_size=params.get("vocab_size", -1),
                       multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                       norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
                       max_seq_len=params.get("max_seq_len", context), rope_scaling=scaling)


def rope_scaling_from_hf(c, path):
    """LlamaConfig.rope_scaling from config.json's rope_scaling, or transformers 5's rope_parameters (which
    also holds rope_theta). Any scaling but LLaMA-3's is refused by name."""
    key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    scaling = c.get(key) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"{path}: {key} of type {kind!r} is not supported (only 'llama3', LLaMA-3.1+'s "
                         f"scaling, or none)")
    missing = [k for k in LLAMA3_ROPE_KEYS if scaling.get(k) is None]
    if missing:
        raise ValueError(f"{path}: {key} of type 'llama3' lacks {', '.join(missing)}")
    return {"rope_type": "llama3", **{k: float(scaling[k]) for k in LLAMA3_ROPE_KEYS[:3]},
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"])}


HF_INT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
               "intermediate_size", "max_position_embeddings")
HF_FLOAT_KEYS = ("rms_norm_eps", "rope_theta")


def check_hf_config(c, path):
    """Refuse a config.json whose values are not what LLaMA's keys hold ("num_hidden_layers": "8" and the like),
    naming the file and the key, before anything is built from them."""
    if not isinstance(c, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(c).__name__}")
    rope = c.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        raise ValueError(f"{path}: key 'rope_parameters' must be an object, got {rope!r}")
    for where, d, keys in [("", c, HF_INT_KEYS + HF_FLOAT_KEYS), ("rope_parameters.", rope or {}, ("rope_theta",))]:
        for k in keys:
            v = d.get(k)
            if v is None:
                continue
            ok = (type(v) is int if k in HF_INT_KEYS else type(v) in (int, float) and math.isfinite(v)) and v > 0
            if not ok:
                kind = "a positive integer" if k in HF_INT_KEYS else "a positive finite number"
                raise ValueError(f"{path}: key {where + k!r} must be {kind}, got {v!r}")
    if not isinstance(c.get("tie_word_embeddings", False), bool):
        raise ValueError(f"{path}: key 'tie_word_embeddings' must be true or false, got {c['tie_word_embeddings']!r}")


def config_from_hf(c, path):
    check_hf_config(c, path)
    rope = c.get("rope_parameters") or {}  # transformers >= 5 writes rope_theta (and any scaling) here
    try:
        return LlamaConfig(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                           n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"],
                           hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
                           rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
                           max_seq_len=c.get("max_position_embeddings", 4096),
                           tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                           rope_scaling=rope_scaling_from_hf(c, path))
    except KeyError as e:
        raise ValueError(f"{path}: lacks the key {e.args[0]!r}") from None


def index_files(path):
    """The shard files a model.safetensors.index.json (or pytorch_model.bin.index.json) names in its weight_map."""
    index = read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{path}: key 'weight_map' must be a non-empty object {{tensor name: shard file}}, got "
                         f"{'nothing' if weight_map is None else repr(weight_map)[:80]}")
    bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v or Path(v).name != v]
    if bad:
        raise ValueError(f"{path}: key 'weight_map' maps {bad[0][0]!r} to {bad[0][1]!r}, not a file name")
    return sorted(set(weight_map.values()))


def iter_meta(folder):
    """params.json + consolidated.NN.pth, merging shards."""
    params = read_json(folder / "params.json")
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{folder}: params.json but no consolidated.NN.pth shard")
    states = [load_pickled(p) for p in shards]
    if params.get("vocab_size", -1) <= 0:  # -1 in Meta's release: the tokenizer's size, i.e. the embedding's
        params["vocab_size"] = states[0]["tok_embeddings.weight"].shape[0]
    cfg = config_from_meta(params)
    for p, state in zip(shards[1:], states[1:]):  # every shard holds a slice of every tensor
        if state.keys() != states[0].keys():
            diff = sorted(state.keys() ^ states[0].keys())
            raise ValueError(f"{p}: its tensors differ from {shards[0].name}'s (e.g. {diff[:3]}): shards of "
                             f"different checkpoints?")
    yield cfg
    for key in states[0]:
        if key == "rope.freqs":
            continue
        name = rename(key, "meta", "ours")
        parts = [s[key] for s in states]
        if len(parts) == 1 or parts[0].dim() == 1:  # 1-D tensors are replicated in every shard
            w = parts[0]
        else:
            w = torch.cat(parts, dim=1 if name and any(s in name for s in META_SPLIT_DIM1) else 0)
        yield name, permute_qk(name, w, cfg), f"{key} in {shards[0].parent}/consolidated.*.pth ({len(shards)} shards)"


def permute_qk(name, w, cfg):
    """q/k weights from interleaved RoPE rows to ours; anything else as it is."""
    if name and name.endswith(("attn.q.weight", "attn.k.weight")):
        heads = cfg.n_heads if ".q." in name else cfg.n_kv_heads
        if w.dim() == 2 and w.shape[0] % (2 * heads) == 0:  # else the shape check names the problem
            return interleaved_to_half_rows(w, heads)
    return w


def iter_hf(folder, release=False):
    """config.json + safetensors or pytorch_model*.bin (through the index when there is one). release: each
    safetensors tensor's pages are handed back once the loader has taken what it needs (a quantized copy)."""
    yield config_from_hf(read_json(folder / "config.json"), folder / "config.json")
    for index_name, single, reader in [("model.safetensors.index.json", "model.safetensors", read_safetensors),
                                       ("pytorch_model.bin.index.json", "pytorch_model.bin", load_pickled)]:
        if (folder / index_name).exists():
            files = index_files(folder / index_name)
            break
        if (folder / single).exists():
            files = [single]
            break
    else:
        raise FileNotFoundError(f"{folder}: config.json but no model.safetensors, model.safetensors.index.json, "
                                f"pytorch_model.bin or pytorch_model.bin.index.json")
    for file in files:
        if not (folder / file).exists():
            raise FileNotFoundError(f"{folder / file}: shard named in {folder / index_name} is missing")
    seen = {}  # tensor name -> the shard that held it: a tensor in two shards is an error, not "the last one wins"
    for file in files:
        tensors = reader(folder / file)
        for key, w in tensors.items():
            if key in seen:
                raise ValueError(f"{folder}: tensor {key!r} is in two shards, {seen[key]} and {file}: which one is "
                                 f"meant is unknown")
            seen[key] = file
            if "rotary_emb.inv_freq" not in key:
                yield rename(key, "hf", "ours"), w, f"{key} in {folder / file}"
                if release and isinstance(tensors, MappedTensors):
                    tensors.release(key)


def iter_gguf(path, dtype, keep_blocks=False):
    """A llama.cpp GGUF file: the config from its llama.* metadata, each tensor dequantized when it is used
    (keep_blocks: the block matrices in q4_0 / q4_1 / q8_0 come as their bytes, a Blocks)."""
    f = GGUFFile(path)
    cfg = LlamaConfig(**llama_config_from_gguf(f.metadata, path), tie_embeddings="output.weight" not in f.tensors)
    yield cfg
    formats = {t: fmt for fmt, t in GGML_TYPES.items()}
    for key, info in f.tensors.items():
        name = rename(key, "gguf", "ours")
        if keep_blocks and info.type in formats and name and QUANTIZABLE.fullmatch(name):
            w = Blocks(permute_qk(name, f.raw(key), cfg), formats[info.type], info.shape)
        else:
            w = permute_qk(name, f.tensor(key, dtype or torch.float32), cfg)
        yield name, w, f"{key} in {path}"


# The weights --base-bits holds quantized: the 7 projections of every block (not the embedding, norms or head)
QUANTIZABLE = re.compile(r"layers\.\d+\.(attn\.[qkvo]|mlp\.(gate|up|down))\.weight")


class Blocks(NamedTuple):
    """A GGUF tensor's quantized blocks as loaded: uint8 (rows, bytes per row), its quant.py format, its shape."""
    data: torch.Tensor
    fmt: str
    shape: tuple


def quantized_linear(w, base, dtype, device):
    """The QuantizedLinear holding weight w (a float tensor, or a GGUF file's Blocks) as `base` (a QuantConfig)
    says: GGUF blocks kept as loaded unless --base-format names another format; float weights quantized."""
    if isinstance(w, Blocks):
        dtype = dtype or torch.float32
        if base.format in (None, w.fmt):
            blocks, fmt = w.data.to(device), w.fmt
        else:
            blocks, fmt = quantize(dequantize(w.data.to(device), w.fmt, w.shape), base.format), base.format
    else:
        dtype = dtype or w.dtype
        blocks, fmt = quantize(w.to(device), base.float_format), base.float_format
    return QuantizedLinear(blocks, fmt, w.shape[1], w.shape[0], dtype)


def dequantize_model(model):
    """Replace every quantized layer with the float one of the same dequantized weight (in place; returns the
    model): what export.py writes, and the float model a quantized one is compared with."""
    for module in list(model.modules()):
        if isinstance(module, LoRALinear) and module.quantized is not None:  # LoRA holds the float weight itself
            module.weight = torch.nn.Parameter(module.quantized.dequantized(), requires_grad=False)
            module.quantized = None
        for attr, child in list(module.named_children()):
            if isinstance(child, QuantizedLinear):
                float_layer = torch.nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                float_layer.weight = torch.nn.Parameter(child.dequantized(), requires_grad=False)
                setattr(module, attr, float_layer)
    return model


def end_token_ids(path, tokenizer):
    """The ids that end a generation of the checkpoint at `path`: the tokenizer's (ByteLevelBPE.end_ids) and
    the eos_token_id of a Hugging Face folder's generation_config.json, else of its config.json (one id, or a
    list: LLaMA-3.x instruct models end a turn with <|end_of_text|>, <|eom_id|> or <|eot_id|>)."""
    ids = list(tokenizer.end_ids)
    try:
        kind, folder = find_format(path)
    except (FileNotFoundError, ValueError):
        return ids
    for name in ("generation_config.json", "config.json") if kind == "hf" else ():
        eos = read_json(folder / name).get("eos_token_id") if (folder / name).is_file() else None
        if eos is not None:
            listed = [eos] if isinstance(eos, int) else eos
            if not isinstance(listed, list) or not all(isinstance(i, int) for i in listed):
                raise ValueError(f"{folder / name}: eos_token_id {eos!r} is not an id or a list of ids")
            return list(dict.fromkeys(ids + listed))
    return ids


def find_format(path):
    """(kind, path) of a checkpoint: 'meta' or 'hf' for folders, 'gguf' for a .gguf file or a folder holding one."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder or .gguf file")
    if (path / "params.json").exists():
        return "meta", path
    if (path / "config.json").exists():
        return "hf", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    found = sorted(p.name for p in path.iterdir())[:10]
    raise ValueError(f"{path}: neither Meta's format (params.json + consolidated.NN.pth), Hugging Face's "
                     f"(config.json + *.safetensors or pytorch_model*.bin) nor one .gguf file; it holds {found}")


def from_pretrained(path, dtype=None, device="cpu", base=None):
    """Load a LLaMA checkpoint: Meta's or Hugging Face's folder, or a GGUF file. dtype None keeps the file's
    (float32 for quantized GGUF tensors). base (a quant.QuantConfig) with bits set: the block matrices are held
    quantized (QuantizedLinear), each one quantized as it is read, or kept as a GGUF file's blocks."""
    kind, path = find_format(path)
    quantized = base is not None and base.bits is not None
    stream = {"meta": iter_meta, "hf": lambda p: iter_hf(p, release=quantized),
              "gguf": lambda p: iter_gguf(p, dtype, keep_blocks=quantized)}[kind](path)
    cfg = next(stream)
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state, layers = {}, {}
    for name, w, where in stream:
        if name is None or name not in expected:
            raise ValueError(f"unexpected tensor {where}: not a LLaMA weight")
        if tuple(w.shape) != tuple(expected[name]):
            raise ValueError(f"shape mismatch for {name} ({where}): checkpoint has {tuple(w.shape)}, the config "
                             f"implies {tuple(expected[name])}")
        if quantized and QUANTIZABLE.fullmatch(name):
            try:
                layers[name.removesuffix(".weight")] = quantized_linear(w, base, dtype, device)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        else:
            state[name] = w.to(device=device, dtype=dtype or w.dtype)
    if "lm_head.weight" not in state and "embed.weight" in state:  # tied: the head is the embedding
        if not cfg.tie_embeddings:
            cfg.tie_embeddings = True
            with torch.device("meta"):
                model = Llama(cfg)
        state["lm_head.weight"] = state["embed.weight"]
    missing = sorted(set(expected) - set(state) - {k + ".weight" for k in layers})
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, layer in layers.items():
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, layer)
    model.load_state_dict(state, assign=True, strict=not layers)
    if cfg.tie_embeddings:  # assign=True set both names: make them one Parameter again
        model.lm_head.weight = model.embed.weight
    model.build_rope(device)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Writing

def atomic_write(path, write):
    """write(f) into a temporary file in the same folder, fsync, then rename over `path`: a crash at any moment
    leaves the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: two writers never share it
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: no half-written temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not every platform can fsync a directory
        pass


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as safetensors, atomically."""
    inv_dtypes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": inv_dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned

    def write(f):
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    atomic_write(path, write)


def save_hf(model, folder, dtype=None, extra_config=None, bos_id=1, eos_id=2):
    """Export in Hugging Face's format (config.json + model.safetensors), LoRA merged into the weights.
    Only the LLaMA weights are written: MoD / MoLEx add-ons have no place in LlamaForCausalLM."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    tensors = {}
    for name, w in model.state_dict().items():
        hf = rename(name, "ours", "hf")
        if hf is None or (cfg.tie_embeddings and name == "lm_head.weight"):  # LoRA factors, add-ons; tied head
            continue
        module = name.rsplit(".", 1)[0]
        if module in lora and not lora[module].merged:
            w = w + lora[module].delta_weight().to(w.dtype)
        tensors[hf] = w.to(dtype or w.dtype)
    save_safetensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
              "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
              "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
              "rope_scaling": cfg.rope_scaling,
              "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu",
              "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
              "bos_token_id": bos_id, "eos_token_id": eos_id,
              "torch_dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."), **(extra_config or {})}
    atomic_write(folder / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
