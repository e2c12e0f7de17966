"""Memory and time of the MTP loss at GLM-5's vocabulary: cross-entropy (with the acceptance log's tap) against
GLM-5.2's end-to-end TV objective (`--mtp-loss-type e2e_tv`, model/modules/mtp_objective.py); `ce-untapped` is
megatron-core's cross-entropy without the acceptance log (what an MTP loss cost before it).

    python tools/bench_mtp_objective.py --seq-length 512 --depths 3 7 --vocab-size 154880

The loss path only, through megatron-core's `process_mtp_loss` as the model calls it (our dispatch in front):
the main and MTP depths' hidden states in, the head (bf16 weights, bf16 logits as under --bf16), the loss
attached with megatron's MTPLossAutoScaler, and its backward. The hidden size is small (--hidden-size, default
64): the head's GEMM is the same for both objectives and the loss's memory is the [s, b, V/TP] tensors'.
One TP rank's share is a vocabulary of V/TP (pass --vocab-size 77440 for GLM-5 at TP 2).

Per case (each in its own process): the bytes autograd keeps for backward (saved-tensor hooks, each storage
once, the head weight excluded), the process's peak resident memory over its level before the loss
(getrusage; glibc maps every tensor this large with mmap, so the peak follows the live tensors), and the
time of the forward and backward. One JSON line per case; both scale with seq x micro-batch / TP.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(loss_type: str, depths: int, seq: int, batch: int, vocab: int, hidden_size: int, rows: int) -> dict:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, process_mtp_loss

    from model.modules import mtp_objective
    from tests.helpers import one_rank_gloo_world

    mtp_objective.ROWS = rows

    def compute_language_model_loss(labels, logits):  # LanguageModule's, without its model object
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t().contiguous()

    class Head:
        def __init__(self, weight):
            self.weight, self.gather_output = weight, False

        def __call__(self, hidden, weight=None, runtime_gather_output=None):
            return hidden @ (self.weight if weight is None else weight).t(), None

    with one_rank_gloo_world():
        parallel_state.initialize_model_parallel()
        try:
            g = torch.Generator().manual_seed(0)
            hidden = torch.randn((1 + depths) * seq, batch, hidden_size, generator=g).bfloat16().requires_grad_()
            head = Head(torch.randn(vocab, hidden_size, generator=g).bfloat16().requires_grad_())
            labels = torch.randint(0, vocab, (batch, seq), generator=g)
            # "ce-untapped": megatron-core's cross-entropy alone (no acceptance log: not training), today's cost
            config = SimpleNamespace(mtp_num_layers=depths, mtp_loss_type=loss_type.removesuffix("-untapped"),
                                     mtp_detach_heads=True,
                                     mtp_loss_scaling_factor=0.3, calculate_per_token_loss=True)
            MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
            kept = {}

            def pack(t):
                if t.data_ptr() != head.weight.data_ptr():
                    kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            base = _rss_bytes()
            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = mtp_objective.process_mtp_loss(
                    process_mtp_loss, hidden_states=hidden, labels=labels, loss_mask=None, output_layer=head,
                    output_weight=None, runtime_gather_output=None, is_training=loss_type != "ce-untapped",
                    compute_language_model_loss=compute_language_model_loss, config=config)
            forward = time.perf_counter() - start
            (out.float() * 0).sum().backward()
            total = time.perf_counter() - start
            mtp_objective.clear_tracker()
        finally:
            parallel_state.destroy_model_parallel()
    return {"loss_type": loss_type, "depths": depths, "seq_length": seq, "micro_batch_size": batch,
            "vocab_per_rank": vocab, "rows_per_block": rows, "saved_for_backward_gib": sum(kept.values()) / 2**30,
            "peak_rss_growth_gib": (_rss_bytes() - base) / 2**30, "forward_s": forward,
            "forward_backward_s": total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=154880, help="the vocabulary one TP rank holds")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--rows", type=int, default=None,
                   help="rows per fp32 block (model/modules/mtp_objective.py ROWS); default: the same share of the "
                        "sequence as ROWS of 4096, the length the figures are for")
    p.add_argument("--depths", type=int, nargs="+", default=[3, 7])
    p.add_argument("--loss-types", nargs="+", default=["ce-untapped", "ce", "e2e_tv"],
                   choices=["ce-untapped", "ce", "e2e_tv"])
    p.add_argument("--case", nargs=2, metavar=("LOSS_TYPE", "DEPTHS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        torch.set_num_threads(1)
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.seq_length, args.micro_batch_size,
                                  args.vocab_size, args.hidden_size, args.rows)))
        return 0
    from model.modules.mtp_objective import ROWS

    rows = args.rows or max(1, ROWS * args.seq_length // 4096)
    for depths in args.depths:
        for loss_type in args.loss_types:
            # a fresh process per case: its peak resident memory is this case's alone
            proc = subprocess.run([sys.executable, __file__, "--case", loss_type, str(depths),
                                   "--seq-length", str(args.seq_length), "--micro-batch-size",
                                   str(args.micro_batch_size), "--vocab-size", str(args.vocab_size),
                                   "--hidden-size", str(args.hidden_size), "--rows", str(rows)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            print(proc.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
