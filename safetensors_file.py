"""
The safetensors reader: {name: tensor} over a copy-on-write memory map of the file, nothing read until it is used,
every header entry checked against the file before a tensor is made from it. weights.py reads Hugging Face's
checkpoints with it and writes them (save_safetensors).
"""
import json
import math
import mmap
import os

import torch

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class MappedTensors(dict):
    """read_safetensors' {name: tensor}, over a memory map of the file. release(name) gives the pages of one
    tensor back to the OS (they are read from the file again if touched): quantizing a checkpoint tensor by
    tensor then does not leave the whole file resident in this process."""

    def __init__(self, tensors, buf, spans):
        super().__init__(tensors)
        self.buf, self.spans = buf, spans

    def release(self, name):
        if not isinstance(self.buf, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start, end = self.spans[name]
        start, end = -(-start // page) * page, end // page * page  # only pages wholly inside this tensor
        if end > start:
            self.buf.madvise(mmap.MADV_DONTNEED, start, end - start)


def read_safetensors(path):
    """{name: tensor} backed by a copy-on-write mmap of the file: nothing is read until it is used."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{path}: corrupt safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else b""
    header.pop("__metadata__", None)
    tensors, spans = {}, {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape, (begin, end) = info["shape"], info["data_offsets"]
            if not all(type(v) is int and v >= 0 for v in [*shape, begin, end]):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors entry for {name!r}: {info}") from None
        count = math.prod(shape)
        if not 0 <= begin <= end <= size - 8 - n or end - begin != count * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} ({info['dtype']} {shape}) has data offsets "
                             f"{[begin, end]} that do not fit its shape or the file ({size} bytes)")
        if not count:
            t = torch.empty(0, dtype=dtype)
        else:
            t = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + begin)
        tensors[name] = t.view(shape)
        spans[name] = (8 + n + begin, 8 + n + end)
    return MappedTensors(tensors, buf, spans)
