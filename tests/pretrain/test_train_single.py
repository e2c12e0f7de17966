"""The first training run: one real torchrun process on CPU, TensorBoard read back
(the session's reference run of tests/conftest.py, TINY_RUN)."""

import pytest

pytestmark = pytest.mark.integration  # every test here runs torchrun or trains end to end

ITERS = 8


@pytest.fixture(scope="module")
def run(tiny_reference_run):
    return tiny_reference_run


def test_every_iteration_is_logged_to_tensorboard(run):
    _, scalars = run
    for tag in ("lm loss", "mtp loss", "learning-rate", "grad-norm", "throughput/tokens-per-sec",
                "throughput/tflops-per-gpu", "moe/load-imbalance", "moe/load-imbalance/layer-01"):
        assert tag in scalars, f"missing TensorBoard tag {tag!r}; have {sorted(scalars)}"
        assert sorted(scalars[tag]) == list(range(1, ITERS + 1)), tag


def test_loss_falls(run):
    _, s = run
    lm, mtp = s["lm loss"], s["mtp loss"]
    assert lm[ITERS] < lm[1] - 0.3, (lm[1], lm[ITERS])
    assert mtp[ITERS] < mtp[1] - 0.1, (mtp[1], mtp[ITERS])


def test_learning_rate_follows_warmup_then_decay(run):
    _, s = run
    lr = s["learning-rate"]
    assert lr[1] < lr[2]  # warming up
    assert lr[ITERS] == pytest.approx(3e-4, rel=1e-3)  # decayed to --min-lr


def test_stdout_has_megatron_style_lines(run):
    stdout, _ = run
    lines = [ln for ln in stdout.splitlines() if "iteration" in ln and "lm loss:" in ln]
    assert len(lines) == ITERS and "grad-norm:" in lines[-1]
