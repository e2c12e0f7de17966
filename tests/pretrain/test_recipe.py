"""The GLM-5 recipe: token schedules, expert-bias balancing, DSA warm-up stage (the batch ramp and the
MTP weight schedule by tokens: tests/pretrain/test_train_from_shards.py)."""

import pytest
import torch

from pretrain.recipe import TokenSchedule, parse_tokens
from tests.fixtures_dist import single_process_group  # noqa: F401 (fixture)
from tests.helpers import read_scalars, torchrun

TINY = ["--preset", "tiny", "--mock-data", "--global-batch-size", "8", "--lr", "3e-3"]


def test_token_schedules_parse():
    assert parse_tokens("469B") == 469 * 10**9 and parse_tokens("10T") == 10**13 and parse_tokens("512") == 512
    s = TokenSchedule.parse("0.3,10T:0.1")
    assert s(0) == 0.3 and s(10**13 - 1) == 0.3 and s(10**13) == 0.1
    with pytest.raises(ValueError, match="--mtp-loss-scaling-factor"):
        TokenSchedule.parse("0.3,oops", "--mtp-loss-scaling-factor")


@pytest.mark.integration
def test_expert_bias_and_sequence_aux_loss_lower_load_imbalance():
    from tests.inprocess import train_here

    def imbalance(rate, aux="0"):  # in this process: three runs without three launches
        s = train_here([*TINY, "--train-iters", "16", "--moe-router-bias-update-rate", rate, "--lr", "1e-4",
                        "--min-lr", "1e-5", "--moe-aux-loss-coeff", aux])
        return sum(s["moe/load-imbalance"][i] for i in range(9, 17)) / 8, s

    balanced, s = imbalance("1e-3")  # DeepSeek-V3's gamma; much larger rates overshoot at this size
    unbalanced, s0 = imbalance("0")
    assert balanced < unbalanced, (balanced, unbalanced)
    assert s["moe/expert-bias-max"][16] > 0 and s0["moe/expert-bias-max"][16] == 0
    # The sequence-wise balance loss alone (no bias updates), logged without its coefficient (1 when
    # balanced). alpha = 1e-4 is the recipe's at full size; on tiny's 16 steps at lr 1e-4 it takes
    # alpha = 1 to move the routers measurably (measured: 1.176 vs 1.196 without).
    aux_balanced, s_aux = imbalance("0", aux="1")
    assert aux_balanced < unbalanced - 0.01, (aux_balanced, unbalanced)
    assert 0.9 < s_aux["moe/seq_load_balancing_loss"][16] < 1.5 and "moe/seq_load_balancing_loss" not in s0
    assert set(s0["moe/dropped-tokens-fraction"].values()) == {0.0}  # dropless by default


def test_indexer_loss_keeps_the_recipes_scale():  # in its own world: before single_process_group's is up
    """0.19.2's schedule sets DSAIndexerLossAutoScaler's scale on every micro-batch (to grad_scale_func(1))
    unless `experimental_attention_variant_loss_scale_func` says who does: the recipe's token weight stands."""
    from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossAutoScaler

    from tests.inprocess import train_here

    train_here(["--preset", "tiny", "--mock-data", "--global-batch-size", "2", "--micro-batch-size", "1",
                "--seq-length", "64", "--lr", "3e-3", "--train-iters", "1", "--dsa-indexer-loss-coeff", "1.0"])
    assert float(DSAIndexerLossAutoScaler.main_loss_backward_scale) == 64.0  # tokens per micro-batch


@pytest.mark.integration
def test_capacity_factor_drops_are_counted_over_expert_parallel_ranks(tmp_path):
    # Capacity 0.5 x the balanced load per expert keeps at most half of the assignments.
    torchrun(2, [*TINY, "--train-iters", "2", "--expert-model-parallel-size", "2",
                 "--moe-expert-capacity-factor", "0.5", "--tensorboard-dir", str(tmp_path)])
    dropped = read_scalars(tmp_path)["moe/dropped-tokens-fraction"]
    assert all(0.45 < v < 0.6 for v in dropped.values()), dropped


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory):
    """The initial model (the same for every layout and engine: model/initialization.py), saved by the
    trainer before its first step (--train-iters 0 is refused: a run that trains nothing is a mistake)."""
    from megatron.core.dist_checkpointing import load_plain_tensors

    from tests.helpers import one_rank_gloo_world
    from tests.inprocess import trainer

    init = tmp_path_factory.mktemp("init")
    with one_rank_gloo_world():
        with trainer([*TINY, "--train-iters", "1", "--save", str(init)]) as t:
            t.save()
            t.checkpointer.finish(blocking=True)
        return load_plain_tensors(str(init / "iter_0000000"))


@pytest.mark.parametrize("nproc, engine", [(1, []), (2, ["--dp-engine", "deepspeed", "--zero-stage", "2"])],
                         ids=["megatron", "deepspeed-zero2"])
@pytest.mark.integration
def test_dsa_warmup_trains_only_the_indexer(tmp_path, initial_weights, single_process_group, nproc, engine):
    from megatron.core.dist_checkpointing import load_plain_tensors

    torchrun(nproc, [*TINY, "--train-iters", "2", "--dsa-warmup-iters", "2", "--dsa-indexer-loss-coeff", "1",
                     *engine, "--save", str(tmp_path / "warm"), "--tensorboard-dir", str(tmp_path / "tb")])
    before, after = initial_weights, load_plain_tensors(str(tmp_path / "warm" / "iter_0000002"))
    model_keys = [k for k in before if k.startswith("model.") or not k.startswith("optimizer")]
    changed = {k for k in model_keys if not torch.equal(before[k], after[k])}
    indexer = {k for k in model_keys if ".indexer." in k}
    assert changed and changed <= indexer, sorted(changed - indexer)[:5]
    s = read_scalars(tmp_path / "tb")
    assert s["dsa/stage"] == {1: 0.0, 2: 0.0} and s["dsa/indexer-loss"][1] > 0


@pytest.mark.parametrize("style", ["WSD", "cosine"])
def test_lr_schedules_warmup_then_decay_by_style(style):
    """Steps count samples (Megatron's convention): warm-up 10 iterations, decay over 100 of 4 samples.
    WSD holds the peak until the last 20% of the decay iterations, then decays linearly to --min-lr."""
    from model.presets import get_preset
    from parallel.dims import ParallelDims
    from pretrain.config.train_config import TrainConfig
    from pretrain.engine.optimizer import build_scheduler

    cfg = TrainConfig(model=get_preset("tiny"), model_options=None, dims=ParallelDims(world_size=1),
                      global_batch_size=4, train_iters=100, lr=1e-3, min_lr=1e-4, lr_warmup_iters=10,
                      lr_decay_style=style)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for i in range(1, 101):
        sched.step(increment=cfg.global_batch_size)
        lrs.append(opt.param_groups[0]["lr"])
        if i == 85:
            saved = sched.state_dict()
    lr = dict(enumerate(lrs, start=1))  # after iteration i
    assert lr[5] == pytest.approx(5e-4) and lr[10] == pytest.approx(1e-3)
    assert lr[100] == pytest.approx(1e-4)
    if style == "WSD":
        assert all(lr[i] == pytest.approx(1e-3) for i in range(10, 81))  # stable
        assert lr[90] == pytest.approx(1e-3 - (1e-3 - 1e-4) * 10 / 20)  # linear in the last 20
    else:
        assert lr[55] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # cosine mid-point
    # resumable: a scheduler restored from iteration 85's state continues identically
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    restored = build_scheduler(opt2, cfg)
    restored.load_state_dict(saved)
    for i in range(86, 101):
        restored.step(increment=cfg.global_batch_size)
        assert opt2.param_groups[0]["lr"] == lr[i]


# --- GLM-5's stages as recipe files (launch/recipes/glm5-stage*.args, docs/STAGES.md) ---------------
STAGE_RECIPES = ["launch/recipes/glm5-stage1-pretrain-4k.args", "launch/recipes/glm5-stage2-midtrain-32k.args",
                 "launch/recipes/glm5-stage3-128k.args"]


def test_stage_recipes_fit_an_h100_and_chain():
    """Each stage's memory plan (tools/model_info.py) fits an H100's 80 GB; each stage loads the previous
    one's checkpoint with a fresh optimizer, iterations count on, DSA's warm-up ends inside stage 2,
    and the long-context stages train on packed documents with per-document attention and positions."""
    from pretrain.config.arguments import build_parser
    from tools.lib.recipe_file import read_recipe
    from tools.model_info import recipe_info

    parser, previous = build_parser(), None
    for path, seq in zip(STAGE_RECIPES, (4096, 32768, 131072)):
        info = recipe_info(path, None)
        assert info["seq_length"] == seq and 20 < info["memory_gb_total_estimate"] < 80, (path, info)
        flags, world = read_recipe(path)
        args = parser.parse_args(flags)
        assert world == 576 and args.dsa_kernel_backend is None  # ours: per-document DSA (blockwise/triton)
        if previous is None:
            assert args.dsa_indexer_topk >= seq and not args.dsa_indexer_loss_coeff  # dense attention
        else:
            assert args.load == previous.save and args.no_load_optim and not args.finetune, path
            assert args.train_iters > previous.train_iters and args.lr_decay_iters < args.train_iters
            assert args.reset_attention_mask and args.reset_position_ids and args.eod_mask_loss
            assert args.dsa_indexer_topk == 2048 and args.dsa_indexer_loss_coeff > 0
            # micro-batches per DP rank: at least one per pipeline stage
            dp = world // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                           * args.context_parallel_size)
            assert args.global_batch_size // dp >= args.pipeline_model_parallel_size
        if args.dsa_warmup_iters:
            assert previous.train_iters < args.dsa_warmup_iters < args.train_iters  # absolute iterations
        previous = args
