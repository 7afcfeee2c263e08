"""
MoLEx: Mixture of Layer Experts (Teo & Nguyen, ICLR 2025; docs/design.md#molex).

At each mixed layer t a gate reads the layer's input z_t and picks a layer j of the same model as an "expert"
(the very module model.layers[j], its weights and LoRA adapters shared; no new expert parameters):

    z_{t+1} = u_t(z_t) + m_t * (u_j(z_t) - u_t(z_t))          (u = a whole block, residual connections included)

m_t = 1 - alpha is the expert's mixing weight. By default it is learned per mixed layer and starts at 0, so a tuned
model starts exactly at its base and m_t has a gradient there (the expert grows in, as LoRA's zero B lets its
update grow); the paper's fixed alpha (0.5; 0.95 in the authors' decoder recipe) is --molex-alpha with
--no-molex-learn-alpha.

The gate scores all L layers for every token; j is the mode of the tokens' top-1 choices, taken over the whole
batch (rule "paper", training only) or over each sequence (rule "sequence": sequences are grouped by expert so
each chosen block runs once on its group). Evaluation and generation always route per sequence, so predictions
never depend on batch-mates: only a sequence's prompt tokens vote (not padding, not tokens after prompt_end),
the choice is made at prefill and kept in cache.state, and the expert call of layer t has its own KV-cache slot
(L + t), so cached generation equals the uncached forward exactly.

Train/test consistency (vote="prompt", the default): at generation only the prompt exists, so in training too
only the prompt's tokens vote (train.py passes prompt_end); an example is then trained with the very experts its
prompt would get at test time, and the options of a multiple-choice question are all scored under the same
experts. vote="all" lets the answer tokens vote as in the paper.

What trains the gate (gate_mode):
  balance   the paper. Argmax and mode give the task loss nothing to differentiate; the only signal is the
            load-balance loss  balance_weight * mean over mixed layers of L * mean_tokens p_j (the authors sum
            over layers, so its size grew with the depth: about 2 on a 30-layer model, as large as the task loss).
  task      u_j's output is multiplied by p_j / p_j.detach() (value 1, gradient d log p_j), plus the balance
            loss if balance_weight > 0.
  aux_free  as task, but balanced without a loss: a per-(layer, expert) bias is added to the scores for the
            selection only and moved after each optimizer step, b_e += u * sign(mean load - load_e).

Usage: attach_molex(model, MoLExConfig()) registers the gate as model.molex, the model's layer hook. It freezes
nothing (the base is frozen where a run's model is built).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from errors import check_choices

GATE_SHARING = ("shared", "per_layer")
RULES = ("paper", "sequence")
GATE_MODES = ("balance", "task", "aux_free")
VOTES = ("prompt", "all")
GATE_INITS = ("normal", "uniform")


@dataclass
class MoLExConfig:
    """MoLEx's settings; train.py's --molex-* flags are made from these fields (help text included)."""
    layers: str = field(default="all", metadata={"help": "mixed layers: all, first:n or last:n (each chooses "
                                                         "among all layers)"})
    share: str = field(default="shared", metadata={"choices": GATE_SHARING, "help": (
        "one gate Linear(dim, n_layers) with bias for all mixed layers, or one per layer")})
    cosine: bool = field(default=False, metadata={"help": (
        "cosine gate: scale * cos(z, w_e) + b_e, blind to the size of the hidden state")})
    # cosines lie in [-1, 1]: without a scale the softmax is nearly uniform
    cosine_scale: float = field(default=10.0, metadata={"help": "scale of the cosine gate's scores"})
    rule: str = field(default="paper", metadata={"choices": RULES, "help": (
        "training: paper = one expert per layer for the whole batch (the mode of the tokens' top-1 choices); "
        "sequence = one per sequence. Evaluation always routes per sequence")})
    vote: str = field(default="prompt", metadata={"choices": VOTES, "help": (
        "training: which tokens vote for the expert: prompt (as at generation, where only the prompt exists) or "
        "all (the paper)")})
    alpha: float = field(default=1.0, metadata={"help": (
        "weight of the layer itself, 1 - the expert's mixing weight m_t; the start value when learned (1: the base "
        "model). The paper: 0.5 fixed; the authors' decoder recipe (GPT-2): 0.95 fixed")})
    learn_alpha: bool = field(default=True, metadata={"help": (
        "learn the expert's mixing weight m_t = 1 - alpha per mixed layer, a free scalar (so it can start at "
        "exactly 0); --no-molex-learn-alpha keeps alpha fixed, as the paper")})
    gate_mode: str = field(default="balance", metadata={"choices": GATE_MODES, "help": (
        "what trains the gate: balance = only the load-balance loss (the paper); task = the task loss too "
        "(expert output x p_j / p_j.detach()); aux_free = the task loss, balanced by a selection bias instead of "
        "a loss")})
    balance_weight: float | None = field(default=None, metadata={"help": (
        "weight of the load-balance loss L * mean p_j, averaged over the mixed layers (default 0.01; 0 with "
        "aux_free; the authors sum over layers: multiply by their number for theirs)")})
    bias_rate: float = field(default=0.001, metadata={"help": "aux_free: step u of the selection bias after each "
                                                              "optimizer step"})
    # The paper's gate lr 0.1 suits RoBERTa, whose layer inputs are LayerNorm outputs; one AdamW step of 0.1 (6x
    # the init scale of +-1/sqrt(4096)) on LLaMA's unnormalized residual stream would saturate the gate at once.
    gate_lr: float | None = field(default=None, metadata={"help": (
        "peak lr of the gate and the learned mixing weight m_t, in their own AdamW group (default: --lr; the "
        "paper's 0.1 was for RoBERTa and saturates a gate reading LLaMA's hidden states)")})
    gate_weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of the gate and alpha "
                                                                    "(the paper's)"})
    gate_init: str = field(default="normal", metadata={"choices": GATE_INITS, "help": (
        "the gate's initial weights: normal = N(0, 0.02) with a zero bias (the authors'); uniform = within "
        "+-1/sqrt(dim) for weight and bias (nn.Linear's default)")})
    seed: int | None = field(default=None, metadata={"help": "seed of the gate's initialization (default: --seed)"})

    def __post_init__(self):
        if self.balance_weight is None:
            self.balance_weight = 0.0 if self.gate_mode == "aux_free" else 0.01
        check_choices(self, "MoLEx", "molex")
        mixed_layers(self.layers, None)
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"MoLEx alpha (--molex-alpha) must be in [0, 1], got {self.alpha}")
        if self.balance_weight < 0 or self.bias_rate < 0 or self.cosine_scale <= 0:
            raise ValueError(f"MoLEx needs balance_weight >= 0, bias_rate >= 0 and cosine_scale > 0 (--molex-balance-"
                             f"weight, --molex-bias-rate, --molex-cosine-scale), got {self.balance_weight}, "
                             f"{self.bias_rate}, {self.cosine_scale}")


def mixed_layers(spec, n_layers):
    """The mixed layer indices for "all", "first:n", "last:n" (n_layers None: check the syntax only)."""
    kind, _, n = spec.partition(":")
    if spec != "all" and (kind not in ("first", "last") or not n.isdigit() or int(n) < 1):
        raise ValueError(f"MoLEx layers (--molex-layers) {spec!r}: use 'all', 'first:n' or 'last:n' with n >= 1")
    if n_layers is None or spec == "all":
        return None if n_layers is None else list(range(n_layers))
    if int(n) > n_layers:
        raise ValueError(f"MoLEx layers (--molex-layers) {spec!r}: the model has {n_layers} layers")
    return list(range(int(n))) if kind == "first" else list(range(n_layers - int(n), n_layers))


def rows_of(t, rows):
    """The rows of a per-row tensor (a (B, 1, T, .) mask or RoPE table); shared ones (size 1 or 2-D) as they are."""
    return t[rows] if t is not None and t.dim() == 4 and t.size(0) > 1 else t


class MoLEx(nn.Module):
    """Registered as model.molex; model.forward calls it for every layer i instead of the block. It holds only the
    gate, the optional alpha scalars and the aux_free bias (fp32, in model.state_dict() as molex.*): the experts
    are the model's own blocks, taken from the `model` argument at every call."""

    def __init__(self, model, cfg: MoLExConfig):
        super().__init__()
        L, dim, device = model.config.n_layers, model.config.dim, model.embed.weight.device
        self.cfg, self.L = cfg, L
        self.mixed = mixed_layers(cfg.layers, L)
        self.index = {t: k for k, t in enumerate(self.mixed)}  # mixed layer -> its gate (per_layer) and alpha
        n_gates = 1 if cfg.share == "shared" else len(self.mixed)
        g, bound = torch.Generator().manual_seed(cfg.seed or 0), 1 / math.sqrt(dim)
        if cfg.gate_init == "normal":
            weight, bias = torch.randn(n_gates, L, dim, generator=g) * 0.02, torch.zeros(n_gates, L)
        else:
            weight = (torch.rand(n_gates, L, dim, generator=g) * 2 - 1) * bound
            bias = (torch.rand(n_gates, L, generator=g) * 2 - 1) * bound
        self.gate_weight, self.gate_bias = nn.Parameter(weight.to(device)), nn.Parameter(bias.to(device))
        if cfg.gate_mode == "balance" and cfg.balance_weight == 0:  # nothing could train it: keep it out of the
            self.gate_weight.requires_grad_(False)  # optimizer (and out of DDP's unused-parameter check)
            self.gate_bias.requires_grad_(False)
        self.mix_weight = None  # learn_alpha: the expert's mixing weight m_t = 1 - alpha per mixed layer
        if cfg.learn_alpha:
            self.mix_weight = nn.Parameter(torch.full((len(self.mixed),), 1 - cfg.alpha, device=device))
        self.register_buffer("select_bias", torch.zeros(L, L, device=device))  # aux_free: [layer t, expert e]
        # plain CPU tensors, not buffers (DDP would overwrite every rank's buffers with rank 0's at each forward)
        self.load = torch.zeros(L, L)  # aux_free: sequences per [layer t, expert e] since the last update_bias
        self.collect_stats = False  # when True, stats[t, j] counts the sequences whose layer t used expert j
        self.stats = torch.zeros(L, L, dtype=torch.long)
        self._aux = None  # this pass's balance loss: (sum over mixed layers, their number), without its weight
        self.last_aux = None  # what aux_loss() last returned (log_numbers; model.forward adds it to the loss)

    def gate_parameters(self):
        """Everything MoLEx trains (gate and alpha): the parameters of its own optimizer group."""
        return [p for p in self.parameters() if p.requires_grad]

    def mix_weight_of(self, t):
        """m_t = 1 - alpha at mixed layer t: a fixed float, or the learned scalar."""
        return 1 - self.cfg.alpha if self.mix_weight is None else self.mix_weight[self.index[t]]

    def scores(self, t, x):
        """(B, T, L) gate scores of layer t's input, in fp32 (bf16 scores would tie and flip choices)."""
        k = 0 if self.cfg.share == "shared" else self.index[t]
        w, b, x = self.gate_weight[k], self.gate_bias[k], x.float()
        if self.cfg.cosine:
            return self.cfg.cosine_scale * F.normalize(x, dim=-1) @ F.normalize(w, dim=-1).T + b
        return F.linear(x, w, b)

    def forward(self, model, i, x, rope, mask, cache=None, n_pad=None, prompt_end=None):
        if i == 0:
            self._aux = None  # a pass that computed no loss must not leak its balance loss into the next
        block, ckpt = model.layers[i], model.grad_checkpointing and model.training
        if i not in self.index:
            if ckpt:
                return checkpoint(block, x, rope, mask, use_reentrant=False)
            return block(x, rope, mask, cache.slot(i) if cache is not None else None)
        experts, scale = self.route(i, x, cache, cache.n_pad if cache is not None else n_pad, prompt_end,
                                    model.training)
        m = self.mix_weight_of(i)
        run = lambda x: self.mix(model, i, x, rope, mask, cache, experts, m, scale)  # noqa: E731
        return checkpoint(run, x, use_reentrant=False) if ckpt else run(x)  # both blocks recomputed in backward

    def route(self, t, x, cache, n_pad, prompt_end, training):
        """experts (B,): each row's expert at layer t; scale (B, T, 1) or None: p_j / p_j.detach() (task modes)."""
        B, T, _ = x.shape
        if cache is not None and cache.pos > 0:  # generation after the prefill: keep the prompt's choice
            if "molex" not in cache.state:
                raise RuntimeError("MoLEx: a KV cache past position 0 without the routing its prefill decides")
            return cache.state["molex"][t], None  # no scale: generation has no gradients (and it is 1)
        logits = self.scores(t, x)
        voters = torch.ones(B, T, dtype=torch.bool, device=x.device)
        col = torch.arange(T, device=x.device)
        if n_pad is not None:
            voters &= col >= n_pad[:, None]
        if prompt_end is not None and not (training and cache is None and self.cfg.vote == "all"):
            voters &= col < torch.as_tensor(prompt_end, device=x.device).reshape(-1, 1)
        choice = (logits.detach() + self.select_bias[t]).argmax(-1)  # the bias steers the selection only
        votes = (F.one_hot(choice, self.L) * voters[..., None]).sum(1)  # (B, L) per-row counts
        if training and cache is None and self.cfg.rule == "paper":
            votes = votes.sum(0, keepdim=True).expand(B, -1)
        # argmax takes the lowest index among ties; a row without voters keeps its own layer (the plain block)
        experts = torch.where(votes.sum(-1) > 0, votes.argmax(-1), t)
        if cache is not None:
            cache.state.setdefault("molex", {})[t] = experts
        self.record(t, experts, training)
        logp = F.log_softmax(logits, -1).gather(-1, experts[:, None, None].expand(B, T, 1))
        if training and self.cfg.balance_weight > 0:
            p = logp.squeeze(-1).exp()
            term = self.L * (p * voters).sum() / voters.sum().clamp(min=1)
            self._aux = (term, 1) if self._aux is None else (self._aux[0] + term, self._aux[1] + 1)
        scale = None
        if self.cfg.gate_mode != "balance" and torch.is_grad_enabled():
            scale = torch.exp(logp - logp.detach())  # = p_j / p_j.detach(), never 0/0 when p_j underflows
        return experts, scale

    def mix(self, model, t, x, rope, mask, cache, experts, m, scale):
        """z' = u_t(z) + m_t (u_j(z) - u_t(z)): layer t's block mixed with each row's expert block j."""
        u_t = model.layers[t](x, rope, mask, cache.slot(t) if cache is not None else None)
        u_j = self.expert_blocks(model, t, x, rope, mask, cache, experts, u_t)
        if scale is not None:  # task modes: u_j * p_j / p_j.detach() (value 1, the gradient of log p_j)
            u_j = u_j * scale.to(u_j.dtype)
        if self.mix_weight is None:  # fixed alpha = 1 - m_t
            return (1 - m) * u_t + m * u_j  # z' = alpha u_t + (1 - alpha) u_j, as the paper writes it
        # m_t = 0 gives exactly u_t, and m_t has a gradient there
        return u_t + m.to(u_t.dtype) * (u_j - u_t)  # z' = u_t + m_t (u_j - u_t)

    def expert_blocks(self, model, t, x, rope, mask, cache, experts, u_t):
        """u_j(z) of each row's expert j: one call of block j on the rows that chose it (its KV-cache slot is L + t);
        rows whose expert is layer t itself keep u_t."""
        B, u_j = x.size(0), u_t
        for j in experts.unique().tolist():
            if j == t:
                continue
            rows = (experts == j).nonzero().squeeze(1)
            whole = len(rows) == B
            slot = cache.slot(self.L + t, None if whole else rows) if cache is not None else None
            if whole:
                u_j = model.layers[j](x, rope, mask, slot)
            else:
                part = model.layers[j](x[rows], tuple(rows_of(r, rows) for r in rope), rows_of(mask, rows), slot)
                u_j = u_j.index_copy(0, rows, part)
        return u_j

    def record(self, t, experts, training):
        counting = training and self.cfg.gate_mode == "aux_free"
        if not counting and not self.collect_stats:
            return  # nothing to count: no bincount, no device-to-host copy in the step
        counts = torch.bincount(experts, minlength=self.L).cpu()
        if counting:
            self.load[t] += counts
        if self.collect_stats:
            self.stats[t] += counts

    def aux_loss(self):
        """The weighted balance loss accumulated since the last call, averaged over the mixed layers (0-dim; 0
        when off or in eval), then reset."""
        aux, self._aux = self._aux, None
        self.last_aux = self.gate_bias.new_zeros(()) if aux is None else self.cfg.balance_weight * aux[0] / aux[1]
        return self.last_aux

    @torch.no_grad()
    def after_step(self):
        """The add-on interface (model.addons): after each optimizer step, aux_free's bias update."""
        self.update_bias()

    def log_numbers(self):
        """The add-on interface: the last balance loss (weighted, as added to the training loss)."""
        return {} if self.last_aux is None else {"molex_balance_loss": float(self.last_aux.detach())}

    def update_bias(self):
        """aux_free: after each optimizer step, b_e += u * sign(mean load - load_e) per mixed layer (else nothing)."""
        if self.cfg.gate_mode == "aux_free":
            load = self.load.to(self.select_bias.device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(load)  # every rank moves its bias by the global load
            load = load[self.mixed]
            self.select_bias[self.mixed] += self.cfg.bias_rate * torch.sign(load.mean(-1, keepdim=True) - load)
        self.load.zero_()

    def stat_fractions(self):
        """(L, L): stats[t, j] / sequences counted at layer t (rows of unmixed or unseen layers are 0)."""
        return self.stats.double() / self.stats.sum(1, keepdim=True).clamp(min=1)

    def stats_report(self):
        """The counted choices for a report: layers numbered from 1, as in every table and plot."""
        return {"rows": "mixed layer t (row 0 = layer 1)", "columns": "expert layer j (column 0 = layer 1)",
                "mixed_layers": [t + 1 for t in self.mixed], "counts": self.stats.tolist(),
                "fractions": [[round(v, 4) for v in row] for row in self.stat_fractions().tolist()]}


def attach_molex(model, cfg: MoLExConfig, verbose=True):
    """Build the gate and register it as model.molex (its own parameters trainable; nothing else changes)."""
    if model.config.n_layers < 2:  # a layer's expert is another layer: one layer has none
        raise ValueError(f"--molex mixes each layer with another layer, and this model has "
                         f"{model.config.n_layers}: use a model of 2 layers or more")
    model.molex = MoLEx(model, cfg)
    if verbose:
        own = sum(p.numel() for p in model.molex.parameters())
        alpha = f"learned from {cfg.alpha}" if cfg.learn_alpha else cfg.alpha
        print(f"MoLEx on layers {cfg.layers} of {model.config.n_layers} ({cfg.share} gate, rule {cfg.rule}, "
              f"gate_mode {cfg.gate_mode}, alpha {alpha}): {own:,} new parameters")
    return model.molex


def prompt_end_from_targets(targets):
    """(B,) prompt_end for model(idx, targets, prompt_end=...): the column of each row's first answer token, one
    past the first position with a target. Valid only if the prompt's positions are ignored (prompt_loss off)."""
    return (targets != -100).int().argmax(1) + 1
