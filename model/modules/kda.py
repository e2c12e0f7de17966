"""Kimi Delta Attention (KDA): GLM-5.3-Flash's linear-attention mixer, as transformers'
`Glm5NextTextLinearAttention` computes it, in megatron's [sequence, batch, hidden] layout.

    [q | k | v | beta] = in_proj(x);  q, k, v = silu(causal depthwise conv1d([q | k | v]))
    forget gate g = lower_bound * sigmoid(exp(A_log) * (f_up(f_down(x)) + dt_bias))   (per channel, in
                    (lower_bound, 0); without a bound -exp(A_log) * softplus(...));  beta = sigmoid(beta)
    o = gated delta rule (model/modules/kda_rule.py);  out = out_proj(RMSNorm(o) * sigmoid(g_up(g_down(x))))

megatron-core 0.19.2 has no KDA (its GatedDeltaNet is the scalar-gate rule); the names follow that
module's (in_proj, conv1d, dt_bias, A_log, out_norm, out_proj) so a HybridModel layer spec can hold it.
model/flash_hf_mapping.py maps transformers' weights onto these.

The rule runs behind a backend seam: "torch" is the chunked reference (any device; autograd);
"fla" is flash-linear-attention's fused KDA kernel, used when that package is importable and the
input is on a GPU ("auto" picks it then). We do not vendor it: it is an optional install.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from model.modules.documents import document_offsets
from model.modules.kda_rule import chunk_kda

BACKENDS = ("auto", "torch", "fla")


def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def resolve_backend(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kda_backend={name!r}: choose one of {BACKENDS}")
    if name == "fla" and not fla_available():
        raise ValueError("kda_backend='fla' needs the flash-linear-attention package (import fla), "
                         "which is not installed; 'torch' runs the chunked reference")
    if name == "auto":
        return "fla" if device.type == "cuda" and fla_available() else "torch"
    return name


def delta_rule(q, k, v, g, beta, backend: str, chunk_size: int = 64, doc_starts: torch.Tensor | None = None):
    """The KDA rule on [b, t, h, d] inputs (q, k L2-normalised inside), output [b, t, h, dv]; with
    `doc_starts` [b, t] each packed document starts from an empty state."""
    fla = resolve_backend(backend, q.device) == "fla"
    if doc_starts is None and not fla:
        return chunk_kda(q, k, v, g, beta, chunk_size=chunk_size)[0]
    b, t = q.shape[:2]
    flat = [x.flatten(0, 1)[None] for x in (q, k, v, g, beta)]
    offsets = None if doc_starts is None else document_offsets(doc_starts)
    if fla:
        from fla.ops.kda import chunk_kda as fla_chunk_kda

        if offsets is None:
            return fla_chunk_kda(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)[0]
        out, _ = fla_chunk_kda(*flat[:3], g=flat[3], beta=flat[4], use_qk_l2norm_in_kernel=True, cu_seqlens=offsets)
    else:
        bounds = offsets.tolist()
        out = torch.cat([chunk_kda(*(x[:, a:e] for x in flat), chunk_size=chunk_size)[0]
                         for a, e in zip(bounds[:-1], bounds[1:])], dim=1)
    return out[0].unflatten(0, (b, t))


def causal_conv(x: torch.Tensor, weight: torch.Tensor, doc_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal convolution of [b, c, s] by [c, 1, kernel]; with `doc_starts` [b, s] no token
    sees a row before its document's start."""
    kernel, s = weight.shape[-1], x.shape[-1]
    if doc_starts is None:
        return F.conv1d(x, weight, padding=kernel - 1, groups=x.shape[1])[..., :s]
    rows = torch.arange(s, device=x.device)
    out = torch.zeros_like(x)
    for lag in range(kernel):  # tap kernel-1-lag reads row t-lag
        shifted = F.pad(x, (lag, 0))[..., :s] * (rows - lag >= doc_starts)[:, None, :]
        out = out + weight[:, 0, kernel - 1 - lag, None] * shifted
    return out


class GatedRMSNorm(nn.Module):
    """RMSNorm over each head's channels, then times sigmoid(gate); in fp32 (transformers' and fla's)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        y = x.to(dtype) * torch.rsqrt(x.to(dtype).pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(dtype) * y * torch.sigmoid(gate.to(dtype))).to(x.dtype)


class KimiDeltaAttention(nn.Module):
    def __init__(self, cfg, backend: str = "auto", chunk_size: int = 64):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"kda_backend={backend!r}: choose one of {BACKENDS}")
        h, d, hidden = cfg.linear_num_heads, cfg.linear_head_dim, cfg.hidden_size
        self.num_heads, self.head_dim, self.qkv_dim = h, d, h * d
        self.backend, self.chunk_size = backend, chunk_size
        self.lower_bound = cfg.linear_lower_bound
        self.in_proj = nn.Linear(hidden, 3 * self.qkv_dim + h, bias=False)  # [q | k | v | beta]
        conv_dim, kernel = 3 * self.qkv_dim, cfg.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel, groups=conv_dim, padding=kernel - 1, bias=False)
        self.linear_f_down_proj = nn.Linear(hidden, d, bias=False)  # low-rank forget gate
        self.linear_f_up_proj = nn.Linear(d, self.qkv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(self.qkv_dim))
        self.A_log = nn.Parameter(torch.zeros(h))
        self.linear_g_down_proj = nn.Linear(hidden, d, bias=False)  # low-rank output gate
        self.linear_g_up_proj = nn.Linear(d, self.qkv_dim, bias=False)
        self.out_norm = GatedRMSNorm(d, eps=cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.qkv_dim, hidden, bias=False)

    def forget_gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel log decay [b, t, h, d] in fp32: in (lower_bound, 0) with a bound."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        f = self.linear_f_up_proj(self.linear_f_down_proj(x)).to(dtype) + self.dt_bias.to(dtype)
        f = f.unflatten(-1, (self.num_heads, self.head_dim))
        rate = self.A_log.to(dtype).exp()[:, None]
        if self.lower_bound is not None:
            return self.lower_bound * torch.sigmoid(rate * f)
        return -rate * F.softplus(f)

    def forward(self, hidden_states: torch.Tensor, doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        """[s, b, hidden] -> [s, b, hidden]; `doc_starts` [b, s]: the row where each token's packed
        document starts (None: one document per row), so no state or convolution crosses documents."""
        x = hidden_states.transpose(0, 1)  # [b, s, hidden]
        qkv, beta = self.in_proj(x).split([3 * self.qkv_dim, self.num_heads], dim=-1)
        conv = causal_conv(qkv.transpose(1, 2).to(self.conv1d.weight.dtype), self.conv1d.weight, doc_starts)
        q, k, v = F.silu(conv).transpose(1, 2).to(x.dtype).unflatten(-1, (3 * self.num_heads, self.head_dim)).chunk(3, 2)
        core = delta_rule(q, k, v, self.forget_gate(x), torch.sigmoid(beta), self.backend, self.chunk_size,
                          doc_starts)
        gate = self.linear_g_up_proj(self.linear_g_down_proj(x)).unflatten(-1, (self.num_heads, self.head_dim))
        out = self.out_proj(self.out_norm(core, gate).flatten(-2))
        return out.transpose(0, 1)
