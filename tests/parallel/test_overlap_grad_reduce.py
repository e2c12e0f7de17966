"""--overlap-grad-reduce (the production recipe's flag) needs every parameter in the autograd graph of
every step: megatron's DDP starts a bucket's reduce once each of its parameters had its grad hook, and
asserts after the first batch that all of them had one (it has no find_unused_parameters). The DSA
indexer's queries and head weights are read only through the non-differentiable top-k when the
indexer loss is off (--dsa-indexer-loss-coeff 0, the default). One in-process rank is enough: the
hooks and the assertion are per rank. Per-weight gradients with overlap over two ranks:
tests/parallel/test_parallel_equivalence.py, layout dp2-distopt-overlap."""

from __future__ import annotations

from tests.inprocess import one_rank, trainer  # noqa: F401 (fixture)

RUN = ["--preset", "tiny", "--mock-data", "--global-batch-size", "2", "--micro-batch-size", "1",
       "--seq-length", "32", "--seed", "7", "--train-iters", "2",
       "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]


def test_every_parameter_gets_its_grad_hook_without_the_indexer_loss(one_rank):
    with trainer(RUN) as t:
        assert t.recipe.indexer_loss_coeff == 0
        t.train()  # megatron asserts at step 2's zero_grad_buffer if a hook never fired in step 1
        groups = [g for m in t.model for g in m.bucket_groups + m.expert_parallel_bucket_groups]
        assert groups
        for group in groups:
            assert set(group.golden_per_param_grad_ready_counts) == set(group.params)
        indexer = [p for m in t.model for n, p in m.named_parameters() if ".indexer.linear_wq_b." in n]
        assert indexer and all(p.main_grad.abs().max() == 0 for p in indexer)  # in the graph, untrained
