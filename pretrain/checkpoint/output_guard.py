"""What a tool may replace: never its own input, nor a directory that holds a checkpoint, whatever --force
says (tools/export_hf.py --output, tools/import_hf.py --save). A replaced output is written beside it and
renamed in place at the end (the tools' atomic writes): this module decides whether it may be, and
`replace_output` does the renaming, asking again first.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pretrain.checkpoint.run_state import TRACKER

_ITER = re.compile(r"^iter_\d{7}(\.partial)?$")
_SEARCH_DEPTH = 3  # how far below a replaced directory a checkpoint is looked for (demo.sh: RUN/ckpt/iter_*)


def _within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def checkpoint_below(directory: Path, depth: int = _SEARCH_DEPTH) -> Path | None:
    """A checkpoint root (a tracker file or an iter_NNNNNNN directory) at or below `directory`, or None."""
    base = len(directory.parts)
    for here, dirs, files in os.walk(directory):
        if TRACKER in files or any(_ITER.match(d) for d in dirs):
            return Path(here)
        if len(Path(here).parts) - base >= depth:
            dirs.clear()
    return None


def check_output(flag: str, output: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse (ValueError) an output that is, holds or lies inside one of `inputs` ({flag: path}), or
    that holds a checkpoint. Called before anything is written, and again before replacing."""
    out = Path(output).resolve()
    for name, value in inputs.items():
        if value is None:
            continue
        source = Path(value).resolve()
        if _within(source, out):
            raise ValueError(f"{flag} {output} is or contains {name} {value}: writing it would delete the input; "
                             f"choose another {flag}")
        if _within(out, source):
            raise ValueError(f"{flag} {output} lies inside {name} {value}: choose a directory outside it")
    if out.is_dir():
        found = checkpoint_below(out)
        if found is not None:
            raise ValueError(f"{flag} {output} holds a checkpoint ({found}): it is never replaced, --force or not; "
                             f"choose another {flag}")


def replace_output(flag: str, partial: Path, output: Path, inputs: dict[str, str | Path | None]) -> None:
    """Put the finished `partial` in `output`'s place (whatever was there goes), the guard asked again first:
    nothing that may not be replaced has appeared there meanwhile."""
    check_output(flag, output, inputs)
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    os.replace(partial, output)
