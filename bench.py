"""Benchmarks, one subcommand each: this file is the command; the benchmarks are written by subject in
bench_tokenizers.py, bench_loading.py, bench_training.py, bench_eval.py, bench_lm_eval.py and bench_quant.py,
their measuring helpers in benchkit.py.

    python bench.py tokenizer [--text-mb 4]   # encode throughput: tokenizer.py vs sentencepiece
    python bench.py load                      # peak RSS while loading a 1.1B-shaped bf16 checkpoint, both formats
    python bench.py gguf                      # loading SmolLM2's GGUF file: ours vs transformers (time, peak RSS)
    python bench.py bpe                       # SmolLM2's tokenizer: bpe.py vs Hugging Face tokenizers, one thread
    python bench.py llama3-tokenizer          # Meta's LLaMA-3 tokenizer.model (bpe.py) vs tokenizers
    python bench.py train [--shape small]     # training step time, memory, MFU: ours (LoRA, MoD, MoLEx) vs HF+PEFT
    python bench.py train --explain           # torch.compile graphs and graph breaks of each configuration
    python bench.py padding --data DIR ...    # share of padded positions: random vs length-grouped batches
    python bench.py score --data DIR          # ARC option scoring with SmolLM2: LoRA + MoD vs LoRA (time, memory)
    python bench.py generate                  # greedy generation with SmolLM2: ours vs transformers' generate
    python bench.py lm-eval --data DIR        # multiple-choice scoring: eval.py vs lm-eval-harness 0.4.13
    python bench.py quant                     # --base-bits: formats' error, train.py peak RSS / step time, 7B memory
"""
import argparse

import bench_eval
import bench_lm_eval
import bench_loading
import bench_quant
import bench_tokenizers
import bench_training


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{tokenizer,load,gguf,bpe,llama3-tokenizer,train,padding,score,generate,lm-eval,quant}")
    for subject in (bench_tokenizers, bench_loading, bench_training, bench_eval, bench_lm_eval, bench_quant):
        subject.add_commands(sub)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
