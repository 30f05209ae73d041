"""
Weight-only int8 inference: TinyGPT-V's low-resource mode (MiniGPT-4's `low_resource` option,
which loads the LLM 8-bit with bitsandbytes), in plain torch, on CPU and GPU.

Every nn.Linear of the LLM (qwen.py / phi.py), lm_head included, keeps its weight as int8 with one
scale per output channel (symmetric: scale = max |row| / 127, w ~ q * scale); activations, norms,
embeddings, attention and the KV cache stay in the model's dtype. lm_head matters most: at Qwen's
vocabulary of 151936 it is a quarter of the 0.5B model and is read on every token. A tied head gets
its own int8 copy; the embedding stays in float (a lookup reads one row per token). The vision tower
and llm_proj stay in float too: they run once per image, and EVA's attention reads its qkv weight
directly to add its q/v biases (vit.py).

    model = MultimodalLM.from_checkpoint(d)  # load our float checkpoint first, as usual
    quant.quantize(model.llm)                # then swap the LLM's Linears (python chat.py --dtype int8)

On CPU the matmul is torch's weight-only kernel `aten::_weight_int8pack_mm(A [M, K], B int8 [N, K],
scales [N]) -> [M, N]`, which dequantises inside the product. What torch 2.13 requires (read in
aten/src/ATen/native/cpu/int8mm_kernel.cpp and checked here): A 2-D and contiguous, scales 1-D of
size N and of A's dtype, output in A's dtype. On x86 only bf16 A is vectorised (AVX2 / AVX-512;
fp32 and fp16 run a scalar loop, ~6x slower than fp32 F.linear), so A is cast to bf16 and the
result back (fp32 accumulation inside). Those loops load A with aligned loads and have no tail: K
must be a multiple of 8 (AVX2) or 16 (AVX-512) and A aligned, else wrong sums (K = 36) or a
segfault (K = 33, or a view at an odd offset). Anything else, and every other device, takes the
fallback: F.linear with the dequantised weight, in the activations' dtype. (Upstream also registers
MPS and a one-thread-per-output CUDA kernel; this CPU build has neither, so neither is used.)
Inference only: int8 weights get no gradients, and a quantised model is not saved (quantise again
after loading).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen import DecoderLM

ROWS = 4096  # rows quantised at a time: no full fp32 copy of a large weight (151936-row heads)


def quantize_weight(w):
    """w [N, K] float -> (q int8 [N, K], scale bf16 [N]) with w ~ q * scale per row and
    |w - q * scale| <= scale / 2 everywhere. The scale is rounded to bf16 before q is computed, so
    the kernel's bf16 scales and the fallback's are the same numbers."""
    scale = (w.detach().abs().amax(1).float() / 127).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for i in range(0, len(w), ROWS):
        q[i:i + ROWS] = (w[i:i + ROWS].detach().float() / scale[i:i + ROWS, None].float()).round_().clamp_(-127, 127)
    return q, scale


def dequantize(q, scale, dtype=torch.float32):
    return q.to(dtype) * scale.to(dtype)[:, None]


def kernel_ok(x, k):
    """Can torch's CPU kernel take activations x with k input features (see the docstring)?"""
    return x.device.type == "cpu" and k % 16 == 0


def int8_mm(x, q, scale):
    """x [M, K] @ dequantised(q, scale).T with torch's CPU kernel, in bf16; the result in x's dtype."""
    a = x.to(torch.bfloat16).contiguous()
    if a.data_ptr() % 64:  # a view at an offset: the kernel's aligned loads would fault
        a = a.clone()
    return torch.ops.aten._weight_int8pack_mm(a, q, scale.to(torch.bfloat16)).to(x.dtype)


def dequant_mm(x, q, scale):
    """The fallback: the same product with the weight dequantised to x's dtype first."""
    return F.linear(x, dequantize(q, scale, x.dtype))


class Int8Linear(nn.Module):
    """An nn.Linear whose weight is int8 + per-output-channel scales (buffers); the bias stays float."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # [..., K] -> [M, K]
        mm = int8_mm if kernel_ok(x2, self.in_features) else dequant_mm
        y = mm(x2, self.weight, self.scale).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def quantize(llm):
    """Swap every nn.Linear of a loaded qwen.py / phi.py LLM for an Int8Linear, in place; returns llm."""
    if not isinstance(llm, DecoderLM):
        raise TypeError(f"int8 quantises the LLM (a qwen.py / phi.py DecoderLM, e.g. model.llm), got "
                        f"{type(llm).__name__}: the vision tower and llm_proj stay in float")
    linears = [(name, m) for name, m in llm.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("no nn.Linear left to quantise: the LLM is already int8")
    if any(m.weight.is_meta for _, m in linears):
        raise ValueError("the LLM's weights are on the meta device: load the checkpoint first, then quantise")
    for name, m in linears:
        parent, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent), child, Int8Linear(m))
    return llm
