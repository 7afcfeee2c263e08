"""
Export a tuned run (or a base) to Hugging Face's format: config.json + model.safetensors with LoRA merged into
the weights, and the tokenizer file beside them, so transformers' LlamaForCausalLM (or this project's
from_pretrained) loads it as a plain model. The base's RoPE scaling (LLaMA-3.1+) and all its end tokens
(config.json's eos_token_id, a list for LLaMA-3.x instruct models) are written too.

    python export.py --ckpt runs/gsm8k-20250101-120000 --out exported/gsm8k-lora
    python export.py --ckpt runs/x --out exported/x --dtype bfloat16
    python export.py --init model.gguf --out exported/smollm2       # a GGUF file as a Hugging Face folder

MoD and MoLEx change the forward pass in ways LlamaForCausalLM cannot express (MoD mixes the logits of several
layers, MoLEx runs a second block per layer). Such a run is refused unless --drop-addons asks for what can be
exported: the base with LoRA merged, without the add-on, which is NOT the tuned run's output.

The folder gets an exported.json (what was exported, the files written). --out must be a new or empty folder, or an
earlier export of the same run or base (then its files are replaced, none is left stale); anything else is refused.
"""
import argparse
import json
import shutil
from pathlib import Path

import torch

from checkpoint import base_folder, load_run
from cli import HelpFormatter, UserError, add_run_flags, run_main
from weights import end_token_ids, save_hf


def get_parser():
    p = argparse.ArgumentParser(description="Export a tuned run (LoRA merged) or a base to Hugging Face's format.",
                                formatter_class=HelpFormatter)
    add_run_flags(p, "what to export")
    p.add_argument("--out", required=True, help="folder to write: new, empty, or an earlier export of the same run")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights; default: the base checkpoint's")
    p.add_argument("--drop-addons", action="store_true",
                   help="export a MoD or MoLEx run without its add-on (base + merged LoRA only)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    out = Path(args.out)
    source = (str(Path(args.ckpt).resolve()) if args.ckpt
              else f"base {Path(args.init).resolve() if args.init else 'builtin'}")
    earlier = check_out_folder(out, source)
    model, tokenizer, settings, ckpt = load_run(args.ckpt, args.init, None, "cpu", dtype=None)
    addons = [name for name, on in (("MoD", model.mod is not None), ("MoLEx", model.molex is not None)) if on]
    if addons and not args.drop_addons:
        raise UserError(f"this run uses {' and '.join(addons)}, which a plain LlamaForCausalLM cannot express "
                        f"(MoD mixes the logits of several layers; MoLEx runs a second block in each layer). Add "
                        f"--drop-addons to export the base with LoRA merged and without the add-on: that model "
                        f"is not the tuned run's output")
    spec = str(settings.get("tokenizer") or "")
    extra = {}
    out.mkdir(parents=True, exist_ok=True)
    for name in earlier:  # the earlier export's files go: one of them (a tokenizer) may not be written again
        (out / name).unlink(missing_ok=True)
    if spec.endswith(("tokenizer.model", "tokenizer.json")) and Path(spec).is_file():
        shutil.copy(spec, out / Path(spec).name)  # the tokenizer travels with the weights
        if spec.endswith("tokenizer.json") and Path(spec).with_name("tokenizer_config.json").is_file():
            shutil.copy(Path(spec).with_name("tokenizer_config.json"), out)  # its BOS / EOS / padding
    elif spec == "byte" or not spec.endswith(".gguf"):
        extra["tokenizer"] = spec or "byte"  # the name this project's loaders read
    else:
        extra["tokenizer"] = spec  # a GGUF file's tokenizer: there is no tokenizer.json to copy
    ends = end_token_ids(base_folder(settings["init"]), tokenizer)  # all of them: LLaMA-3.x's <|eot_id|> too
    save_hf(model, out, dtype=getattr(torch, args.dtype) if args.dtype else None, extra_config=extra,
            bos_id=tokenizer.bos_id, eos_id=ends if len(ends) > 1 else tokenizer.eos_id)
    what = f"run {args.ckpt} (step {ckpt['step']}, LoRA merged)" if ckpt else f"base {settings['init']}"
    dropped = f", without its {' and '.join(addons)}" if addons else ""
    files = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    (out / MANIFEST).write_text(json.dumps({"source": source, "step": ckpt["step"] if ckpt else None,
                                            "dropped_addons": addons, "dtype": args.dtype, "files": files}, indent=1))
    print(f"exported {what}{dropped} to {out}: {', '.join(files)}")
    return out


MANIFEST = "exported.json"


def check_out_folder(out, source):
    """--out is new, empty, or an earlier export of the same run (source); returns the files that export wrote.
    Anything else is refused before any work: its files would be mixed with ours."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: pick a folder to write the model into")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return []
    try:
        earlier = json.loads((out / MANIFEST).read_text())
        same, files = earlier["source"] == source, list(earlier["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--out {out} is not empty and is not an export of this project (it holds "
                        f"{', '.join(held[:5])}{'...' if len(held) > 5 else ''}): pick a new or empty folder") from None
    if not same:
        raise UserError(f"--out {out} holds an export of {earlier['source']}, not of {source}: pick another folder")
    others = sorted(set(held) - set(files) - {MANIFEST})
    if others:
        raise UserError(f"--out {out} holds files the earlier export did not write ({', '.join(others[:5])}): "
                        f"remove them or pick another folder")
    return files


if __name__ == "__main__":
    run_main(main, "export.py")
