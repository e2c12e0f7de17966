"""Which implementation runs each piece (Transformer Engine, apex or torch), read from the classes
and functions megatron-core and we actually picked; logged once at start-up.

megatron-core chooses its fused Adam and multi-tensor grad-norm/clip kernels at import: TE's when
installed, else NVIDIA apex's, else torch. We add apex's fused RMSNorm to the local backend on a
GPU (model/modules/norms.py). apex is never a dependency: it is used when importable.
"""

from __future__ import annotations

import torch

_LIBRARIES = {"transformer_engine": "TE", "apex": "apex", "amp_C": "apex", "deepspeed": "DeepSpeed",
              "torch": "torch", "megatron": "torch"}  # megatron-core's local fallbacks are torch code


def origin(obj) -> str:
    """'TE', 'apex', 'DeepSpeed' or 'torch', and the name: from the first library class in a class's
    MRO, or a function's module."""
    for cls in getattr(obj, "__mro__", [obj]):
        top = (getattr(cls, "__module__", None) or "").split(".")[0]
        if top in _LIBRARIES:
            return f"{_LIBRARIES[top]} {getattr(cls, '__name__', cls)}"
    return f"unknown {obj!r}"


def _libraries(classes) -> str:
    """'TE', 'torch', or 'TE + torch' for a set of module classes (by library, not by class: a model
    has a dozen linear classes)."""
    return " + ".join(sorted({origin(t).split(" ")[0] for t in classes})) or "none"


def core_attention(chunks) -> str:
    """What computes attention: the DSA core attention's own answer about the path it takes on its
    device (blockwise torch, Triton kernels, ...) when it can say, else its class's library."""
    paths = set()
    for chunk in chunks:
        for m in chunk.modules():
            attention = getattr(m, "core_attention", None)
            if attention is None or not isinstance(attention, torch.nn.Module):
                continue
            if hasattr(attention, "resolved_path"):
                param = next(attention.parameters(), None)
                device = param.device if param is not None else torch.device("cpu")
                path = attention.resolved_path(device)
                paths.add(f"DSA {path} ({'Triton' if path == 'triton' else 'torch'})")
            elif hasattr(attention, "indexer"):
                paths.add("torch (DSA)")
            else:
                paths.add(origin(type(attention)))
    return ", ".join(sorted(paths)) or "none"


def megatron_optimizer_report() -> dict[str, str]:
    """megatron-core's optimizer and its grad-norm/clip kernels, as picked at import."""
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core.optimizer import clip_grads

    return {"optimizer": f"megatron-core over {origin(mcore_optimizer.Adam)}",
            "grad-norm+clip": origin(clip_grads.l2_norm_impl)}


def report(chunks, optimizer_items: dict[str, str] | None = None) -> dict[str, str]:
    """Read from the built modules; `optimizer_items`: the engine's own (Engine.report), megatron-core's
    by default."""
    modules = [type(m) for c in chunks for m in c.modules()]
    norms = {t for t in modules if "Norm" in t.__name__}
    linears = {t for t in modules if "Linear" in t.__name__}
    return {
        "linear": _libraries(linears),
        "core attention": core_attention(chunks),
        "norms": ", ".join(sorted({origin(t) for t in norms})) or "none",
        **(optimizer_items or megatron_optimizer_report()),
    }


def format_report(items: dict[str, str]) -> str:
    return "implementations: " + " | ".join(f"{k}: {v}" for k, v in items.items())
