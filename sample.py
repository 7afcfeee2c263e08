"""
Generate text from a base model or a tuned run, streamed to the terminal as it is produced.

    python sample.py "Once upon a time"                                   # the built-in base
    python sample.py --ckpt runs/arith-20250101-120000 "Tom has 3 apples and buys 4 more. How many?"
    python sample.py --init model.gguf --temperature 0.8 --top-k 40 --max-new-tokens 200 "The capital of France"
    echo "a prompt" | python sample.py --ckpt runs/x -                     # the prompt from standard input

Greedy by default (--temperature 0), so the same prompt always gives the same text: exactly what
model.generate returns. A tuned run (--ckpt) is given its prompt in the template it was tuned with
("Question: ...\\nAnswer:"); --raw sends the text as it is. MoD and MoLEx runs generate through their add-ons.
--chat sends it as a user message in the chat format of an instruct model's special tokens (chat.py:
LLaMA-3.x's header tokens or ChatML), with --system as the system message. Generation stops at any of the
model's end tokens (EOS, and those its generation_config.json / config.json lists, e.g. LLaMA-3.x's <|eot_id|>).

    python sample.py --init Llama-3.2-1B-Instruct --chat --system "Answer briefly." "Why is the sky blue?"
"""
import argparse
import math
import sys
from contextlib import nullcontext

import torch

from chat import chat_ids
from checkpoint import base_folder, load_run
from cli import HelpFormatter, UserError, add_device_flags, add_run_flags, pick_device, run_main, use_bf16
from data.format import bos, prompt_text
from threads import Threads
from weights import end_token_ids


def get_parser():
    p = argparse.ArgumentParser(description="Generate text from a base model or a tuned run (streamed).",
                                formatter_class=HelpFormatter)
    p.add_argument("prompt", help="the text to continue ('-': read it from standard input)")
    add_run_flags(p, "the model")
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint's own, as train.py finds it")
    p.add_argument("--raw", action="store_true", help="with --ckpt: send the prompt as it is, not in the "
                                                      "'Question: ...\\nAnswer:' template the run was tuned with")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message in the model's chat format (LLaMA-3.x instruct or "
                        "ChatML, from its special tokens)")
    p.add_argument("--system", default=None, help="with --chat: the system message")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens (or at EOS)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples from softmax(logits / T)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (with --temperature > 0)")
    add_device_flags(p)
    return p


def main(argv=None, out=sys.stdout):
    """Print the continuation as it is generated; returns the new token ids."""
    args = get_parser().parse_args(argv)
    if args.max_new_tokens < 1 or not args.temperature >= 0 or args.temperature == math.inf or \
            (args.top_k is not None and args.top_k < 1):  # `not >= 0` also refuses nan
        raise UserError(f"--max-new-tokens must be >= 1, --temperature finite and >= 0 and --top-k >= 1; got "
                        f"{args.max_new_tokens}, {args.temperature}, {args.top_k}")
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text.strip():
        raise UserError("the prompt is empty")
    device = pick_device(args.device)
    bf16 = use_bf16(args.dtype, device)
    if device.type == "cpu":
        Threads(args.threads)
    if args.system is not None and not args.chat:
        raise UserError("--system is a chat's system message: add --chat")
    model, tokenizer, settings, ckpt = load_run(args.ckpt, args.init, args.tokenizer, device,
                                                torch.bfloat16 if bf16 else torch.float32)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
                   [{"role": "user", "content": text}]
        try:
            ids = chat_ids(tokenizer, messages)
        except ValueError as e:
            raise UserError(f"--chat: {e}") from None
    else:
        if ckpt is not None and not args.raw:
            text = prompt_text({"question": text.strip(), "answer": ""})
        ids = bos(tokenizer) + tokenizer.encode(text)
    try:
        ends = end_token_ids(base_folder(settings["init"]), tokenizer)
    except ValueError as e:
        raise UserError(str(e)) from None
    room = model.config.max_seq_len - len(ids)
    if room < 1:
        raise UserError(f"the prompt has {len(ids)} tokens: the model's context ({model.config.max_seq_len}) "
                        f"leaves no room for a new one")
    new, shown = [], ""

    def stream(step):  # decode everything so far and print what is new (a character may span several tokens)
        nonlocal shown
        if step[0] in ends:
            return
        new.append(step[0])
        now = tokenizer.decode(new)
        if not now.endswith("\ufffd"):  # an unfinished multi-byte character: wait for its next token
            out.write(now[len(shown):])
            out.flush()
            shown = now

    generator = torch.Generator(device=device).manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        result = model.generate([ids], min(args.max_new_tokens, room), temperature=args.temperature,
                                top_k=args.top_k, eos_id=ends, generator=generator, on_token=stream)[0]
    out.write(tokenizer.decode(new)[len(shown):] + "\n")
    return result


if __name__ == "__main__":
    run_main(main, "sample.py")
