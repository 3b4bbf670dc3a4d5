"""The attention op's ``causal`` flag on every backend: the torch reference against an explicit additive mask
(open_clip's text ``attn_mask``), the Triton backend's op, the C++ kernel (float and quantized outputs) and a
whole causal block on each backend; awkward lengths (77, 13, 1)."""

import pytest
import torch

from conftest import cosine
from lra_kernels import cpu as cpu_kernels
from lra_kernels.backend import get_ops
from lra_kernels.block import QuantAttention, QuantBlock, QuantLinear, QuantMLP
from lra_kernels.kernels.attention import attention_ref
from lra_kernels.quant import quantize_per_token_ref

needs_cpu_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                       reason=f"CPU kernels unavailable: {cpu_kernels.reason()}")
SHAPES = [(2, 77, 8, 512), (3, 13, 4, 64), (1, 1, 2, 32), (2, 70, 4, 48), (1, 7, 2, 128)]


def masked_attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """Float64 attention with open_clip's additive causal mask (``-inf`` above the diagonal)."""
    B, T, three_d = qkv.shape
    D = three_d // 3
    q, k, v = qkv.double().view(B, T, 3, n_head, D // n_head).permute(2, 0, 3, 1, 4).unbind(0)
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu_(1)
    s = q @ k.transpose(-1, -2) / (D // n_head) ** 0.5 + mask
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)


@pytest.mark.parametrize("B,T,heads,D", SHAPES)
def test_reference_causal_matches_additive_mask(B, T, heads, D):
    qkv = torch.randn(B, T, 3 * D)
    out = attention_ref(qkv, heads, causal=True)
    torch.testing.assert_close(out.double(), masked_attention(qkv, heads), atol=1e-5, rtol=1e-5)
    # the first token sees only itself; later tokens do not reach earlier ones
    torch.testing.assert_close(out[:, 0], qkv[:, 0, 2 * D:], atol=1e-6, rtol=1e-6)
    if T > 1:
        changed = qkv.clone()
        changed[:, -1] += 1.0
        torch.testing.assert_close(attention_ref(changed, heads, causal=True)[:, :-1], out[:, :-1])
        assert not torch.allclose(attention_ref(qkv, heads), out)  # the flag does something


@pytest.mark.parametrize("B,T,heads,D", [(2, 13, 4, 64), (1, 77, 2, 32)])
def test_triton_backend_attention_is_causal(B, T, heads, D):
    ops = get_ops("triton")
    qkv = torch.randn(B, T, 3 * D)
    torch.testing.assert_close(ops.attention(qkv, heads, True).double(), masked_attention(qkv, heads),
                               atol=1e-5, rtol=1e-5)


@needs_cpu_kernels
@pytest.mark.parametrize("B,T,heads,D", SHAPES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cpu_attention_causal(B, T, heads, D, dtype):
    from lra_kernels.cpu import ops as co

    qkv = torch.randn(B * T, 3 * D).to(dtype)
    out = co.attention(qkv, B, T, heads, dtype, causal=True)
    exact = masked_attention(qkv.view(B, T, 3 * D), heads).reshape(B * T, D)
    ref = attention_ref(qkv.view(B, T, 3 * D), heads, causal=True).reshape(B * T, D)
    err, ref_err = (out.double() - exact).abs().max(), (ref.double() - exact).abs().max()
    assert err <= 2 * ref_err + 1e-5, (err, ref_err)
    got = co.attention_quant(qkv, B, T, heads, causal=True)
    q, _ = quantize_per_token_ref(attention_ref(qkv.float().view(B, T, 3 * D), heads, True).reshape(B * T, D))
    diff = (got.int8().int() - q.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 2e-3
    if T > 2:  # a row's result does not depend on the tokens after it (or on the sequence length)
        cut = T // 2
        short = qkv.view(B, T, 3 * D)[:, :cut].reshape(B * cut, 3 * D)
        head = co.attention(short, B, cut, heads, dtype, causal=True).view(B, cut, D)
        assert torch.equal(head, out.view(B, T, D)[:, :cut])


def _random_block(D=64, heads=4, hidden=256, causal=True, seed=0) -> QuantBlock:
    g = torch.Generator().manual_seed(seed)

    def lin(n, k):
        return QuantLinear.from_float(torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g) * 0.1,
                                      "per_token")

    ln1, ln2 = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)
    return QuantBlock(ln1, QuantAttention(lin(3 * D, D), lin(D, D), heads, causal=causal), ln2,
                      QuantMLP(lin(hidden, D), lin(D, hidden), "gelu")).eval()


@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cpu", marks=needs_cpu_kernels)])
def test_causal_block_on_each_backend(backend):
    block = _random_block()
    x = torch.randn(3, 13, 64)
    ref = block(x, get_ops("torch"))
    with torch.no_grad():
        out = block(x, get_ops(backend))
    assert cosine(out.flatten(1), ref.flatten(1)).min() > 0.9999
    # causal: the first 7 positions alone give the same rows
    head = block(x[:, :7].contiguous(), get_ops(backend))
    torch.testing.assert_close(head, out[:, :7], atol=1e-4, rtol=1e-4)
    non_causal = _random_block(causal=False)(x, get_ops(backend))
    assert not torch.allclose(non_causal[:, :7], out[:, :7], atol=1e-3)
