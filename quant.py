"""
The frozen base in 4 or 8 bits (QLoRA's idea, on torch alone): block formats, quantizers and dequantizers, and
QuantizedLinear, the frozen layer that holds its weight as blocks.

A quantized weight is a uint8 tensor of shape (out_features, bytes per row): each row of the matrix is a run of
blocks, so permuting rows (RoPE's q/k order) permutes whole blocks. Formats (values, bytes per block):
    q8_0  (32, 34)  f16 scale d, 32 int8:                 w = d * q            (GGUF, llama.cpp)
    q4_0  (32, 18)  f16 scale d, 16 bytes of nibbles:     w = d * (q - 8)      (GGUF)
    q4_1  (32, 20)  f16 scale d, f16 minimum m, nibbles:  w = d * q + m        (GGUF)
    nf4   (64, 34)  f16 absmax, 32 bytes of nibbles:      w = absmax * NF4[q]  (QLoRA's 4-bit NormalFloat)
In a 4-bit block, value j of the first half is the low nibble of byte j, value j + half its high nibble (GGUF's
order, kept for nf4). The GGUF formats dequantize with gguf_file.py's code (one implementation); nf4 keeps its
absmax in float16 rather than QLoRA's float32 or 8-bit "double quantization": 4.25 bits per weight, which puts
LLaMA-2-7B's frozen matrices at 3.4 GB (docs/design.md#4-bit-bases).

What --base-bits does (weights.from_pretrained): the 7 projections of every block are held quantized; the
embedding, the norms and the LM head stay in the compute dtype. A GGUF tensor already in q4_0 / q4_1 / q8_0 is
kept as its bytes were loaded; a float tensor is quantized as it is read, to nf4 (4 bits) or q8_0 (8 bits), or to
--base-format's format (which also re-quantizes GGUF blocks).
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from gguf_file import dequantize_blocks

BLOCKS = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "nf4": (64, 34)}  # format -> (values, bytes)
GGML_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 8}  # the GGUF formats' ggml type ids
# QLoRA's NF4 code: the 16 values (bitsandbytes' table), quantiles of N(0, 1) scaled to [-1, 1] with an exact 0
NF4_CODE = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                         0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])
DEFAULT_FORMAT = {4: "nf4", 8: "q8_0"}  # what a float checkpoint becomes (docs/design.md#4-bit-bases: why nf4)


@dataclass
class QuantConfig:
    """The frozen base's precision; train.py's --base-* flags are made from these fields."""
    bits: int | None = field(default=None, metadata={
        "help": "hold the frozen base's block matrices in 4 or 8 bits (QLoRA-style; quant.py); default: the "
                "compute dtype", "choices": [4, 8]})
    format: str | None = field(default=None, metadata={
        "help": "with --base-bits: the block format of float weights (default nf4 for 4 bits, q8_0 for 8); given, "
                "GGUF blocks of another format are re-quantized to it too", "choices": list(BLOCKS)})

    def __post_init__(self):
        if self.format is not None and self.bits is None:
            raise ValueError("--base-format needs --base-bits")
        if self.format is not None and (self.format == "q8_0") != (self.bits == 8):
            raise ValueError(f"--base-format {self.format} is not a {self.bits}-bit format")

    @property
    def float_format(self):
        return self.format or DEFAULT_FORMAT[self.bits]


def quantize(w, fmt):
    """A float matrix (out, in) -> its blocks, uint8 (out, in / block values * block bytes). Quantized in float32
    with the same operations as the reference (gguf.quants.quantize for the GGUF formats, bit for bit)."""
    values, nbytes = BLOCKS[fmt]
    if w.dim() != 2 or w.shape[1] % values:
        raise ValueError(f"cannot hold a {tuple(w.shape)} weight in {fmt}: its rows must be multiples of {values}")
    rows = max(1, 2 ** 22 // w.shape[1])  # about 4M values at a time: the float32 temporaries stay small
    if w.shape[0] > rows:
        return torch.cat([quantize(part, fmt) for part in w.split(rows)])
    x = w.detach().float().reshape(-1, values)
    if fmt == "q8_0":
        d = x.abs().amax(1, keepdim=True) / 127
        inv = torch.where(d == 0, 0.0, 1 / d)
        q = round_away(x * inv).to(torch.int8).view(torch.uint8)
        parts = [d.half().view(torch.uint8), q]
    elif fmt == "q4_0":
        biggest = x.gather(1, x.abs().argmax(1, keepdim=True))  # signed: the block's extreme maps to -8
        d = biggest / -8
        inv = torch.where(d == 0, 0.0, 1 / d)
        q = torch.trunc(x * inv + 8.5).clamp(0, 15).to(torch.uint8)
        parts = [d.half().view(torch.uint8), pack_nibbles(q)]
    elif fmt == "q4_1":
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        d = (hi - lo) / 15
        inv = torch.where(d == 0, 0.0, 1 / d)
        q = torch.trunc((x - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)
        parts = [d.half().view(torch.uint8), lo.half().view(torch.uint8), pack_nibbles(q)]
    else:  # nf4: scale by the block's absmax (as stored, in float16), then the nearest of the 16 code values
        absmax = x.abs().amax(1, keepdim=True).half()
        scale = absmax.float()
        normed = x / torch.where(scale == 0, 1.0, scale)
        code = NF4_CODE.to(x.device)
        q = torch.bucketize(normed, (code[1:] + code[:-1]) / 2).to(torch.uint8)  # ties go to the lower value
        parts = [absmax.view(torch.uint8), pack_nibbles(q)]
    return torch.cat(parts, 1).reshape(w.shape[0], -1)


def dequantize(blocks, fmt, shape, dtype=torch.float32):
    """Blocks (any shape holding whole blocks) -> the float matrix of `shape`, computed in float32, then cast.
    1M values at a time, written into the result: the float32 and index temporaries (about 20 bytes a value)
    stay near 20 MB, so a layer's peak is about its result alone (2 bytes a value in bfloat16)."""
    values = BLOCKS[fmt][0]
    rows = blocks.reshape(-1, BLOCKS[fmt][1])
    out = torch.empty(rows.shape[0], values, dtype=dtype, device=rows.device)
    step = max(1, 2 ** 20 // values)
    code = NF4_CODE.to(rows.device)  # once per call, not once per piece
    for start in range(0, rows.shape[0], step):
        part = rows[start:start + step]
        if fmt == "nf4":
            absmax = part[:, :2].contiguous().view(torch.float16).float()
            packed = part[:, 2:]
            q = torch.cat([packed & 0x0F, packed >> 4], dim=1).long()
            out[start:start + step] = code[q] * absmax
        else:
            out[start:start + step] = dequantize_blocks(part, GGML_TYPES[fmt])
    return out.reshape(shape)


def round_away(x):
    """Round half away from zero (C's roundf, as llama.cpp's quantizers; torch.round goes to even), written as
    the gguf package writes it (floor(|x| + 0.5) differs at 0.49999997, where the float32 sum rounds up)."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def pack_nibbles(q):
    """(n, values) of 0..15 -> (n, values / 2) bytes: the first half in the low nibbles, the second in the high."""
    half = q.shape[1] // 2
    return q[:, :half] | (q[:, half:] << 4)


def nbytes(model):
    """Bytes of the frozen base's tensors as held: every parameter and buffer (rope tables excluded), a tied
    head counted once."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "rope_" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


class DequantizeMatmul(torch.autograd.Function):
    """y = x W^T with W held in quantized blocks: W is dequantized here, and again in the backward pass for the
    input's gradient, so nothing of full size is saved between the two (only the blocks, which the layer holds)."""

    @staticmethod
    def forward(ctx, x, blocks, fmt, shape, dtype):
        ctx.fmt, ctx.shape, ctx.dtype = fmt, shape, dtype
        ctx.save_for_backward(blocks)
        return F.linear(x, dequantize(blocks, fmt, shape, dtype))

    @staticmethod
    def backward(ctx, grad_y):
        (blocks,) = ctx.saved_tensors
        w = dequantize(blocks, ctx.fmt, ctx.shape, ctx.dtype)
        return (grad_y.to(w.dtype) @ w).to(grad_y.dtype), None, None, None, None  # the frozen W gets none


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear (no bias) whose weight is held as 4- or 8-bit blocks (quant.py), dequantized to `dtype`
    one layer at a time as the forward pass reaches it."""

    def __init__(self, blocks, fmt, in_features, out_features, dtype=torch.float32):
        super().__init__()
        self.register_buffer("blocks", blocks)  # uint8 (out_features, bytes per row)
        self.fmt, self.in_features, self.out_features, self.dtype = fmt, in_features, out_features, dtype

    def forward(self, x):
        return DequantizeMatmul.apply(x, self.blocks, self.fmt, (self.out_features, self.in_features), self.dtype)

    def dequantized(self):
        return dequantize(self.blocks, self.fmt, (self.out_features, self.in_features), self.dtype)
