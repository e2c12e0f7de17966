"""The GLM-5 recipe: MTP weight schedule, expert-bias balancing, DSA warm-up stage, batch ramp."""

import shutil

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


def test_expert_bias_lowers_load_imbalance(tmp_path):
    def imbalance(rate):
        tb = tmp_path / f"rate{rate}"
        torchrun(1, [*TINY, "--train-iters", "16", "--moe-router-bias-update-rate", rate, "--lr", "1e-4", "--min-lr", "1e-5",
                     "--tensorboard-dir", str(tb)])
        s = read_scalars(tb)
        return sum(s["moe/load-imbalance"][i] for i in range(9, 17)) / 8, s

    balanced, s = imbalance("1e-3")  # DeepSeek-V3's gamma; much larger rates overshoot at this size
    unbalanced, s0 = imbalance("0")
    assert balanced < unbalanced, (balanced, unbalanced)
    assert s["moe/expert-bias-max"][16] > 0 and s0["moe/expert-bias-max"][16] == 0


def test_dsa_warmup_trains_only_the_indexer(tmp_path, single_process_group):
    from megatron.core.dist_checkpointing import load_plain_tensors

    torchrun(1, [*TINY, "--train-iters", "0", "--save", str(tmp_path / "init")])
    torchrun(1, [*TINY, "--train-iters", "2", "--dsa-warmup-iters", "2", "--dsa-indexer-loss-coeff", "1",
                 "--save", str(tmp_path / "warm"), "--tensorboard-dir", str(tmp_path / "tb")])
    before = load_plain_tensors(str(tmp_path / "init" / "iter_0000000"))
    after = load_plain_tensors(str(tmp_path / "warm" / "iter_0000002"))
    model_keys = [k for k in before if k.startswith("model.") or not k.startswith("optimizer")]
    changed = {k for k in model_keys if not torch.equal(before[k], after[k])}
    indexer = {k for k in model_keys if ".indexer." in k}
    assert changed and changed <= indexer, sorted(changed - indexer)[:5]
    s = read_scalars(tmp_path / "tb")
    assert s["dsa/stage"] == {1: 0.0, 2: 0.0} and s["dsa/indexer-loss"][1] > 0


def test_batch_ramp_mtp_schedule_and_resume(tmp_path):
    # Megatron's ramp: +2 sequences every 12 / ((8 - 4) / 2) = 6 consumed samples, up to 8:
    # consumed 0 -> 4, 4 -> 4, 8 -> 6, 14 -> 8. The MTP weight drops after 1000 tokens (64 per sequence):
    # consumed tokens before steps 1..5 are 0, 256, 512, 896, 1408.
    recipe = ["--rampup-batch-size", "4", "2", "12", "--train-iters", "5", "--mtp-loss-scaling-factor", "0.3,1000:0.1"]
    ck = tmp_path / "ck"
    torchrun(1, [*TINY, *recipe, "--save", str(ck), "--save-interval", "2", "--tensorboard-dir", str(tmp_path / "full")])
    full = read_scalars(tmp_path / "full")
    assert [full["batch-size"][i] for i in range(1, 6)] == [4.0, 4.0, 6.0, 8.0, 8.0]
    assert [round(full["mtp-loss-scaling-factor"][i], 6) for i in range(1, 6)] == [0.3, 0.3, 0.3, 0.3, 0.1]

    resume = tmp_path / "resume"  # the checkpoint of iteration 2, as if the run had stopped there
    resume.mkdir()
    shutil.copytree(ck / "iter_0000002", resume / "iter_0000002")
    (resume / "latest_checkpointed_iteration.txt").write_text("2\n")
    torchrun(1, [*TINY, *recipe, "--load", str(resume), "--tensorboard-dir", str(tmp_path / "resumed")])
    resumed = read_scalars(tmp_path / "resumed")
    for it in (3, 4, 5):
        for tag in ("batch-size", "consumed-tokens", "mtp-loss-scaling-factor"):
            assert resumed[tag][it] == full[tag][it], (tag, it)
        assert resumed["lm loss"][it] == pytest.approx(full["lm loss"][it], rel=1e-6)
