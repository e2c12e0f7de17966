"""Weights & Biases: the scalars TensorBoard gets, from the same (logging) rank, at the same iterations.

An optional extra (`pip install -e .[wandb]`). Offline runs (`WANDB_MODE=offline`, what the tests
use) write `--wandb-save-dir/wandb/offline-run-*/run-*.wandb`; `wandb sync` uploads them later.
"""

from __future__ import annotations

import dataclasses
import json
import os


def require_wandb() -> None:
    """Refuse --wandb-project without the package, naming the extra (argument checking, before any work)."""
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--wandb-project needs Weights & Biases, which is not installed ({e}): "
                         "pip install -e .[wandb]") from None


def run_config(cfg) -> dict:
    """The run's TrainConfig as plain data (what W&B shows as the run's config)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


class WandbSink:
    def __init__(self, cfg):
        import wandb

        obs = cfg.observability
        os.makedirs(obs.wandb_save_dir, exist_ok=True)
        self.run = wandb.init(project=obs.wandb_project, name=obs.wandb_exp_name, entity=obs.wandb_entity,
                              dir=obs.wandb_save_dir, config=run_config(cfg))

    def scalars(self, iteration: int, scalars: dict[str, float]) -> None:
        self.run.log(dict(scalars), step=iteration)

    def flush(self) -> None:
        pass  # W&B streams by itself

    def close(self) -> None:
        self.run.finish()
