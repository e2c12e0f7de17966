"""Load an exported checkpoint with transformers and generate: the proof that the export is usable.

    python tools/generate_hf.py --model runs/demo/hf --prompt "def main(" --max-new-tokens 20
"""

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a directory written by tools/export_hf.py")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=20)
    args = p.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report: judged below, the MTP layer said in one line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    report_loading(model.config, info)
    model.eval()
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or 0)
    print(f"{type(model).__name__} loaded from {args.model}")
    print(repr(tokenizer.decode(out[0])))


def report_loading(config, info: dict) -> None:
    """transformers builds no MTP layer (it ignores the released GLM-5's at depth 78 only): say so in one
    line; any other unused or missing weight is a real problem and is listed."""
    first, count = config.num_hidden_layers, getattr(config, "num_nextn_predict_layers", 0)
    mtp = tuple(f"model.layers.{first + i}." for i in range(count))
    ignored = [k for k in info["unexpected_keys"] if k.startswith(mtp)] if mtp else []
    other = sorted(set(info["unexpected_keys"]) - set(ignored))
    if ignored:
        print(f"the MTP layer ({', '.join(m + '*' for m in mtp)}: {len(ignored)} tensors) is kept for training "
              "and ignored by transformers, which does not build it")
    if other or info["missing_keys"] or info["mismatched_keys"]:
        raise SystemExit(f"{len(other)} unexpected weight(s) {other[:5]}, missing {sorted(info['missing_keys'])[:5]}, "
                         f"mismatched {sorted(info['mismatched_keys'])[:5]}: the export does not fit transformers")


if __name__ == "__main__":
    main()
