"""Tokenized training data and batches: language-modeling windows, task examples, the data order, padding.

    train, val = load_training_data(settings, tokenizer, max_len)   # lists of (ids, labels)
    order = DataOrder(len(train), seed, lengths, 8)                  # resumable: DataOrder(.., **order.state())
    ids, labels = collate([train[i] for i in order.take(8)], pad_id, device)
"""
from pathlib import Path

import torch

from errors import UserError

from . import BUILTIN_TASKS, load_examples
from .builtin import make_corpus
from .format import IGNORE_INDEX, training_examples


def lm_examples(text, tokenizer, max_len):
    """Language-modeling examples from plain text: documents (split at blank lines) as [bos] doc [eos], joined
    into one stream and cut into windows of max_len + 1 tokens (input = window[:-1], labels = window[1:])."""
    stream = []
    for doc in text.split("\n\n"):
        if doc.strip():
            stream += tokenizer.encode(doc.strip(), bos=True, eos=True)
    n = (len(stream) - 1) // max_len
    return [(stream[i * max_len:(i + 1) * max_len], stream[i * max_len + 1:(i + 1) * max_len + 1]) for i in range(n)]


def load_training_data(a, tokenizer, max_len):
    """(train examples, validation examples) of a run's settings `a` (a dict), each a list of (ids, labels);
    labels are -100 where not trained."""
    if a["pretrain"]:
        if a["data"] in (None, "corpus"):
            text = make_corpus(a["corpus_chars"], seed=a["seed"])
        else:
            text = Path(a["data"]).read_text(encoding="utf-8")
        examples = lm_examples(text, tokenizer, max_len)
        if len(examples) < 2:
            raise UserError(f"--data {a['data'] or 'corpus'}: {len(text):,} characters make fewer than 2 sequences "
                            f"of --max-len {max_len}")
        n_val = min(max(1, len(examples) // 50), a["eval_n"])  # hold out the last ~2% (never trained on)
        return examples[:-n_val], examples[-n_val:]

    builtin = a["data"] in BUILTIN_TASKS
    difficulty = a["difficulty"] if builtin else None
    try:
        records = load_examples(a["data"], "train", n=a["n_train"], seed=0, difficulty=difficulty)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--data {a['data']}: {e}") from None
    if a["n_train"] is not None and len(records) < a["n_train"]:
        print(f"note: --n-train {a['n_train']} but {a['data']} has {len(records)} training records")
    target = a.get("choice_target", "label")  # a run saved before the flag was trained on labels
    train = [ex for r in records for ex in training_examples(tokenizer, r, a["prompt_loss"], max_len, target)]
    train = [ex for ex in train if any(t != IGNORE_INDEX for t in ex[1])]
    if not train:
        raise UserError(f"--data {a['data']}: no training example keeps a target token within --max-len {max_len}")
    val = []
    if a["eval_n"] and (builtin or (Path(a["data"]).is_dir() and (Path(a["data"]) / "test.jsonl").is_file())):
        try:
            val_records = load_examples(a["data"], "test", n=a["eval_n"], seed=0, difficulty=difficulty)
            val = [ex for r in val_records for ex in training_examples(tokenizer, r, max_len=max_len,
                                                                        choice_target=target)]
        except (FileNotFoundError, ValueError) as e:
            print(f"note: no validation loss ({e})")
    return train, val


# Length grouping sorts windows of this many batches by length: large enough to find similar lengths, small
# enough that which examples share a step stays random
GROUP_BATCHES = 64


class DataOrder:
    """The order examples are trained in: a seeded permutation per epoch, read from a position. Saving
    (epoch, pos) and starting again from it gives the same batches as never stopping.

    With lengths (each example's length) and batch_size, batches are grouped by length: each epoch's
    permutation is cut into windows of GROUP_BATCHES batches, each window is sorted by length and cut into
    batches, and the batches are shuffled (seeded), so a batch holds examples of similar length and pads little.
    take() reads the epochs as one stream, so the cuts fall where take(batch_size) will cut."""

    def __init__(self, n, seed, lengths=None, batch_size=1, epoch=0, pos=0):
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos
        self.lengths, self.batch_size = lengths, batch_size
        self.perm = self.permutation(epoch)

    def permutation(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None or min(self.lengths) == max(self.lengths):  # equal lengths: nothing to group
            return perm
        bs = self.batch_size
        head = (-epoch * self.n) % bs  # the first examples complete the batch the previous epoch ended in
        rest, batches = perm[head:], []
        for s in range(0, len(rest), bs * GROUP_BATCHES):
            window = sorted(rest[s:s + bs * GROUP_BATCHES], key=self.lengths.__getitem__)
            batches += [window[i:i + bs] for i in range(0, len(window), bs)]
        tail = batches.pop() if batches and len(batches[-1]) < bs else []  # continued by the next epoch
        shuffled = [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]
        return perm[:head] + shuffled + tail

    def take(self, k):
        """The next k example indices (continuing into the next epoch when this one ends)."""
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self.perm = self.permutation(self.epoch)
            m = min(k - len(out), self.n - self.pos)
            out += self.perm[self.pos:self.pos + m]
            self.pos += m
        return out

    def state(self):
        return {"epoch": self.epoch, "pos": self.pos}


def collate(examples, pad_id, device):
    """Right-pad a list of (ids, labels) into two (B, T) tensors (padding labels are -100)."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.tensor([x + [pad_id] * (T - len(x)) for x, _ in examples], device=device)
    labels = torch.tensor([y + [IGNORE_INDEX] * (T - len(y)) for _, y in examples], device=device)
    return ids, labels
