"""How far mini-llava's language layers moved from SmolLM2's: per decoder layer, the relative change of its weights,
||W_trained - W_pretrained||_F / ||W_pretrained||_F over the matrices training touched (the merged LoRA factors).

    .venv/bin/python benchmarks/weight_drift.py [--trained src/skipit/demo/mini_llava_trained.safetensors]
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from safetensors.torch import load_file

from skipit.demo.build import TRAINED_FILE, assemble


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trained", default=str(TRAINED_FILE))
    args = ap.parse_args()
    trained = load_file(args.trained)
    model, _ = assemble(trained=None)  # the pretrained language model, untouched
    lm = model.model.language_model
    delta, base = defaultdict(float), defaultdict(float)
    for key in (k for k in trained if k.startswith("lora.") and k.endswith(".A")):
        module = key[len("lora."):-len(".A")]
        layer = int(re.search(r"layers\.(\d+)\.", module).group(1))
        w = lm.get_submodule(module).weight.detach()
        d = trained[key[:-2] + ".B"].float() @ trained[key].float()
        delta[layer] += float(d.pow(2).sum())
        base[layer] += float(w.pow(2).sum())
    ratios = [(delta[j] / base[j]) ** 0.5 for j in sorted(base)]
    print("| layer | relative weight change |\n|---:|---:|")
    for j, r in zip(sorted(base), ratios, strict=True):
        print(f"| {j} | {r:.4f} |")
    t = torch.tensor(ratios)
    lo, hi = int(t.argmin()), int(t.argmax())
    print(f"\nmean {t.mean():.4f}, min {t.min():.4f} (layer {lo}), max {t.max():.4f} (layer {hi})")


if __name__ == "__main__":
    main()
