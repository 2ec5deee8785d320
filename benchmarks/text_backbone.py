"""Save the language backbone of a LLaVA checkpoint (decoder + LM head) as a plain LlamaForCausalLM, with its
tokenizer, so `skipit analyze` can measure the same layers on text alone.

    .venv/bin/python benchmarks/text_backbone.py [--model ~/.cache/skipit/mini-llava-v3] --out /tmp/smollm2-text
"""

from __future__ import annotations

import argparse

from transformers import LlamaForCausalLM

from skipit import models
from skipit.demo.build import default_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    vlm, processor = models.load(args.model)
    lm = LlamaForCausalLM(vlm.config.text_config)
    lm.model.load_state_dict(vlm.model.language_model.state_dict())
    lm.lm_head.load_state_dict(vlm.lm_head.state_dict())
    lm.generation_config = vlm.generation_config
    lm.eval().save_pretrained(args.out)
    tokenizer = processor.tokenizer
    if not tokenizer.chat_template:
        tokenizer.chat_template = processor.chat_template  # accepts plain string content too
    tokenizer.save_pretrained(args.out)
    print(f"language backbone written to {args.out}")


if __name__ == "__main__":
    main()
