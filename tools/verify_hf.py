"""Check an HF export against the checkpoint it came from: same tokens, same logits.

    python tools/verify_hf.py --load CKPT [--iteration N] --hf EXPORT_DIR [--tokens 48] [--tolerance 1e-4]

What it compares, and how a bf16 or fp8 export is judged: tools/lib/hf_verify.py (docs/EXPORT.md,
"Verification"). Exit status 1 if the logits differ by more than the tolerance or transformers does not
load the export cleanly.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# megatron-core announces at import that Apex/Transformer Engine are absent (expected on CPU).
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

from tools.lib.hf_verify import VerificationError, verify_export  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True)
    p.add_argument("--iteration", type=int, default=None)
    p.add_argument("--hf", required=True, help="the exported directory")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--tolerance", type=float, default=1e-4)
    args = p.parse_args(argv)
    config = json.loads((Path(args.hf) / "config.json").read_text())
    dtype = ("fp8" if "quantization_config" in config
             else "fp32" if config.get("torch_dtype", config.get("dtype")) == "float32" else "bf16")
    try:
        result = verify_export(args.load, args.iteration, args.hf, dtype, args.tokens, args.tolerance)
    except VerificationError as e:
        print(f"verify_hf: FAILED: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
