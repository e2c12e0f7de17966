"""Print a GLM-5 model's sizes and training FLOPs as one JSON object.

    python tools/model_info.py --preset glm5 [--seq-length 4096]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.accounting import model_info  # noqa: E402
from model.config import GLM5Config  # noqa: E402
from model.presets import DEFAULT_SEQ_LENGTH, PRESETS, get_preset  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="glm5", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--model-config", default=None, help="an HF config.json instead of a preset")
    p.add_argument("--seq-length", type=int, default=None)
    args = p.parse_args(argv)
    try:
        cfg = GLM5Config.load_hf_json(args.model_config) if args.model_config else get_preset(args.preset)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    seq = args.seq_length or DEFAULT_SEQ_LENGTH.get(args.preset, 4096)
    info = {"preset": None if args.model_config else args.preset, **model_info(cfg, seq)}
    print(json.dumps(info))


if __name__ == "__main__":
    main()
