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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or 0)
    print(f"{type(model).__name__} loaded from {args.model}")
    print(repr(tokenizer.decode(out[0])))


if __name__ == "__main__":
    main()
