"""Small helpers several test files share (plain functions; fixtures live in conftest.py)."""
import torch


def base_argv(base, out, *extra):
    """train.py flags of a short LoRA run on the built-in arith task over the `base` folder, into `out`."""
    return ["--init", str(base), "--data", "arith", "--difficulty", "1", "--n-train", "24", "--max-len", "96",
            "--batch-size", "4", "--lora-rank", "4", "--lr", "1e-2", "--warmup-steps", "2", "--eval-every", "0",
            "--eval-n", "4", "--out", str(out), *extra]


def random_hf_llama(transformers, cfg, seed=0):
    """A transformers LlamaForCausalLM of config `cfg` with random weights and norms away from 1 (so a wrong norm
    shows), in eval mode."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape))
    return model
