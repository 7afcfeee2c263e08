"""Measurement helpers for bench.py: generated text, memory readers, step timing, the matmul rate, FLOP counts and
random models. Nothing here knows a benchmark; bench.py puts them together.

    docs = varied_documents(4)                      # about 4 MB of mixed deterministic text
    wall_s, cpu_s, result = timed(fn, repeat=5)    # medians after one warm-up call
    rss_mib(), rss_mib("VmHWM:"), reset_peak_rss()  # this process's memory (Linux /proc)
    timer = StepTimer(device); timer(step); wall, cpu = timer.times()
    model = random_model(cfg, "cuda", torch.bfloat16)  # built on the meta device, drawn in place
"""
import json
import random
import statistics
import time

import torch

# ---- text ---------------------------------------------------------------------------------------------------

WORDS = ("the of and to a in is was for that with as on by he she it at from his her they we you this be or an "
         "are were which have has had not but all one two three can will would there their what so if about when "
         "time people year way day man woman child world life hand part place case week company system program "
         "question work government number night point home water room mother area money story fact month lot "
         "right study book eye job word business issue side kind head house service friend father power hour game "
         "line end member law car city community name president team minute idea kid body information back "
         "parent face others level office door health person art war history party result change morning reason "
         "research girl guy moment air teacher force education model layer training tokenizer gradient").split()
SCRIPTS = ["中文文本的一个例子，我们在这里测试分词器的速度。", "日本語の文章です。これはテストです。", "한국어 문장입니다. 테스트입니다.",
           "Это пример текста на русском языке.", "هذا مثال على نص باللغة العربية.", "Ένα παράδειγμα κειμένου.",
           "यह हिंदी में एक उदाहरण है।", "Ça coûte 12,50 € à São Paulo, naïve façade."]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🚀", "✅", "…", "—", "“quoted”"]


def varied_documents(megabytes, seed=0):
    """Deterministic mixed documents, about `megabytes` MB of UTF-8 in all: mostly English-like prose, then code,
    numbers, other scripts, emoji and whitespace runs."""
    r, docs, size = random.Random(seed), [], 0

    def prose():
        words = [r.choice(WORDS) if r.random() < 0.9 else str(r.randrange(10 ** r.randrange(1, 6)))
                 for _ in range(r.randrange(5, 25))]
        return " ".join(words).capitalize() + r.choice([".", ".", ",", "?", "!", ":"])

    def code():
        indent = " " * r.choice([0, 4, 8, 12]) + "\t" * (r.random() < 0.1)
        return indent + r.choice(["def forward(self, x):", "return torch.cat([a, b], dim=-1)", "if x is None:",
                                  "for i, batch in enumerate(loader):", "loss = F.cross_entropy(logits, y)",
                                  "# TODO: handle the  edge case", "}", "print(f\"{step:>6d} {loss:.4f}\")"])

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


def gsm8k_documents(path):
    """Each GSM8K problem of a JSONL file as question + "\\n" + answer."""
    with open(path, encoding="utf-8") as f:
        return [(row["question"] + "\n" + row["answer"]) for row in map(json.loads, f)]


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
