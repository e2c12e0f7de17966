"""Recipe files: launch/pretrain.py flags in a file (the SLURM config format, launch/recipes/*.args) with a
`# world-size: N` line naming the number of processes they are meant for. Read by tools/model_info.py and
tools/simulate_layout.py (`--recipe FILE`)."""

from __future__ import annotations

from pathlib import Path


class RecipeError(ValueError):
    """A recipe file that cannot be read or names no world size; the message names `--recipe PATH`."""


def read_recipe(path: str) -> tuple[list[str], int]:
    """(flags, world size) of a recipe file. `#` starts a comment anywhere on a line."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise RecipeError(f"--recipe {path}: {e.strerror}") from None
    world = [ln.split(":", 1)[1] for ln in lines if ln.strip().startswith("# world-size:")]
    if not world:
        raise RecipeError(f"--recipe {path}: no '# world-size: N' line")
    flags = [tok for ln in lines for tok in ln.split("#", 1)[0].split()]
    return flags, int(world[0])
