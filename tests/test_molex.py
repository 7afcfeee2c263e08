"""MoLEx (molex.py) against hand computations on tiny random models: the mixing formula, the routing rules, the
gate's gradients, per-sequence routing at evaluation, cached generation, gradient checkpointing."""
import json

import pytest
import torch
import torch.nn.functional as F

from lora import apply_lora
from molex import MoLExConfig, attach_molex, prompt_end_from_targets
from report import write_plots

L = 4  # layers of the test models
PROMPTS = [[1, 5, 9, 33, 2], [1, 40, 2, 7, 7, 8, 90, 3, 11], [1, 17, 60, 61, 62, 20, 4]]


def molex_model(make_model, verbose=False, **cfg):
    model = make_model(n_layers=L, std=0.2)
    return model, attach_molex(model, MoLExConfig(**cfg), verbose=verbose)


def randomize_gate(molex, seed=0, std=1.0):
    """Gates that give different tokens (and sequences) different experts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        molex.gate_weight.copy_(torch.randn(molex.gate_weight.shape, generator=g) * std)
        molex.gate_bias.zero_()


def force_experts(molex, forced):
    """Gates whose bias makes expert forced[t] win every token of layer t (a shared gate: one expert for all)."""
    with torch.no_grad():
        molex.gate_weight.zero_()
        molex.gate_bias.zero_()
        for t, j in forced.items():
            molex.gate_bias[molex.index[t] if molex.cfg.share == "per_layer" else 0, j] = 10.0


def hand_forward(model, idx, forced, alpha):
    """z_{t+1} = alpha * u_t(z_t) + (1 - alpha) * u_j(z_t) layer by layer, straight from the blocks."""
    T = idx.size(1)
    rope = (model.rope_cos[:T], model.rope_sin[:T])
    x = model.embed(idx)
    for t, block in enumerate(model.layers):
        y = block(x, rope)
        x = alpha * y + (1 - alpha) * model.layers[forced[t]](x, rope) if t in forced else y
    return model.lm_head(model.norm(x))


def left_pad(seqs):
    longest = max(len(s) for s in seqs)
    n_pad = torch.tensor([longest - len(s) for s in seqs])
    return torch.tensor([[0] * (longest - len(s)) + s for s in seqs]), n_pad


def chosen(molex):
    """{layer: sorted experts used} from the stats, and the stats reset."""
    out = {t: sorted(torch.nonzero(molex.stats[t]).flatten().tolist()) for t in molex.mixed}
    molex.stats.zero_()
    return out


# ---------------------------------------------------------------------------------------------------------
# the mixing formula

@pytest.mark.parametrize("cfg", [dict(), dict(alpha=1.0, learn_alpha=False), dict(rule="paper", share="per_layer")])
def test_start_is_the_plain_model_exactly(make_model, cfg):
    # default: the learned mixing weight m_t starts at 0; alpha = 1 fixed is the plain model too
    model, molex = molex_model(make_model, **{"rule": "sequence", "balance_weight": 0.0, **cfg})
    randomize_gate(molex)
    idx = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(0))
    with_molex = model(idx)[0]
    model.train()
    _, loss = model(idx, idx)
    model.molex = None
    assert torch.equal(with_molex, model.eval()(idx)[0])
    assert torch.equal(loss, model.train()(idx, idx)[1])


@pytest.mark.parametrize("layers, forced", [("all", {0: 2, 1: 0, 2: 3, 3: 3}), ("first:2", {0: 3, 1: 2}),
                                            ("last:2", {2: 0, 3: 1})])
def test_forced_experts_give_the_hand_mix(make_model, layers, forced):
    model, molex = molex_model(make_model, layers=layers, share="per_layer", alpha=0.3, learn_alpha=False)
    assert molex.mixed == sorted(forced)
    force_experts(molex, forced)
    idx = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    expected = hand_forward(model, idx, forced, 0.3)
    torch.testing.assert_close(model(idx)[0], expected, rtol=1e-5, atol=1e-6)
    model.molex = None
    assert (model(idx)[0] - expected).abs().max() > 1e-3  # the mix changes the output: the test can tell


# ---------------------------------------------------------------------------------------------------------
# training: routing rules and what trains the gate

@pytest.mark.parametrize("rule", ["paper", "sequence"])
def test_routing_and_balance_loss_match_hand_computation(make_model, rule):
    """The expert is the mode of the tokens' top-1 gate choices (over the batch or each row); the balance loss
    is w * mean_t L * mean p_j; in balance mode the gate's gradient is exactly that loss's gradient."""
    model, molex = molex_model(make_model, rule=rule, balance_weight=0.05)
    randomize_gate(molex, seed=3)
    idx = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(2))
    model.train()
    molex.collect_stats = True
    hidden = model.trunk(idx, None, None, None, keep_all=True)  # model(idx, idx), keeping every layer's output
    _, loss = model.output(hidden, idx, None, None)
    loss.backward()
    inputs = [model.embed(idx).detach()] + [h.detach() for h in hidden[:-1]]  # each layer's input
    balance, used = 0, {}
    for t, z in enumerate(inputs):
        scores = z @ molex.gate_weight[0].T + molex.gate_bias[0]
        top1 = scores.argmax(-1)
        groups = [top1.flatten()] if rule == "paper" else list(top1)
        experts = [int(torch.bincount(g, minlength=L).argmax()) for g in groups]
        per_row = experts * 3 if rule == "paper" else experts
        used[t] = sorted(set(experts))
        p = F.softmax(scores, -1)[torch.arange(3), :, per_row]
        balance = balance + L * p.mean()
    assert chosen(molex) == used
    assert rule == "paper" or any(len(e) > 1 for e in used.values()), "rows all chose alike: weak test"
    hand_grad = torch.autograd.grad(0.05 * balance / len(inputs), molex.gate_weight)[0]
    torch.testing.assert_close(molex.gate_weight.grad, hand_grad, rtol=1e-4, atol=1e-7)
    assert hand_grad.abs().sum() > 0


@pytest.mark.parametrize("gate_mode, balance_weight, gets_grad", [("balance", 0.0, False), ("balance", 0.01, True),
                                                                   ("task", 0.0, True)])
def test_which_modes_give_the_gate_a_gradient(make_model, gate_mode, balance_weight, gets_grad):
    # alpha 0.5: the task gradient reaches the gate through the mixing weight m_t (0 at the default start)
    model, molex = molex_model(make_model, gate_mode=gate_mode, balance_weight=balance_weight, rule="sequence",
                               alpha=0.5)
    randomize_gate(molex)
    model.train()
    idx = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model(idx, idx)[1].backward()
    grad = molex.gate_weight.grad
    assert (grad is not None and grad.abs().sum() > 0) == gets_grad
    assert (id(molex.gate_weight) in map(id, molex.gate_parameters())) == gets_grad  # an untrainable gate: frozen


def test_task_mode_keeps_values_and_aux_free_bias(make_model):
    """task and aux_free give the same values as balance mode (p_j / p_j.detach() = 1); the aux_free bias moves
    by u * sign(mean load - load), steers the selection, and adds no gradient."""
    def run(mode, bias=None, forced=None, **cfg):
        model, molex = molex_model(make_model, gate_mode=mode, share="per_layer", rule="sequence", **cfg)
        if forced is None:
            randomize_gate(molex, seed=1)
        else:
            force_experts(molex, forced)
        if bias is not None:
            molex.select_bias.copy_(bias)
        model.train()
        molex.collect_stats = True
        hidden = model.trunk(idx, None, None, None, keep_all=False)  # model(idx, idx), keeping the last layer
        _, loss = model.output(hidden, idx, None, None)
        loss.backward()
        logits = model.output(hidden, None, None, None)[0].detach()  # with targets the model makes no logits
        return model, molex, logits, molex.gate_weight.grad

    idx = torch.randint(0, 96, (3, 8), generator=torch.Generator().manual_seed(4))
    _, _, plain, _ = run("balance")
    _, molex, logits, grad = run("aux_free")
    assert molex.aux_loss() == 0 and not molex.select_bias.requires_grad
    assert "select_bias" in dict(molex.named_buffers()) and "molex.select_bias" in molex_state_keys(molex)
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)
    _, _, _, task_grad = run("task", balance_weight=0.0)
    torch.testing.assert_close(grad, task_grad, rtol=0, atol=0)  # zero bias: aux_free is task mode, no loss
    # a small bias that keeps the same choices changes no gradient
    small = 1e-4 * torch.randn(L, L, generator=torch.Generator().manual_seed(0))
    _, small_molex, _, small_grad = run("aux_free", bias=small)
    assert chosen(small_molex) == chosen(molex)
    torch.testing.assert_close(small_grad, grad, rtol=0, atol=0)
    # every layer forced onto expert 2: its bias goes down by u, the others' up by u
    _, molex, _, _ = run("aux_free", forced={t: 2 for t in range(L)})
    molex.update_bias()
    assert torch.equal(molex.select_bias, 0.001 * torch.tensor([[1.0, 1.0, -1.0, 1.0]] * L))
    molex.update_bias()  # no selection since: nothing moves
    assert torch.equal(molex.select_bias, 0.001 * torch.tensor([[1.0, 1.0, -1.0, 1.0]] * L))
    # a bias large enough overrides the gate for the selection
    _, molex, _, _ = run("aux_free", bias=torch.tensor([0.0, 0.0, 0.0, 100.0]).expand(L, L),
                         forced={t: 2 for t in range(L)})
    assert chosen(molex) == {t: [3] for t in range(L)}


def molex_state_keys(molex):
    return {f"molex.{k}" for k in molex.state_dict()}


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_learned_mix_weight_starts_at_one_minus_alpha_and_learns(make_model, alpha):
    model, molex = molex_model(make_model, alpha=alpha, share="per_layer")
    assert [molex.mix_weight_of(t).item() for t in range(L)] == [1 - alpha] * L
    assert {"molex.mix_weight", "molex.gate_weight", "molex.gate_bias"} <= set(model.state_dict())
    force_experts(molex, {0: 2, 1: 3, 2: 0, 3: 1})
    model.train()
    idx = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model(idx, idx)[1].backward()
    assert molex.mix_weight.grad is not None and (molex.mix_weight.grad.abs() > 0).all()  # a gradient at 0 too
    assert set(map(id, molex.gate_parameters())) == {id(p) for p in molex.parameters()}


def test_grad_checkpointing_covers_both_blocks(make_model):
    model = make_model(n_layers=L, std=0.2)
    apply_lora(model, rank=4, alpha=8, dropout=0.1, targets=("q", "v"), verbose=False)
    molex = attach_molex(model, MoLExConfig(gate_mode="task", rule="sequence", learn_alpha=True), verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    randomize_gate(molex, seed=2)
    model.train()
    idx = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(5))
    molex.collect_stats = True

    def run(ckpt):
        model.grad_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same LoRA dropout masks
        _, loss = model(idx, idx)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = run(False)
    assert any(len(e) > 1 for e in chosen(molex).values()), "rows all chose alike: grouping untested"
    loss_ckpt, grads_ckpt = run(True)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert len(grads) == len(grads_ckpt) > 2 and all(g is not None for g in grads_ckpt.values())
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    model.molex = None
    torch.manual_seed(0)
    assert abs(model(idx, idx)[1].item() - loss) > 1e-4  # the mixing matters: a skipped mix would show


# ---------------------------------------------------------------------------------------------------------
# evaluation and generation: per-sequence routing on the prompt

@pytest.mark.parametrize("rule", ["paper", "sequence"])
def test_eval_routing_does_not_depend_on_the_batch(make_model, rule):
    model, molex = molex_model(make_model, rule=rule)
    randomize_gate(molex)
    molex.collect_stats = True
    alone = [model(torch.tensor([s]))[0][0] for s in PROMPTS]
    assert any(len(e) > 1 for e in chosen(molex).values()), "all sequences chose alike: weak test"
    for order in ([0, 1, 2], [2, 0, 1], [1, 2]):
        idx, n_pad = left_pad([PROMPTS[k] for k in order])
        logits = model(idx, n_pad=n_pad)[0]
        for row, k in enumerate(order):
            torch.testing.assert_close(logits[row, n_pad[row]:], alone[k], rtol=1e-4, atol=1e-5)


def test_prompt_end_routes_on_the_prompt_only(make_model):
    model, molex = molex_model(make_model, rule="sequence")
    randomize_gate(molex, seed=0)
    molex.collect_stats = True
    prompt, answer = PROMPTS[1], [5] * 12
    full = torch.tensor([prompt + answer])
    on_prompt = model(torch.tensor([prompt]))[0][0]
    by_prompt = chosen(molex)
    model(full)
    assert chosen(molex) != by_prompt, "the answer changes no vote: weak test"
    torch.testing.assert_close(model(full, prompt_end=len(prompt))[0][0, :len(prompt)], on_prompt)
    assert chosen(molex) == by_prompt
    # training: prompt_end from the targets; vote="all" ignores it (the paper)
    targets = torch.tensor([[-100] * (len(prompt) - 1) + answer + [-100]])
    assert prompt_end_from_targets(targets).tolist() == [len(prompt)]
    model.train()
    model(full, targets, prompt_end=prompt_end_from_targets(targets))
    assert chosen(molex) == by_prompt
    molex.cfg.vote = "all"
    model(full, targets, prompt_end=prompt_end_from_targets(targets))
    assert chosen(molex) != by_prompt


def test_cached_generation_equals_uncached(make_model):
    model, molex = molex_model(make_model, rule="paper", share="per_layer")
    randomize_gate(molex)
    molex.collect_stats = True
    cached = model.generate(PROMPTS, 8)
    assert any(len(e) > 1 for e in chosen(molex).values()), "all sequences chose alike: weak test"
    assert len({t for row in cached for t in row}) > 5, "degenerate generation: weak test"
    assert model.generate(PROMPTS, 8, use_cache=False) == cached
    assert [model.generate([p], 8)[0] for p in PROMPTS] == cached
    assert model.generate(PROMPTS[::-1], 8) == cached[::-1]


def test_stats_and_save(make_model, tmp_path):
    model, molex = molex_model(make_model, layers="last:2", rule="sequence")
    force_experts(molex, {2: 0, 3: 0})
    molex.collect_stats = True
    model.generate(PROMPTS, 2)
    assert molex.stats[2:].tolist() == [[3, 0, 0, 0]] * 2 and molex.stats[:2].sum() == 0
    saved = json.loads(json.dumps(molex.stats_report()))  # what eval.py's JSON report holds
    assert saved["fractions"][3] == [1.0, 0.0, 0.0, 0.0] and saved["counts"][0] == [0] * 4
    assert saved["mixed_layers"] == [3, 4]  # numbered from 1, as in every table and plot
    files = write_plots({"metrics": {"output": {"strict": 0.0}}, "molex": saved}, str(tmp_path / "eval"), L, "test")
    assert files[-1] == f"{tmp_path}/eval-molex.png" and (tmp_path / "eval-molex.png").stat().st_size > 1000


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers="middle:2"), "--molex-layers"), (dict(layers="first:0"), "--molex-layers"),
    (dict(share="both"), "--molex-share"), (dict(rule="token"), "--molex-rule"),
    (dict(gate_mode="topk"), "--molex-gate-mode"), (dict(vote="answer"), "--molex-vote"),
    (dict(alpha=1.5), "--molex-alpha"), (dict(gate_init="zero"), "--molex-gate-init"),
    (dict(balance_weight=-1.0), "balance_weight"), (dict(cosine_scale=0.0), "cosine_scale")])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoLExConfig(**kwargs)


def test_layers_beyond_the_model_are_refused(make_model):
    with pytest.raises(ValueError, match="has 4 layers"):
        molex_model(make_model, layers="last:5")


def test_cosine_gate_matches_its_definition(make_model):
    model, molex = molex_model(make_model, cosine=True, cosine_scale=7.0)
    randomize_gate(molex)
    z = torch.randn(2, 3, 64)
    w = molex.gate_weight[0]
    expected = 7.0 * (z / z.norm(dim=-1, keepdim=True)) @ (w / w.norm(dim=-1, keepdim=True)).T + molex.gate_bias[0]
    torch.testing.assert_close(molex.scores(1, z), expected)


# ---------------------------------------------------------------------------------------------------------
# MoLEx with MoD

def test_molex_with_mod(make_model):
    mod = pytest.importorskip("mod")
    model = make_model(n_layers=L, std=0.2)
    apply_lora(model, rank=4, alpha=8, verbose=False)
    mod.attach_mod(model, mod.MoDConfig(k=2), verbose=False)  # before MoLEx: attach_mod freezes non-LoRA weights
    molex = attach_molex(model, MoLExConfig(gate_mode="task", rule="sequence"), verbose=False)
    randomize_gate(molex)
    model.train()
    idx = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and molex.gate_weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mod.parameters())
    model.eval()
    assert model.generate(PROMPTS, 6, use_cache=False) == model.generate(PROMPTS, 6)


@pytest.mark.parametrize("layers", ["all", "first:2", "last:1"])
def test_balance_loss_does_not_grow_with_the_mixed_layers(make_model, layers):
    # a uniform gate: p_j = 1/L at every layer, so each layer's term L * mean p_j is 1, and so is their mean
    model, molex = molex_model(make_model, layers=layers, balance_weight=0.01)
    with torch.no_grad():
        molex.gate_weight.zero_()
    model.train()
    idx = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model(idx, idx)
    torch.testing.assert_close(molex.last_aux, torch.tensor(0.01), rtol=1e-6, atol=0)


def test_gate_init_and_seed(make_model):
    model = make_model(n_layers=L, std=0.2)
    gates = {}
    for init, seed in [("normal", 0), ("normal", 1), ("uniform", 0)]:
        gates[init, seed] = attach_molex(model, MoLExConfig(gate_init=init, seed=seed), verbose=False)
    normal = gates["normal", 0]
    assert abs(normal.gate_weight.std().item() - 0.02) < 0.002 and not normal.gate_bias.any()  # the authors'
    assert not torch.equal(normal.gate_weight, gates["normal", 1].gate_weight)
    bound = 1 / model.config.dim ** 0.5
    uniform = gates["uniform", 0]
    assert uniform.gate_weight.abs().max() <= bound and uniform.gate_bias.abs().max() > 0


def test_run_seed_seeds_the_gate(tiny_base):
    from checkpoint import build_model
    settings = {"pretrain": False, "init": str(tiny_base), "seed": 0, "molex": MoLExConfig(), "mod": None}
    gate = lambda **kw: build_model({**settings, **kw}, verbose=False).molex.gate_weight  # noqa: E731
    assert not torch.equal(gate(seed=0), gate(seed=1))
    assert torch.equal(gate(seed=1), gate(seed=5, molex=MoLExConfig(seed=1)))  # --molex-seed overrides
