"""The forward_step / loss_func contract of megatron-core's pipeline schedules.

Losses are summed per micro-batch and returned with their token count
(`calculate_per_token_loss`), so the schedule and finalize_model_grads normalize by the global
token count: the loss and gradients are the same whatever the DP / micro-batch split.
"""

from __future__ import annotations

from functools import partial

import torch


def split_microbatches(tokens: torch.Tensor, micro_batch_size: int) -> list[dict]:
    """[n, seq+1] tokens of this DP rank -> model inputs per micro-batch."""
    out = []
    for mb in tokens.split(micro_batch_size):
        seq = mb.shape[1] - 1
        out.append({
            "input_ids": mb[:, :-1].contiguous(),
            "labels": mb[:, 1:].contiguous(),
            "loss_mask": torch.ones(mb.shape[0], seq, dtype=torch.float32),
            "position_ids": torch.arange(seq).expand(mb.shape[0], seq).contiguous(),
        })
    return out


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.detach().float()])
    return loss, num_tokens, {"lm loss": report}


def make_forward_step(device: torch.device):
    def forward_step(data_iterator, model):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        output = model(batch["input_ids"], batch["position_ids"], attention_mask=None,
                       labels=batch["labels"], loss_mask=batch["loss_mask"])
        return output, partial(loss_func, batch["loss_mask"])

    return forward_step
