"""Chat prompts for instruct models, in the format their special tokens imply (sample.py --chat). The two
formats are written out by hand (no template engine) and tested against transformers' apply_chat_template:

  llama3  LLaMA-3.1 / 3.2 / 3.3 Instruct (<|start_header_id|> in the vocabulary):
          <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n
          Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{system}<|eot_id|>
          then for each message <|start_header_id|>{role}<|end_header_id|>\n\n{content, stripped}<|eot_id|>,
          then the assistant's header. The system block is always there (empty without a system message),
          as in Meta's template.
  chatml  ChatML, e.g. SmolLM2-Instruct (<|im_start|> and <|im_end|> in the vocabulary):
          <|im_start|>{role}\n{content}<|im_end|>\n for each message, then <|im_start|>assistant\n.
          SmolLM2's own template adds a default system message when none is given; here there is one only when
          it is given (sample.py --system).

The special tokens are inserted as ids and only the text between them is encoded, as plain text: a message
that spells "<|eot_id|>" cannot end its turn early.
"""
import time

LLAMA3_DATE_HEADER = "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"


def special_id(tokenizer, text):
    """The id of special token `text` in this tokenizer, or None (SentencePiece tokenizers have none)."""
    return tokenizer.added_id(text) if hasattr(tokenizer, "added_id") else None


def chat_format(tokenizer):
    """'llama3' or 'chatml' by the special tokens the vocabulary has, else None."""
    has = lambda *names: all(special_id(tokenizer, t) is not None for t in names)  # noqa: E731
    if has("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        return "llama3"
    if has("<|im_start|>", "<|im_end|>"):
        return "chatml"
    return None


def chat_ids(tokenizer, messages, date=None):
    """Token ids of a conversation (a list of {"role", "content"}; a first "system" message is the system
    prompt), ending with the assistant's header so that the model writes the next turn. date: LLaMA-3's
    "Today Date" (default: today, as transformers renders Meta's template)."""
    fmt = chat_format(tokenizer)
    if fmt is None:
        raise ValueError("this tokenizer has neither LLaMA-3's header tokens (<|start_header_id|>, "
                         "<|end_header_id|>, <|eot_id|>) nor ChatML's (<|im_start|>, <|im_end|>): it is no "
                         "instruct model's, so there is no chat format to use")
    parts = []  # special token names in <<...>>, everything else text
    if fmt == "llama3":
        system = messages[0]["content"].strip() if messages and messages[0]["role"] == "system" else ""
        rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
        date = date or time.strftime("%d %b %Y")
        parts += ["<|begin_of_text|>", "<|start_header_id|>", "system", "<|end_header_id|>",
                  "\n\n" + LLAMA3_DATE_HEADER.format(date=date) + system, "<|eot_id|>"]
        for m in rest:
            parts += ["<|start_header_id|>", m["role"], "<|end_header_id|>", "\n\n" + m["content"].strip(),
                      "<|eot_id|>"]
        parts += ["<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"]
    else:
        for m in messages:
            parts += ["<|im_start|>", f"{m['role']}\n{m['content']}", "<|im_end|>", "\n"]
        parts += ["<|im_start|>", "assistant\n"]
    ids = []
    for part in parts:
        tid = special_id(tokenizer, part) if part.startswith("<|") and part.endswith("|>") else None
        ids += [tid] if tid is not None else tokenizer.encode(part)
    return ids
