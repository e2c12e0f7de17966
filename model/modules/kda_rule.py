"""The gated delta rule of Kimi Delta Attention (KDA), in torch: a chunked form for training on any
device and a step-by-step recurrence that defines it (the tests' reference).

Per head, with a state S (key dim x value dim), per-channel log forget gates g_t <= 0 and a write
strength beta_t in (0, 1):

    S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T q_t / sqrt(d_k)

q and k are L2-normalised first (eps inside the square root, as flash-linear-attention's kernels).
The chunked form solves each chunk's writes at once: with G the within-chunk cumulative gate,
u = (I + A)^-1 beta (v - (k * exp G) S_0), A[t, s] = beta_t sum_c k_t,c k_s,c exp(G_t,c - G_s,c) (s < t),
a unit lower-triangular solve; outputs and the next chunk's state follow from u. Differences
G_t - G_s (s <= t) are never positive, so nothing overflows. Everything runs in fp32 (or fp64 when
given fp64), as the state is what rounding hurts.

Shapes: q, k [b, t, h, dk], v [b, t, h, dv], g [b, t, h, dk], beta [b, t, h]; the state [b, h, dk, dv].
"""

from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta, normalize_qk: bool):
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if normalize_qk:
        q, k = l2norm(q), l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def _initial(state, q, v):
    b, _, h, dk = q.shape
    return q.new_zeros(b, h, dk, v.shape[-1]) if state is None else state.to(q.dtype)


def recurrent_kda(q, k, v, g, beta, initial_state=None, normalize_qk: bool = True):
    """The recurrence token by token: (output [b, t, h, dv] in q's dtype, final state)."""
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, normalize_qk)
    state = _initial(initial_state, q, v)
    outs = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None]
        written = torch.einsum("bhk,bhkv->bhv", k[:, t], state)
        delta = (v[:, t] - written) * beta[:, t, :, None]
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outs, 1).to(out_dtype), state


def chunk_kda(q, k, v, g, beta, initial_state=None, normalize_qk: bool = True, chunk_size: int = 64):
    """The same outputs and final state, a chunk of `chunk_size` tokens at a time."""
    out_dtype = q.dtype
    q, k, v, g, beta = (x.transpose(1, 2) for x in _prepare(q, k, v, g, beta, normalize_qk))  # [b, h, t, ...]
    state = _initial(initial_state, q.transpose(1, 2), v.transpose(1, 2))
    outs = []
    for start in range(0, q.shape[2], chunk_size):
        sl = slice(start, start + chunk_size)
        qc, kc, vc, bc = q[:, :, sl], k[:, :, sl], v[:, :, sl], beta[:, :, sl]
        G = g[:, :, sl].cumsum(2)
        n = G.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool, device=G.device).tril()
        # decay from s to t per channel, exp(G_t - G_s) for s <= t, 0 above the diagonal
        diff = (G[:, :, :, None, :] - G[:, :, None, :, :]).masked_fill(~causal[..., None], float("-inf"))
        decay = diff.exp()
        kk = torch.einsum("bhtc,bhsc,bhtsc->bhts", kc, kc, decay).tril(-1) * bc[..., None]
        eye = torch.eye(n, dtype=kk.dtype, device=kk.device)
        rhs = bc[..., None] * (vc - (kc * G.exp()) @ state)
        u = torch.linalg.solve_triangular(eye + kk, rhs, upper=False, unitriangular=True)
        qk = torch.einsum("bhtc,bhsc,bhtsc->bhts", qc, kc, decay)
        outs.append((qc * G.exp()) @ state + qk @ u)
        last = G[:, :, -1:]
        state = last.transpose(-1, -2).exp() * state + (kc * (last - G).exp()).transpose(-1, -2) @ u
    return torch.cat(outs, 2).transpose(1, 2).to(out_dtype), state
