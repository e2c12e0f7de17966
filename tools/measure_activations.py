"""Measure the activations one GLM-5 decoder layer keeps for backward, and hold model/accounting.py to them.

    python tools/measure_activations.py                                  # the docs/MEMORY.md table, seq 4096
    python tools/measure_activations.py --seq-length 8192 --recompute-granularity none full
    python tools/measure_activations.py --seq-length 256 --tensor-model-parallel-size 2 --layers moe

Each case builds one decoder layer through the project's own specs (model/specs.py, the local backend;
a one-layer megatron-core TransformerBlock, so full recompute runs megatron's own checkpointed
forward) at GLM-5's real widths: hidden 6144, the MLA ranks and head dims, the DSA indexer with its
32 heads of 128 and top-k 2048, the dense MLP of 12288 or an MoE block with the real expert width
2048 and the shared expert but only `--num-experts` routed experts; top-8 of 8 routes every token
to 8 experts, so the routed rows are the real top-8's (T x 8 per rank under balanced routing).
bf16 weights and activations, the recipe's indexer loss (coefficient 1, sparse).

It runs one forward of a micro-batch and counts the bytes autograd keeps for backward with torch's
saved-tensor hooks: every storage a saved tensor lives in (a view keeps its whole base), counted
once, parameters excluded, sized after the forward (selective recompute frees some storages after
they were saved), only those still held by the graph. TP 2 runs as rank 0 of a two-rank fake process
group (torch's "fake" backend, what megatron-core's parallel_state accepts without other processes:
collectives return without exchanging data) with sequence parallelism.

For each case it prints the accounting's estimate, the measurement and their ratio, and exits 1 when
a case is more than --tolerance off.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.accounting import layer_activation_bytes  # noqa: E402
from model.presets import get_preset  # noqa: E402

MODULES = {  # --recompute-modules that apply to each layer type (moe_act needs --moe-grouped-gemm: TE)
    "dense": ["core_attn", "mla_up_proj", "layernorm", "mlp"],
    "moe": ["core_attn", "mla_up_proj", "layernorm", "moe", "shared_experts"],
}
GRANULARITIES = ("none", "selective", "full")


def glm5_layer_config(moe: bool, num_experts: int):
    """GLM-5 at its real widths, one layer: dense, or MoE with `num_experts` routed experts of top-8."""
    c = get_preset("glm5")
    return c.replace(num_hidden_layers=1, first_k_dense_replace=0 if moe else 1, n_routed_experts=num_experts,
                     num_nextn_predict_layers=0)


def part_of(module_name: str) -> str:
    """The accounting's part (model/accounting.py layer_activation_bytes) of a module of the layer."""
    name = module_name.removeprefix("layers.0.").removeprefix("layers.0")
    for prefix, part in (("self_attention.core_attention", "core_attention"), ("self_attention", "attention"),
                         ("input_layernorm", "input_layernorm"), ("pre_mlp_layernorm", "pre_mlp_layernorm"),
                         ("mlp.shared_experts", "shared_experts"), ("mlp.router", "router"),
                         ("mlp.experts", "experts")):
        if name.startswith(prefix):
            return part
    return "mlp" if name.startswith("mlp") else "layer"  # "layer": the block's checkpoint (full recompute)


class SavedTensorCounter:
    """Records what autograd saves during a forward; `bytes()` afterwards: the storages still held."""

    class _Held:  # what the graph keeps in place of a saved tensor; dies when the graph drops it
        __slots__ = ("t", "__weakref__")

        def __init__(self, t):
            # detached (same storage): holding a saved *output* with its grad_fn would close a cycle
            # through autograd's C++ graph that Python's gc cannot see, leaking every layer measured
            self.t = t.detach()

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.held: list[tuple[weakref.ref, str]] = []
        self.stack: list[str] = []
        self.hooks = []
        for name, m in model.named_modules():
            self.hooks.append(m.register_forward_pre_hook(lambda mod, args, n=name: self.stack.append(n)))
            self.hooks.append(m.register_forward_hook(lambda mod, args, out: self._pop()))

    def _pop(self):
        self.stack.pop()  # returns None: a forward hook's return value would replace the output

    def _pack(self, t):
        held = self._Held(t)
        self.held.append((weakref.ref(held), self.stack[-1] if self.stack else ""))
        return held

    def hooks_context(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.t)

    def storages(self) -> list[tuple[str, str, int]]:
        """(module, tensor, bytes) of each live storage once (its first saver's), parameters excluded."""
        seen, out = set(), []
        for ref, module in self.held:
            held = ref()
            if held is None or not isinstance(held.t, torch.Tensor):
                continue
            storage = held.t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in seen or ptr in self.params or storage.nbytes() == 0:
                continue
            seen.add(ptr)
            out.append((module, f"{tuple(held.t.shape)} {str(held.t.dtype).removeprefix('torch.')}", storage.nbytes()))
        return out

    def bytes(self) -> dict[str, int]:
        parts = {}
        for module, _, n in self.storages():
            parts[part_of(module)] = parts.get(part_of(module), 0) + n
        return parts

    def remove(self):
        for h in self.hooks:
            h.remove()


def layer_dims(tp: int):
    """The measured layout: `tp` ranks of tensor (and sequence) parallelism, experts whole on each."""
    from parallel.dims import ParallelDims

    return ParallelDims(world_size=tp, tp=tp, etp=1, sequence_parallel=tp > 1)


def build_layer(cfg, tp: int, granularity: str, modules: list[str] | None, device: torch.device):
    """One decoder layer in a one-layer TransformerBlock, as rank 0 of a `tp`-rank (fake) world."""
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    from model.mcore_config import ModelOptions, to_transformer_config
    from model.modules.topk_share import IndexShareState
    from model.specs import get_backend, layer_spec

    options = ModelOptions(params_dtype=torch.bfloat16,
                           bf16=True, recompute_granularity=None if granularity == "none" else granularity,
                           recompute_modules=modules, dsa_indexer_loss_coeff=1.0, dsa_indexer_use_sparse_loss=True)
    tconfig = to_transformer_config(cfg, options, layer_dims(tp))
    tconfig.perform_initialization = False  # megatron's CPU init builds fp32 masters: seconds per layer
    spec = layer_spec(get_backend(False), tconfig, moe=cfg.first_k_dense_replace == 0, grouped_gemm=False,
                      index_share_state=IndexShareState.for_config(tconfig))
    block = TransformerBlock(tconfig, TransformerBlockSubmodules(layer_specs=[spec], layer_norm=None),
                             post_layer_norm=False)
    block = block.to(device).train()
    with torch.no_grad():  # values only steer routing and top-k, whose sizes are fixed (top-k of 8, k keys)
        for name, p in block.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
    return block


def measure(block, tokens: int, micro_batch_size: int, tp: int, device, details: bool = False) -> dict:
    """Saved bytes per part of one forward of a micro-batch (this rank's sequence shard under SP)."""
    hidden = block.config.hidden_size
    x = torch.randn(tokens // micro_batch_size // tp, micro_batch_size, hidden, dtype=torch.bfloat16,
                    device=device, requires_grad=True)
    counter = SavedTensorCounter(block)
    y = None  # the output keeps the graph (and so the saved tensors) alive until counted
    try:
        with counter.hooks_context():
            y = block(x, attention_mask=None)
        parts = counter.bytes()
        if details:
            for module, tensor, n in counter.storages():
                print(f"    {module:60} {tensor:32} {n / tokens:10.1f} B/token", flush=True)
    finally:
        counter.remove()
    del y
    return parts


def norm_kind(device) -> str:
    """torch's RMSNorm: composite on the CPU (keeps fp32 copies), one fused kernel on CUDA."""
    return "fused" if device.type == "cuda" else "composite"


def block_dsa_path(device) -> str:
    from model.kernels import triton_usable

    return "triton" if triton_usable(device) else "blockwise"


def cuda_growth_per_layer(block, tokens: int, micro_batch_size: int, tp: int, device, applications: int = 3) -> int:
    """What one more application of the layer adds to torch.cuda.max_memory_allocated: each forward's
    peak sits on top of everything the earlier ones keep, so successive peaks differ by exactly one
    layer's kept bytes (its input included when it keeps it), whatever the forward's transient peak."""
    hidden = block.config.hidden_size
    y = torch.randn(tokens // micro_batch_size // tp, micro_batch_size, hidden, dtype=torch.bfloat16,
                    device=device, requires_grad=True)
    peaks = []
    for _ in range(applications):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        y = block(y, attention_mask=None)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device))
    del y
    return peaks[-1] - peaks[-2]


def cases(layers, tps, granularities, modules):
    for layer in layers:
        for tp in tps:
            for g in granularities:
                if g == "selective":
                    for m in (mod for mod in modules if mod in MODULES[layer]):
                        yield layer, tp, g, [m]
                else:
                    yield layer, tp, g, None


def run_case(layer: str, tp: int, granularity: str, modules, args, device) -> dict:
    from parallel import runtime as rt
    from tools.simulate_layout import fake_world

    cfg = glm5_layer_config(layer == "moe", args.num_experts)
    tokens = args.seq_length * args.micro_batch_size
    start = time.time()
    torch.manual_seed(0)
    with fake_world(0, tp):
        rt.init_model_parallel(layer_dims(tp), 1, 1234, gloo_groups=False)
        block = build_layer(cfg, tp, granularity, modules, device)
        parts = measure(block, tokens, args.micro_batch_size, tp, device, args.details)
        del block
    est = layer_activation_bytes(cfg, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, tp=tp,
                                 moe=layer == "moe", recompute_granularity=None if granularity == "none" else granularity,
                                 recompute_modules=modules, etp=1, norm=norm_kind(device),
                                 dsa_path=block_dsa_path(device))
    measured, estimated = sum(parts.values()), sum(est.values())
    return {"layer": layer, "tp": tp, "recompute": granularity + (f":{modules[0]}" if modules else ""),
            "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
            "estimated_bytes": estimated, "measured_bytes": measured, "ratio": estimated / measured,
            "measured_parts": parts, "estimated_parts": est, "seconds": round(time.time() - start, 1)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--recompute-granularity", nargs="+", choices=GRANULARITIES, default=list(GRANULARITIES),
                   help="one or more of none, selective, full (default all)")
    p.add_argument("--recompute-modules", nargs="+", default=None,
                   help="with selective: the modules to measure one at a time (default every one that applies)")
    p.add_argument("--tensor-model-parallel-size", type=int, nargs="+", default=[1, 2],
                   help="TP sizes (sequence parallel above 1); default 1 2")
    p.add_argument("--layers", nargs="+", choices=["dense", "moe"], default=["dense", "moe"])
    p.add_argument("--num-experts", type=int, default=8,
                   help="routed experts built (>= GLM-5's top-8, so routed rows are the real top-8's)")
    p.add_argument("--tolerance", type=float, default=0.10, help="largest |estimate / measured - 1| allowed")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (tests/model/test_activations.py)")
    p.add_argument("--details", action="store_true", help="list every saved storage (module, shape, bytes/token)")
    p.add_argument("--json", default=None, help="also write every case (with its per-part bytes) to this file")
    args = p.parse_args(argv)
    top_k = get_preset("glm5").num_experts_per_tok
    allowed = sorted(set(MODULES["dense"]) | set(MODULES["moe"]))
    bad = sorted(set(args.recompute_modules or []) - set(allowed))
    if bad:
        p.error(f"--recompute-modules {' '.join(bad)}: choose from {', '.join(allowed)} "
                "(moe_act needs --moe-grouped-gemm, which the local backend cannot build)")
    if args.recompute_modules and "selective" not in args.recompute_granularity:
        p.error("--recompute-modules needs --recompute-granularity selective")
    args.recompute_modules = args.recompute_modules or allowed
    if any(tp not in (1, 2, 4, 8) for tp in args.tensor_model_parallel_size):
        p.error(f"--tensor-model-parallel-size {args.tensor_model_parallel_size}: each must be 1, 2, 4 or 8")
    for tp in args.tensor_model_parallel_size:
        # sequence parallel splits the tokens over TP; DSA's positions split the sequence in two halves
        if args.seq_length <= 0 or args.seq_length % (2 * tp):
            p.error(f"--seq-length {args.seq_length} must be a positive multiple of 2 x "
                    f"--tensor-model-parallel-size {tp} = {2 * tp}")
    if args.micro_batch_size < 1:
        p.error(f"--micro-batch-size {args.micro_batch_size} must be >= 1")
    if args.num_experts < top_k:
        p.error(f"--num-experts {args.num_experts} must be >= GLM-5's top-{top_k}")
    if not 0 < args.tolerance < 1:
        p.error(f"--tolerance {args.tolerance} must be between 0 and 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        from parallel.compat import megatron_cpu

        megatron_cpu.activate()
    rows, off = [], []
    print(f"{'layer':5} {'tp':>2} {'recompute':26} {'estimated MiB':>14} {'measured MiB':>13} {'ratio':>6} "
          f"{'s':>6}", flush=True)
    for layer, tp, g, modules in cases(args.layers, args.tensor_model_parallel_size, args.recompute_granularity,
                                       args.recompute_modules):
        row = run_case(layer, tp, g, modules, args, device)
        rows.append(row)
        bad = abs(row["ratio"] - 1) > args.tolerance
        off += [row] if bad else []
        print(f"{layer:5} {tp:>2} {row['recompute']:26} {row['estimated_bytes'] / 2**20:14.1f} "
              f"{row['measured_bytes'] / 2**20:13.1f} {row['ratio']:6.3f} {row['seconds']:6.1f}"
              + ("  OFF" if bad else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    for row in off:
        print(f"{row['layer']} TP {row['tp']} {row['recompute']}: estimate {row['estimated_bytes']} B is "
              f"{row['ratio']:.3f}x the measured {row['measured_bytes']} B (over --tolerance {args.tolerance}); "
              f"measured per part {row['measured_parts']}, estimated {row['estimated_parts']}", file=sys.stderr)
    return 1 if off else 0


if __name__ == "__main__":
    sys.exit(main())
