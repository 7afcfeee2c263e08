"""MoD (mod.py) against references written out by hand here: the logit-lens average, the plain model, the
loss and its gradients, uncached generation, and the memory saved for backward. CPU, fp32, tiny models."""
import pytest
import torch
import torch.nn.functional as F

from lora import apply_lora, freeze_base
from mod import MoDConfig, attach_mod, layer_logits, routing_stats
from model import KVCache, LlamaConfig

CFG = LlamaConfig(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=64, max_seq_len=64)
V = CFG.vocab_size


@pytest.fixture
def tiny(make_model):
    """Factory: tiny(seed=0), a random model of shape CFG (conftest's make_model: norms that are not all ones, so
    copying the final norm is visible)."""
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len")
    return lambda seed=0: make_model(seed, std=0.15, **{k: getattr(CFG, k) for k in fields})


def randomize_mod(model, seed=0, scale=1.0):
    """Move the ensemble away from its step-0 state: random router and norm weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.mod.parameters():
            p.copy_((1 if p.dim() == 1 and p.numel() == CFG.dim else 0) + scale * torch.randn(p.shape, generator=g))


def batch(B=2, T=13, seed=0, n_masked=5):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y.view(-1)[torch.randperm(B * T, generator=g)[:n_masked]] = -100
    y[0, :4] = -100  # a masked prompt (with chunks of 4: a chunk with no target at all)
    return idx, y


def hand_weights(model, hidden, cfg):
    """Routing weights computed plainly: scores, optional running mean (a loop), top-k by torch.topk."""
    h = hidden[-1].float()
    x = h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() / h.size(-1) if cfg.router_input == "scaled" \
        else model.norm(hidden[-1]).float()
    if cfg.router == "vector":
        scores = model.mod.scores.expand(*x.shape[:2], -1)
    else:
        if cfg.router == "sequence":
            x = torch.stack([x[:, :t + 1].mean(1) for t in range(x.size(1))], 1)
        scores = x @ model.mod.router.weight.T + model.mod.router.bias
    w = scores.softmax(-1)
    if cfg.top_k is not None and cfg.top_k < cfg.k:
        idx = scores.topk(cfg.top_k, -1).indices
        w = torch.zeros_like(w).scatter(-1, idx, w.gather(-1, idx))
        if cfg.top_k_weights == "renormalized":
            w = w / w.sum(-1, keepdim=True)
    return w


def hand_coefficients(model, hidden, cfg):
    """z = sum_i c_i l_i: c = w (start uniform), or g * w + (1 - g) on the final layer (start final)."""
    w = hand_weights(model, hidden, cfg)
    if cfg.start == "uniform":
        return w
    g = model.mod.ensemble_weight
    return torch.cat([g * w[..., :-1], g * w[..., -1:] + 1 - g], -1)


def reference_loss(model, hidden, y, cfg):
    """The MoD loss written plainly (whole batch, every position, F.kl_div): returns (total, ce, distill,
    layer_ce)."""
    k, T = cfg.k, cfg.distill_temp
    norms = list(model.mod.norms) + [model.norm]
    logits = [model.lm_head(n(h)).float() for n, h in zip(norms, hidden[-k:])]
    c = hand_coefficients(model, hidden, cfg)
    z = sum(c[..., i, None] * logits[i] for i in range(k))
    real = y != -100
    ce = F.cross_entropy(z.view(-1, V), y.view(-1), ignore_index=-100)
    teacher = F.log_softmax(logits[-1] / T, -1).detach()
    kls = []
    for l in logits[:-1]:
        student = F.log_softmax(l / T, -1)
        if cfg.distill_direction == "forward":  # kl_div(input, target) = KL(target || input)
            kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
        else:
            kl = F.kl_div(teacher, student, log_target=True, reduction="none").sum(-1)
        kls.append(kl[real].mean() * T * T)
    distill = torch.stack(kls).mean()
    layer_ce = torch.zeros(())
    if cfg.layer_ce:
        layer_ce = torch.stack([F.cross_entropy(l.view(-1, V), y.view(-1), ignore_index=-100) for l in logits]).mean()
    return ce + cfg.distill_weight * distill + layer_ce, ce, distill, layer_ce


START_CASES = [MoDConfig(k=3), MoDConfig(k=4, router="sequence"), MoDConfig(k=2, router="vector"),
               MoDConfig(k=3, top_k=1), MoDConfig(k=4, top_k=2, top_k_weights="renormalized"),
               MoDConfig(k=3, router_input="normed", layer_ce=False), MoDConfig(k=3, weight_range="bounded")]


@pytest.mark.parametrize("cfg", START_CASES, ids=str)
def test_step0_is_exactly_the_base_model(cfg, tiny):
    # the default start: the ensemble weight g is 0, so z is the final layer's logits, bit for bit
    model = tiny()
    freeze_base(model)
    apply_lora(model, rank=2, alpha=4, verbose=False)  # B = 0: LoRA starts at the base too
    idx, y = batch()
    logits, (_, loss) = model(idx)[0], model(idx, y)  # with targets the model returns no logits
    attach_mod(model, cfg, verbose=False)
    assert torch.equal(model(idx)[0], logits)
    prompts = [[1, 5, 9], [1, 2, 3, 4, 5, 6]]
    plain_gen = model.generate(prompts, max_new_tokens=6)
    model.mod, saved = None, model.mod
    assert model.generate(prompts, max_new_tokens=6) == plain_gen
    model.mod = saved
    model(idx, y)  # the ensemble CE of the step-0 loss is the base's CE
    torch.testing.assert_close(model.mod.last_losses["ce"], loss.detach(), rtol=1e-6, atol=0)


def test_uniform_start_is_the_logit_lens_average(tiny):
    model = tiny()
    idx, _ = batch()
    _, hidden = model.forward_hidden(idx)
    k = 3
    by_hand = torch.stack([model.lm_head(model.norm(h)) for h in hidden[-k:]]).mean(0)
    attach_mod(model, MoDConfig(k=k, start="uniform"), verbose=False)
    torch.testing.assert_close(model(idx)[0], by_hand, rtol=1e-6, atol=1e-6)
    for i, l in enumerate(layer_logits(model, hidden)):  # each late layer alone: its plain logit lens
        torch.testing.assert_close(l, model.lm_head(model.norm(hidden[-k + i])))
    keys = {"mod.norms.0.weight", "mod.norms.1.weight", "mod.router.weight", "mod.router.bias"}
    assert keys <= set(model.state_dict()) and "mod.ensemble_weight" not in model.state_dict()


@pytest.mark.parametrize("cfg", [MoDConfig(k=1), MoDConfig(k=1, router="sequence", chunk_size=5, start="uniform")])
def test_plain_model_when_k1(cfg, tiny):
    model = tiny()
    freeze_base(model)
    idx, y = batch()
    logits, (_, loss) = model(idx)[0], model(idx, y)  # with targets the model returns no logits
    attach_mod(model, cfg, verbose=False)
    assert torch.equal(model(idx)[0], logits)
    mod_logits, mod_loss = model(idx, y)
    assert mod_logits is None  # with targets: the loss alone (computed at the target positions only)
    # k = 1: the ensemble CE and the layer CE are both the plain CE (summed differently: not bit-equal)
    torch.testing.assert_close(model.mod.last_losses["ce"], loss.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(mod_loss, (1 + cfg.layer_ce) * loss, rtol=1e-6, atol=0)


def test_top_k_keeps_the_k_largest(tiny):
    model = tiny()
    for how in ["kept", "renormalized"]:
        cfg = MoDConfig(k=4, top_k=2, top_k_weights=how)
        attach_mod(model, cfg, verbose=False)
        randomize_mod(model)
        idx, _ = batch(T=20)
        _, hidden = model.forward_hidden(idx)
        w = model.mod.routing_weights(model, hidden)
        assert ((w > 0).sum(-1) == 2).all()
        torch.testing.assert_close(w, hand_weights(model, hidden, cfg))
        sums = w.sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums)) == (how == "renormalized")


def trainable_setup(model, lora, cfg=None):
    freeze_base(model)  # as checkpoint.build_model does before LoRA and the add-ons
    if lora:
        apply_lora(model, rank=2, alpha=4, last_layers=None if lora == "all" else 3, verbose=False)
        with torch.no_grad():  # nonzero lora_B, so lora_A gets a gradient too
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.1)
    attach_mod(model, cfg or MoDConfig(k=3), verbose=False)
    return model


@pytest.mark.parametrize("lora", [None, "all", "last"])
def test_gradients_reach_router_norms_and_lora_only(lora, tiny):
    model = trainable_setup(tiny(), lora)
    idx, y = batch()
    model(idx, y)[1].backward()  # step 0: g = 0, so the router has no gradient yet (as LoRA's A with B = 0) ...
    assert model.mod.ensemble_weight.grad.abs() > 0 and model.mod.router.weight.grad.abs().sum() == 0
    model.zero_grad()
    with torch.no_grad():
        model.mod.ensemble_weight.fill_(0.3)  # ... and once g has moved, everything learns
    model(idx, y)[1].backward()
    lora_layers = set()
    for name, p in model.named_parameters():
        if name.startswith("mod.") or name.endswith(("lora_A", "lora_B")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            if "lora" in name:
                lora_layers.add(int(name.split(".")[1]))
        else:
            assert not p.requires_grad and p.grad is None, name
    assert lora_layers == {None: set(), "all": {0, 1, 2, 3}, "last": {1, 2, 3}}[lora]


def test_bounded_weight_has_the_free_gradient_at_0_and_stays_in_0_1(tiny):
    idx, y = batch()
    grads = {}
    for share in ("free", "bounded"):
        torch.manual_seed(0)  # the same random LoRA B for both
        model = trainable_setup(tiny(), "all", MoDConfig(k=3, weight_range=share))
        model(idx, y)[1].backward()
        grads[share] = model.mod.ensemble_weight.grad.clone()
    assert grads["bounded"].abs() > 0 and torch.equal(grads["bounded"], grads["free"])  # g = 0: d clamp / dg = 1
    model = trainable_setup(tiny(), "all", MoDConfig(k=3, weight_range="bounded"))
    randomize_mod(model)
    _, hidden = model.forward_hidden(idx)
    w = model.mod.routing_weights(model, hidden)
    final = torch.tensor([0.0, 0.0, 1.0])
    for raw, g in [(1.7, 1.0), (-0.4, 0.0), (0.25, 0.25)]:  # outside [0, 1] the bound is used
        with torch.no_grad():
            model.mod.ensemble_weight.fill_(raw)
        torch.testing.assert_close(model.mod.coefficients(model, hidden), g * w + (1 - g) * final)
        model.mod.after_step()
        assert model.mod.ensemble_weight.item() == g
    free = trainable_setup(tiny(), "all", MoDConfig(k=3, weight_range="free"))
    with torch.no_grad():
        free.mod.ensemble_weight.fill_(1.7)
    free.mod.after_step()  # a free share is left alone
    assert free.mod.ensemble_weight.item() == pytest.approx(1.7)


@pytest.mark.parametrize("how", ["kept", "renormalized"])
def test_top1_router_learns_only_with_kept_weights(how, tiny):
    model = trainable_setup(tiny(), None, MoDConfig(k=3, top_k=1, top_k_weights=how, start="uniform"))
    randomize_mod(model, scale=0.3)
    idx, y = batch()
    model(idx, y)[1].backward()
    grad = model.mod.router.weight.grad.abs().sum()
    assert grad > 0 if how == "kept" else grad == 0  # a softmax renormalized over one survivor is constant


@pytest.mark.parametrize("router_input", ["scaled", "normed"])
def test_router_step_does_not_scale_with_the_hidden_state(router_input, tiny):
    # one AdamW step of lr moves each weight by about lr; with the scaled input (L1 norm <= 1 per token) a score
    # moves by at most about 2 lr (weights + bias); the normed input (L1 norm ~ dim * gain) moves it far more
    model = trainable_setup(tiny(), None, MoDConfig(k=3, router_input=router_input))
    with torch.no_grad():
        model.norm.weight.mul_(4)  # a large final-norm gain, as pretrained models have
        model.mod.ensemble_weight.fill_(0.5)
    idx, y = batch()
    _, hidden = model.forward_hidden(idx)
    before = hand_weights(model, hidden, model.mod.cfg).log()
    lr = 1e-2
    opt = torch.optim.AdamW(model.mod.router.parameters(), lr=lr, weight_decay=0.0)
    model(idx, y)[1].backward()
    opt.step()
    moved = (hand_weights(model, hidden, model.mod.cfg).log() - before).abs().max().item()
    assert (moved <= 4 * lr) if router_input == "scaled" else (moved > 20 * lr), moved


CHUNK_CASES = [dict(distill_direction="forward"),
               dict(distill_direction="reverse", distill_temp=2.0, distill_weight=0.5),
               dict(distill_direction="forward", distill_temp=0.7, top_k=2, layer_ce=False),
               dict(router="sequence", distill_direction="reverse", distill_temp=1.5, start="uniform"),
               dict(router="vector", top_k=2, top_k_weights="renormalized", start="uniform", router_input="normed"),
               dict(top_k=1, distill_weight=0.0)]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=str)
def test_loss_and_gradients_match_reference(case, tiny):
    cfg = MoDConfig(k=3, **case)
    model = trainable_setup(tiny(), "all", cfg)
    randomize_mod(model, scale=0.5)
    idx, y = batch(T=13)  # 26 tokens
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(chunk_size):
        model.zero_grad()
        if chunk_size == "ref":
            _, hidden = model.forward_hidden(idx)
            terms = reference_loss(model, hidden, y, cfg)
            loss, parts = terms[0], dict(zip(["ce", "distill", "layer_ce"], terms[1:]))
        else:  # "definition": mod.ensemble_loss, the plain autograd loss; otherwise the fused path
            model.mod.fused = chunk_size != "definition"
            model.mod.cfg.chunk_size = None if chunk_size == "definition" else chunk_size
            logits, loss = model(idx, y)
            assert logits is None
            parts = model.mod.last_losses
        loss.backward()
        return loss.detach(), parts, [p.grad.clone() for p in params]

    ref_loss, ref_parts, ref_grads = loss_and_grads("ref")
    # the definition against the hand-written reference, then the fused path (21 target tokens; 7: chunks of 7)
    for chunk_size in ["definition", None, 7, 4, 21, 100]:
        loss, parts, grads = loss_and_grads(chunk_size)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        for name in ref_parts:  # (with distill_weight 0 the distillation is not computed at all)
            if name != "distill" or cfg.distill_weight > 0:
                torch.testing.assert_close(parts[name], ref_parts[name].detach(), rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref_grads):  # relative to the tensor's scale: sums of many terms cancel, and the
            # paths sum them in different orders (thread scheduling moves float32 results by up to ~5e-5 of the max)
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    with torch.no_grad():  # a validation loss: no gradients worked out
        torch.testing.assert_close(model(idx, y)[1], ref_loss, rtol=1e-5, atol=0)
    # the fused path against the definition: the loss to 1e-6, the gradients (sums that cancel) as above
    def_loss, def_parts, def_grads = loss_and_grads("definition")
    for chunk_size in [None, 7]:
        loss, parts, grads = loss_and_grads(chunk_size)
        torch.testing.assert_close(loss, def_loss, rtol=1e-6, atol=1e-7)
        for g, r in zip(grads, def_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())


def test_loss_of_a_batch_without_targets_is_zero(tiny):
    model = trainable_setup(tiny(), "all")
    idx, y = batch()
    loss = model(idx, torch.full_like(y, -100))[1]
    loss.backward()
    assert loss.item() == 0 and all(p.grad.abs().sum() == 0 for p in model.parameters() if p.requires_grad)


def test_sequence_router_is_causal(tiny):
    model = tiny()
    attach_mod(model, MoDConfig(k=3, router="sequence"), verbose=False)
    randomize_mod(model)
    idx, _ = batch(T=12)
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % V
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


GEN_CASES = [MoDConfig(k=3), MoDConfig(k=4, top_k=2), MoDConfig(k=3, router="vector"),
             MoDConfig(k=3, router="sequence"), MoDConfig(k=2, router="sequence", top_k=1)]


@pytest.mark.parametrize("cfg", GEN_CASES, ids=lambda c: f"{c.router}-k{c.k}-top{c.top_k}")
def test_cached_generation_equals_full_forward(cfg, tiny):
    model = tiny().eval()
    attach_mod(model, cfg, verbose=False)
    randomize_mod(model, scale=2.0)
    prompts = [[1, 5, 9], [1, 2, 3, 4, 5, 6, 7, 8], [1, 40], [1, 7, 7, 7, 7, 30]]
    with_cache = model.generate(prompts, max_new_tokens=10, use_cache=True)
    assert with_cache == model.generate(prompts, max_new_tokens=10, use_cache=False)

    # logits, step by step, against one full forward over the left-padded batch
    seq = torch.tensor([[0] * (8 - len(p)) + p + with_cache[i][:4] for i, p in enumerate(prompts)])
    n_pad = torch.tensor([8 - len(p) for p in prompts])
    with torch.no_grad():
        full = model(seq, n_pad=n_pad)[0]
        cache = KVCache(CFG, CFG.n_layers, len(prompts), seq.size(1), "cpu", torch.float32)
        cache.n_pad = n_pad
        steps = [model(seq[:, :8], cache=cache)[0]] + [model(seq[:, t:t + 1], cache=cache)[0] for t in range(8, 12)]
    real = torch.arange(12)[None] >= n_pad[:, None]
    for i in range(len(prompts)):  # left padding changes nothing (the running mean skips it)
        alone = model(seq[i:i + 1, n_pad[i]:])[0]
        torch.testing.assert_close(alone[0], full[i, n_pad[i]:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-4, atol=1e-4)


def saved_for_backward(model, idx, y):
    """Sizes (elements) of every tensor autograd saves for backward in the ensemble's forward and loss."""
    _, hidden = model.forward_hidden(idx)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.mod(model, hidden, y)[1]
    loss.backward()  # (runs: the chunks are recomputed here)
    return sizes


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_no_vocab_size_tensor_is_saved_for_backward(chunk_size, tiny):
    model = trainable_setup(tiny(), "all", MoDConfig(k=3, chunk_size=chunk_size))
    idx, y = batch(B=2, T=48)
    full = 2 * 48 * V  # one vocab-size logits tensor for the whole batch
    model.mod, saved = None, model.mod
    naive = saved_for_backward_plain(model, idx, y, naive=True)
    assert max(naive) >= full  # the measurement sees the logits of the naive loss (the LM head everywhere)
    model.mod = saved
    sizes = saved_for_backward(model, idx, y)
    assert max(sizes) < 48 * V, max(sizes)  # the gradients of the k readouts: (tokens, dim) each


def saved_for_backward_plain(model, idx, y, naive=False):
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        if naive:
            logits = model(idx)[0]
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
        else:
            loss = model(idx, y)[1]
    loss.backward()
    return sizes


def test_routing_stats_by_hand():
    w = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], [[0.2, 0.3, 0.5], [0.9, 0.0, 0.1]]])
    mask = torch.tensor([[True, True], [True, False]])
    s = routing_stats(w, mask)
    assert s["tokens"] == 3
    torch.testing.assert_close(torch.tensor(s["mean_weight"]), torch.tensor([0.7, 1.8, 0.5]) / 3)
    torch.testing.assert_close(torch.tensor(s["sparsity"]), torch.tensor([1, 0, 2]) / 3)
    torch.testing.assert_close(torch.tensor(s["top1"]), torch.tensor([1, 1, 1]) / 3)  # a tie goes to the first


def test_routing_stats_count_negative_coefficients_as_used():
    # start "final": c = g * w + (1 - g) on the final layer, so a learned g > 1 makes the final coefficient negative
    s = routing_stats(torch.tensor([[[2.5, -1.5], [0.0005, 0.9995]]]))
    torch.testing.assert_close(torch.tensor(s["sparsity"]), torch.tensor([0.5, 0.0]))


def test_only_layer_gives_that_layer_alone(tiny):
    model = tiny()
    attach_mod(model, MoDConfig(k=3), verbose=False)
    randomize_mod(model)
    idx, _ = batch()
    _, hidden = model.forward_hidden(idx)
    alone = layer_logits(model, hidden)
    for i in range(3):
        model.mod.only_layer = i
        torch.testing.assert_close(model(idx)[0], alone[i], rtol=0, atol=0)
    model.mod.only_layer = 3
    with pytest.raises(ValueError, match="only_layer=3"):
        model(idx)[0]


def test_bf16_model_trains(tiny):
    model = tiny().to(torch.bfloat16)
    apply_lora(model, rank=2, alpha=4, verbose=False)
    attach_mod(model, MoDConfig(k=2, chunk_size=5), verbose=False)
    assert all(p.dtype == torch.float32 for p in model.mod.parameters())
    idx, y = batch()
    loss = model(idx, y)[1]
    loss.backward()
    assert torch.isfinite(loss) and model.mod.ensemble_weight.grad.abs() > 0
    assert model(idx)[0].dtype == torch.float32


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k"), (dict(k=3, top_k=4), "top_k"), (dict(k=3, top_k=0), "top_k"), (dict(router="layer"), "router"),
    (dict(distill_direction="both"), "distill_direction"), (dict(start="x"), "start"),
    (dict(top_k_weights="x"), "top_k_weights"), (dict(router_input="x"), "router_input"),
    (dict(distill_temp=0.0), "distill_temp"),
    (dict(distill_weight=-1.0), "distill_weight"), (dict(chunk_size=0), "chunk_size"),
    (dict(weight_range="x"), "weight_range")])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoDConfig(**kwargs)


def test_k_larger_than_the_model(tiny):
    with pytest.raises(ValueError, match="the model has 4 layers"):
        attach_mod(tiny(), MoDConfig(k=5), verbose=False)
