"""The model itself: KV-cache generation against full forward passes and a naive greedy loop, sampling, LoRA,
gradient checkpointing, the masked loss, the FFN width rule and errors. Parity with transformers is in
test_loading.py."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import head_loss as head_loss_module
from head_loss import head_loss, target_rows
from lora import LoRALinear, apply_lora, lora_layers, merge_lora, unmerge_lora
from model import KVCache, LlamaConfig

PROMPTS = [[1, 5, 9, 33, 2, 70, 11], [1, 40], [1, 7, 7, 50, 3]]  # different lengths: rows get left padding
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def greedy_by_hand(model, prompt, n):
    """The reference: the whole unpadded sequence through the model at every step, argmax of the last logits."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    return seq[len(prompt):]


# ---------------------------------------------------------------------------------------------------------
# generation

@pytest.mark.parametrize("n_kv_heads", [2, 4])  # grouped-query attention and plain multi-head attention
def test_greedy_cache_equals_full_forward_single_prompts_and_hand_loop(make_model, n_kv_heads):
    model = make_model(std=0.2, n_kv_heads=n_kv_heads)  # std 0.2: varied tokens, not one repeated
    n = 12
    reference = [greedy_by_hand(model, p, n) for p in PROMPTS]
    assert len({t for row in reference for t in row}) > 10, "degenerate reference: the test would prove little"
    assert model.generate(PROMPTS, n) == reference  # KV cache, left-padded batch
    assert model.generate(PROMPTS, n, use_cache=False) == reference  # full forward at every step
    assert [model.generate([p], n)[0] for p in PROMPTS] == reference  # each prompt alone
    assert model.generate(PROMPTS[::-1], n) == reference[::-1]  # batch order does not matter
    same_length = [[1, 5, 9], [1, 40, 2]]  # no padding at all: the cache path without a mask
    assert model.generate(same_length, n) == [greedy_by_hand(model, p, n) for p in same_length]


def test_cached_logits_equal_full_forward_logits(make_model):
    """Finer than comparing argmaxes: every step's logits from the cache equal the unpadded full forward's."""
    model = make_model(std=0.2)
    longest = max(map(len, PROMPTS))
    extra = torch.randint(0, 96, (len(PROMPTS), 6), generator=torch.Generator().manual_seed(0))
    padded = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS])
    cache = KVCache(model.config, model.config.n_layers, len(PROMPTS), longest + 6, "cpu", torch.float32)
    cache.n_pad = torch.tensor([longest - len(p) for p in PROMPTS])
    with torch.no_grad():
        steps = [model(padded, cache=cache)[0][:, -1]]
        steps += [model(extra[:, i:i + 1], cache=cache)[0][:, -1] for i in range(5)]
        for row, prompt in enumerate(PROMPTS):
            full = model(torch.cat([torch.tensor(prompt), extra[row, :5]])[None])[0][0]
            for i, logits in enumerate(steps):
                torch.testing.assert_close(logits[row], full[len(prompt) - 1 + i], rtol=0, atol=1e-5)
    assert cache.pos == longest + 5


def test_eos_stops_generation_and_is_left_out(make_model):
    model = make_model(std=0.2)
    free = model.generate(PROMPTS, 10)
    eos = free[0][3]
    out = model.generate(PROMPTS, 10, eos_id=eos)
    assert out == [row[:row.index(eos)] if eos in row else row for row in free]
    assert len(out[0]) == free[0].index(eos) <= 3

    # generation stops as soon as every row has produced EOS: count the forward passes
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert model.generate([PROMPTS[0]], 10, eos_id=eos) == [out[0]]
    finally:
        handle.remove()
    assert len(calls) == free[0].index(eos) + 1


def test_top_k_draws_only_from_the_k_most_likely(make_model):
    model = make_model()  # std 0.1: flat logits, so a hot sampler would often leave the top k
    prompt = PROMPTS[0]
    with torch.no_grad():
        top3 = set(model(torch.tensor([prompt]))[0][0, -1].topk(3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    drawn = {row[0] for row in model.generate([prompt] * 300, 1, temperature=3.0, top_k=3, generator=g)}
    assert drawn == top3
    # the same sampler without top_k leaves the top 3, so the assertion above can fail
    drawn = {row[0] for row in model.generate([prompt] * 300, 1, temperature=3.0, generator=g)}
    assert not drawn <= top3


def test_temperature_sampling_follows_the_softmax_and_is_reproducible(make_model):
    model = make_model()
    prompt, T, n = PROMPTS[0], 0.3, 4000
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0][0, -1].double()
    p = F.softmax(logits / T, -1)
    rows = model.generate([prompt] * n, 1, temperature=T, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(torch.tensor([r[0] for r in rows]), minlength=p.numel()).double() / n
    # 0.03 is about 4 standard deviations of a frequency; multiplying by T instead of dividing would be caught
    assert (freq - p).abs().max() < 0.03
    assert (F.softmax(logits * T, -1) - p).abs().max() > 0.1

    def sample(seed):
        return model.generate(PROMPTS, 8, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(seed))

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_generate_rejects_bad_requests(tiny_model):
    with pytest.raises(ValueError, match="empty prompt"):
        tiny_model.generate([[1, 2], []], 3)
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model.generate([[1] * 60], 5)  # 60 + 5 > 64
    with pytest.raises(ValueError, match="65 tokens exceeds max_seq_len=64"):
        tiny_model(torch.zeros(1, 65, dtype=torch.long))[0]


# ---------------------------------------------------------------------------------------------------------
# LoRA

def randomize_lora_b(model, seed=0):
    """B starts at zero (LoRA is then a no-op); give it values so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_lora_linear_matches_hand_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10, bias=False)
    W = base.weight.detach().clone()
    m = LoRALinear(base, rank=3, alpha=6)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(4, 12)
    expected = x @ W.T + (6 / 3) * (x @ m.lora_A.detach().T) @ m.lora_B.detach().T
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_initial_lora_leaves_logits_unchanged(tiny_model):
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    before = tiny_model(idx)[0]
    apply_lora(tiny_model, rank=4, alpha=8, targets=ALL_TARGETS, verbose=False)
    assert torch.equal(tiny_model(idx)[0], before)
    assert "layers.0.attn.q.weight" in tiny_model.state_dict()  # base keys keep their names


def test_merge_equals_unmerged_and_unmerge_restores(tiny_model):
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    base_logits = tiny_model(idx)[0].detach()
    base_weights = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    apply_lora(tiny_model, rank=4, alpha=8, targets=ALL_TARGETS, verbose=False)
    randomize_lora_b(tiny_model)
    with torch.no_grad():
        unmerged = tiny_model(idx)[0]
        assert (unmerged - base_logits).abs().max() > 0.05  # the adapters do change the output
        merge_lora(tiny_model)
        merge_lora(tiny_model)  # a second merge is a no-op
        merged = tiny_model(idx)[0]
        assert (merged - unmerged).abs().max() / unmerged.abs().max() <= 1e-5
        q = tiny_model.layers[0].attn.q
        torch.testing.assert_close(q.weight, base_weights["layers.0.attn.q.weight"] + q.lora_B @ q.lora_A * 2.0)
        unmerge_lora(tiny_model)
        torch.testing.assert_close(tiny_model(idx)[0], unmerged, rtol=0, atol=1e-5)
    for k, v in tiny_model.state_dict().items():
        if k in base_weights:
            torch.testing.assert_close(v, base_weights[k], rtol=0, atol=1e-6)


def test_apply_lora_targets_last_layers_and_freezes_the_rest(tiny_model):
    cfg = tiny_model.config
    n = apply_lora(tiny_model, rank=4, alpha=8, targets=("q", "down"), last_layers=1, verbose=False)
    wrapped = {name for name, m in tiny_model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"layers.2.attn.q", "layers.2.mlp.down"}
    trainable = {name for name, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.2.{m}.lora_{ab}" for m in ("attn.q", "mlp.down") for ab in "AB"}
    # q: (dim -> n_heads * head_dim), down: (hidden_dim -> dim); each adapter has rank * (in + out) values
    assert n == 4 * (cfg.dim + cfg.dim) + 4 * (cfg.hidden_dim + cfg.dim)


def test_lora_gradients_reach_only_the_adapters(tiny_model):
    apply_lora(tiny_model, rank=4, alpha=8, targets=ALL_TARGETS, last_layers=2, verbose=False)
    randomize_lora_b(tiny_model)  # with B = 0 the gradient of A would be zero
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    _, loss = tiny_model(idx, idx)
    loss.backward()
    for name, p in tiny_model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be >= 1, got 0"),
    (dict(targets=("q", "wq")), r"unknown LoRA targets \['wq'\]"),
    (dict(last_layers=4), "last 4 layers: the model has 3"),
    (dict(last_layers=0), "last 0 layers"),
])
def test_apply_lora_rejects_bad_arguments(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_lora(tiny_model, verbose=False, **kwargs)


def test_apply_lora_twice_is_refused(tiny_model):
    apply_lora(tiny_model, verbose=False)
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(tiny_model, verbose=False)


# ---------------------------------------------------------------------------------------------------------
# training: gradient checkpointing and the masked loss

@pytest.mark.parametrize("lora", [False, True])
def test_grad_checkpointing_gives_same_loss_and_gradients(make_model, lora):
    model = make_model()
    if lora:  # dropout on: the recomputation must replay the same random masks
        apply_lora(model, rank=4, alpha=8, dropout=0.2, targets=ALL_TARGETS, verbose=False)
        randomize_lora_b(model)
    model.train()
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    block_calls = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda *_: block_calls.append(1))  # a recomputation may stop early

    def run(checkpointing):
        model.grad_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        block_calls.clear()
        torch.manual_seed(123)
        _, loss = model(idx, idx)
        loss.backward()
        return loss.item(), len(block_calls), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, calls, grads = run(False)
    loss_ckpt, calls_ckpt, grads_ckpt = run(True)
    assert calls_ckpt == 2 * calls == 6  # each block ran again in the backward pass: checkpointing is on
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_loss_ignores_minus_100_targets(tiny_model):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 96, (2, 16), generator=g)
    targets = torch.randint(0, 96, (2, 16), generator=g)
    targets[0, :5] = -100
    targets[1, 9] = -100
    no_logits, loss = tiny_model(idx, targets)
    assert no_logits is None  # with targets the logits are made at the target positions only: none returned
    logits = tiny_model(idx)[0]
    total, count = 0.0, 0
    for b in range(2):
        for t in range(16):
            if targets[b, t] != -100:
                row = logits[b, t].double()
                total += (torch.logsumexp(row, 0) - row[targets[b, t]]).item()
                count += 1
    assert count == 26
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_return_hidden_gives_every_layer_and_the_last_makes_the_logits(tiny_model):
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, hidden = tiny_model.forward_hidden(idx)
    assert len(hidden) == 3 and all(h.shape == (2, 16, 64) for h in hidden)
    torch.testing.assert_close(logits, tiny_model.lm_head(tiny_model.norm(hidden[-1])))
    x, rope = tiny_model.embed(idx), (tiny_model.rope_cos[:16], tiny_model.rope_sin[:16])
    for block, h in zip(tiny_model.layers, hidden):
        x = block(x, rope)
        torch.testing.assert_close(h, x)


# ---------------------------------------------------------------------------------------------------------
# configuration

@pytest.mark.parametrize("dim, multiplier, multiple_of, expected", [
    (4096, None, 256, 11008),  # LLaMA-2 7B
    (5120, None, 256, 13824),  # 13B
    (8192, 1.3, 4096, 28672),  # 70B
    (64, 1.3, 32, 224),  # int(2*4*64/3) = 170, int(1.3 * 170) = 221, rounded up to 224
])
def test_ffn_width_rule(dim, multiplier, multiple_of, expected):
    cfg = LlamaConfig(dim=dim, n_heads=dim // 128 if dim >= 128 else 4, ffn_dim_multiplier=multiplier,
                      multiple_of=multiple_of)
    assert cfg.hidden_dim == expected
    assert LlamaConfig(dim=dim, n_heads=cfg.n_heads, hidden_dim=100).hidden_dim == 100  # given width wins


@pytest.mark.parametrize("kwargs", [dict(dim=64, n_heads=5), dict(dim=64, n_heads=4, n_kv_heads=3),
                                    dict(dim=60, n_heads=4)])  # 60/4 = 15: an odd head size has no RoPE pairs
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError, match=f"dim={kwargs['dim']}.*n_heads={kwargs['n_heads']}"):
        LlamaConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# The loss at the target positions, chunked (head_loss.head_loss) against the naive computation

def naive_loss(model, idx, targets):
    """The LM head at every position, float32 logits, F.cross_entropy: what model(idx, targets) replaces."""
    logits = model.lm_head(model.norm(model.trunk(idx, None, None, None, keep_all=False)[-1]))
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def loss_batch(vocab, B=3, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    targets[0, :7] = -100  # a prompt
    targets[1, 3] = -100
    targets[2, 15:] = -100  # padding
    return idx, targets


def loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 45])  # 45 targets: one chunk; 7: 6 full chunks and 3 rows
@pytest.mark.parametrize("what", ["lora", "all", "tied"])  # all: the head trains too; tied: it is the embedding
def test_head_loss_equals_the_naive_loss_and_gradients_fp32(make_model, monkeypatch, chunk_rows, what):
    model = make_model(seed=1, tie_embeddings=what == "tied").train()
    if what == "lora":
        apply_lora(model, rank=4, alpha=8, verbose=False)
        with torch.no_grad():
            for m in lora_layers(model):
                m.lora_B.normal_(0, 0.1)  # B = 0 would make the LoRA gradients trivial
    idx, targets = loss_batch(model.config.vocab_size)
    if chunk_rows is not None:
        monkeypatch.setattr(head_loss_module, "HEAD_CHUNK_ELEMENTS", chunk_rows * model.config.vocab_size)
    ref_loss, ref_grads = loss_and_grads(model, lambda: naive_loss(model, idx, targets))
    loss, grads = loss_and_grads(model, lambda: model(idx, targets)[1])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert ref_grads.keys() == grads.keys() and len(grads) > 0
    if what == "all":
        assert "lm_head.weight" in grads
    for n, g in grads.items():  # float32 rounding of another summation order, carried back through the layers
        err, scale = (g - ref_grads[n]).abs().max(), ref_grads[n].abs().max()
        assert scale > 0 and err <= 2e-6 * scale, f"gradient of {n}: max error {err} at scale {scale}"


def test_head_loss_bf16_matches_the_naive_loss(make_model):
    """A bf16 frozen base with fp32 LoRA (as on a GPU): the chunked loss rounds as the naive one does (bf16
    logits, fp32 softmax); the gradients agree within bf16's precision (chunks add up in another order)."""
    model = make_model(seed=2).train()
    apply_lora(model, rank=4, alpha=8, verbose=False)
    with torch.no_grad():
        for m in lora_layers(model):
            m.lora_B.normal_(0, 0.1)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    model.build_rope()
    idx, targets = loss_batch(model.config.vocab_size)
    ref_loss, ref_grads = loss_and_grads(model, lambda: naive_loss(model, idx, targets))
    loss, grads = loss_and_grads(model, lambda: head_loss_chunked(model, idx, targets, 7))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=2e-2, atol=2e-3, msg=f"gradient of {n}")


def head_loss_chunked(model, idx, targets, chunk_rows):
    (h,), y, real = target_rows(targets, model.trunk(idx, None, None, None, keep_all=False)[-1])
    return head_loss(model.norm(h), model.lm_head.weight, y, real, chunk_rows=chunk_rows)


def test_head_loss_without_targets_is_zero_and_under_no_grad_makes_no_gradient(make_model):
    model = make_model()
    idx, targets = loss_batch(model.config.vocab_size)
    _, loss = model(idx, torch.full_like(targets, -100))
    assert loss.item() == 0.0  # not NaN: a batch without targets adds nothing
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets)[1], naive_loss(model, idx, targets), rtol=1e-6, atol=0)


class VocabTensors(TorchDispatchMode):
    """Records the shape of every tensor an op makes that has a vocab-size last dimension (logits and their
    gradients), forward and backward."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.shapes = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.size(-1) == self.vocab and t.numel() > 0:
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("what", ["lora", "all"])
def test_no_logits_beyond_one_chunk_forward_or_backward(make_model, monkeypatch, what):
    """No (tokens x vocab) tensor with more than one chunk's rows is ever made, forward or backward, and none
    is kept for backward; the naive loss, measured the same way, makes and keeps the whole batch's."""
    model = make_model(seed=1, vocab_size=200).train()
    if what == "lora":
        apply_lora(model, rank=4, alpha=8, verbose=False)
    V, chunk = model.config.vocab_size, 8
    monkeypatch.setattr(head_loss_module, "HEAD_CHUNK_ELEMENTS", chunk * V)
    idx, targets = loss_batch(V, B=4, T=24)
    n_targets = int((targets != -100).sum())
    naive, chunked = (lambda: naive_loss(model, idx, targets)), (lambda: model(idx, targets)[1])
    for fn, most in [(naive, 4 * 24), (chunked, chunk)]:
        saved = []
        keep = lambda t: saved.append(tuple(t.shape)) or t  # noqa: E731
        with VocabTensors(V) as made:
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                loss = fn()
            loss.backward()
        rows = [s[0] for s in made.shapes if s[0] != model.config.dim]  # not the head's weight, transposed
        assert max(rows) == most, made.shapes
        kept = [s for s in saved if V in s and s != (V, model.config.dim)]  # (the head's weight may be kept)
        assert (len(kept) > 0) == (most > chunk), kept
    assert n_targets > 3 * chunk  # the batch needs several chunks
