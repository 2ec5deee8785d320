"""Why mini-llava cannot answer colour questions: small targeted measurements on the shipped model.

Parts (each prints JSON lines; `--parts` picks them, comma-separated):

- `answers`: the shipped model on fresh `shapes` scenes (their own seed, not a split): colour questions on
  one-object scenes and on scenes with 2-4 objects, and every other question type; per group the accuracy of the
  greedy first answer token (every colour word is one token, so this is the greedy answer's first word), the
  cross-entropy of the answer's first token, and for colour the confusion of the predicted colour words. Also a
  linear probe, on held-out scenes, for the asked colour from the LM's hidden state at the last prompt token
  (where the answer is read), per layer.
- `probe`: linear probes (scikit-learn logistic regression, standardised, train/test split by scene) for an
  object's colour (and its shape, row and column) at the patch under the object's centre, read from
  (a) every DINOv2 layer `hidden_states[k]`, k = 0 (patch embeddings) .. 12 (CLS dropped),
  (b) the projector's input (config.vision_feature_layer) and output,
  (c) the LM's hidden state at that vision token after decoder layers 1, 4, 8, 15.
  With each probe: the share of the features' variance that the colour explains (between-class / total).
- `train`: the same training code (`skipit.demo.train.train`) for `--steps` steps with today's
  vision_feature_layer and with `--layers` (e.g. "0,-2"), the same seed and data; each scored on colour
  questions (first-token accuracy and loss). Runs under a temporary $SKIPIT_CACHE; the shipped weights and the
  cached model are not touched.

    nice -n 5 .venv/bin/python benchmarks/colour_diagnosis.py --parts answers,probe  # defaults: the sizes reported
    nice -n 5 .venv/bin/python benchmarks/colour_diagnosis.py --parts train --steps 40 --layers 0,-2 --n-eval 200
    .venv/bin/python benchmarks/colour_diagnosis.py --parts probe --trained FILE  # other weights than the shipped

Results and what they mean: docs/benchmarks.md, "mini-llava colour diagnosis".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from skipit import prompts
from skipit.data.shapes import COLORS, IMAGE_SIZE, ask, render, sample_scene

COLOR_WORDS = list(COLORS)
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 8 x 8 patches


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def scene_with(rng: random.Random, n_objects: int | None):
    """A scene with exactly `n_objects` objects (any number when None)."""
    while True:
        objs = sample_scene(rng)
        if n_objects is None or len(objs) == n_objects:
            return objs


def centre_patch(obj) -> int:
    """Index (row-major over the 8 x 8 grid) of the patch under the object's centre pixel."""
    cell = IMAGE_SIZE / 3
    cx, cy = (obj.col + 0.5) * cell, (obj.row + 0.5) * cell
    return min(int(cy // PATCH), GRID - 1) * GRID + min(int(cx // PATCH), GRID - 1)


def first_token(tokenizer, word: str) -> int:
    return tokenizer(word, add_special_tokens=False)["input_ids"][0]


# ---------------------------------------------------------------- probes


def probe(x: np.ndarray, y: list, groups: list[int], seed: int = 0) -> dict:
    """Held-out accuracy of a standardised multinomial logistic regression; the split is by scene (`groups`), 25 %
    of the scenes held out. Also the share of the variance that the labels explain (between-class / total sums of
    squares over all dimensions)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y)
    scenes = sorted(set(groups))
    held = set(random.Random(seed).sample(scenes, len(scenes) // 4))
    test = np.array([g in held for g in groups])
    scaler = StandardScaler().fit(x[~test])
    clf = LogisticRegression(max_iter=3000, C=1.0).fit(scaler.transform(x[~test]), y[~test])
    acc = float((clf.predict(scaler.transform(x[test])) == y[test]).mean())
    xc = x - x.mean(0)
    between = sum((y == c).sum() * ((x[y == c].mean(0) - x.mean(0)) ** 2).sum() for c in set(y.tolist()))
    return {"acc": round(acc, 3), "n_train": int((~test).sum()), "n_test": int(test.sum()),
            "var_share": round(float(between / (xc ** 2).sum()), 4)}


@torch.inference_mode()
def part_probe(model, processor, n_scenes: int, batch: int, lm_layers: list[int]) -> None:
    rng = random.Random("colour-diagnosis/probe")
    scenes = [scene_with(rng, None) for _ in range(n_scenes)]
    cfg = model.config
    image_id = cfg.image_token_id
    feats: dict[str, list] = defaultdict(list)
    colours, shapes, rows, columns, groups = [], [], [], [], []
    text = prompts.question_text(processor, "What color is the object?")  # vision tokens never see the question
    for i in range(0, n_scenes, batch):
        chunk = scenes[i:i + batch]
        images = [render(s) for s in chunk]
        inputs = prompts.model_inputs(processor, [text] * len(chunk), images)
        vis = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
        pos = [(row == image_id).nonzero().squeeze(-1) for row in inputs["input_ids"]]
        for b, objs in enumerate(chunk):
            for o in objs:
                p = centre_patch(o)
                for k, h in enumerate(vis):
                    feats[f"dinov2.hidden_states[{k}]"].append(h[b, 1 + p].numpy())
                for k in lm_layers:
                    name = "projector output (LM input)" if k == 0 else f"LM after layer {k}"
                    feats[name].append(out.hidden_states[k][b, pos[b][p]].numpy())
                colours.append(o.color)
                shapes.append(o.shape)
                rows.append(o.row)
                columns.append(o.col)
                groups.append(i + b)
        emit(part="probe", progress=f"{min(i + batch, n_scenes)}/{n_scenes} scenes")
    layer = cfg.vision_feature_layer
    layers = layer if isinstance(layer, list) else [layer]
    n_vis = len(model.model.vision_tower.encoder.layer) + 1
    proj_in = np.concatenate([np.stack(feats[f"dinov2.hidden_states[{k % n_vis}]"]) for k in layers], axis=1)
    table = {f"projector input (vision_feature_layer={layer})": proj_in}
    table.update({k: np.stack(v) for k, v in feats.items()})
    for name, x in table.items():
        emit(part="probe", features=name, dim=x.shape[1], colour=probe(x, colours, groups),
             shape=probe(x, shapes, groups), row=probe(x, rows, groups), column=probe(x, columns, groups))


# ---------------------------------------------------------------- answers of the shipped model


def question_set(n_colour: int, n_other: int):
    """(objs, question, answer, type, group) tuples: colour questions on 1-object and on 2-4-object scenes, and
    `n_other` of each other type on scenes of any size."""
    rng = random.Random("colour-diagnosis/answers")
    out = []
    for group, sizes in (("1 object", [1]), ("2-4 objects", [2, 3, 4])):
        k = 0
        while k < n_colour:
            objs = scene_with(rng, rng.choice(sizes))
            qa = ask(objs, "color", rng)
            if qa:
                out.append((objs, *qa, "color", group))
                k += 1
    for t in ("shape", "size", "count", "row", "column", "exists"):
        k = 0
        while k < n_other:
            objs = scene_with(rng, None)
            qa = ask(objs, t, rng)
            if qa:
                out.append((objs, *qa, t, "1 object" if len(objs) == 1 else "2-4 objects"))
                k += 1
    return out


@torch.inference_mode()
def score_questions(model, processor, items, batch: int, lm_layers: list[int] = ()):
    """First-token greedy prediction, cross-entropy of the answer's first token, and the last prompt token's
    hidden states at `lm_layers`, for each item."""
    tok = processor.tokenizer
    rows = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        texts = [prompts.question_text(processor, q) for _, q, *_ in chunk]
        inputs = prompts.model_inputs(processor, texts, [render(objs) for objs, *_ in chunk])
        out = model(**inputs, output_hidden_states=bool(lm_layers), logits_to_keep=1)
        logits = out.logits[:, -1].float()
        targets = torch.tensor([first_token(tok, a) for _, _, a, *_ in chunk])
        ce = F.cross_entropy(logits, targets, reduction="none")
        pred = logits.argmax(-1)
        for b, (_, _, a, t, g) in enumerate(chunk):
            rows.append({"type": t, "group": g, "answer": a, "pred": tok.decode(int(pred[b])).strip(),
                         "right": bool(pred[b] == targets[b]), "ce": float(ce[b]),
                         "hidden": {k: out.hidden_states[k][b, -1].numpy() for k in lm_layers}})
    return rows


def summarise(rows) -> dict:
    n = len(rows)
    return {"n": n, "acc": round(sum(r["right"] for r in rows) / n, 3),
            "first_token_ce": round(float(np.mean([r["ce"] for r in rows])), 3)}


def part_answers(model, processor, n_colour: int, n_other: int, batch: int, lm_layers: list[int]) -> None:
    t0 = time.perf_counter()
    items = question_set(n_colour, n_other)
    rows = score_questions(model, processor, items, batch, lm_layers)
    by = defaultdict(list)
    for r in rows:
        by[(r["type"], r["group"])].append(r)
        by[(r["type"], "all")].append(r)
    for (t, g), rs in sorted(by.items()):
        emit(part="answers", type=t, group=g, **summarise(rs))
    colour = [r for r in rows if r["type"] == "color"]
    for g in ("1 object", "2-4 objects", "all"):
        rs = [r for r in colour if g == "all" or r["group"] == g]
        confusion = {a: dict(Counter(r["pred"] for r in rs if r["answer"] == a)) for a in COLOR_WORDS}
        emit(part="answers", type="color", group=g, predicted=dict(Counter(r["pred"] for r in rs)),
             confusion_answer_to_predicted=confusion)
    # is the asked colour linearly readable where the answer is produced (last prompt token)?
    for k in lm_layers:
        x = np.stack([r["hidden"][k] for r in colour])
        emit(part="answers", probe="asked colour at the last prompt token", layer=k,
             colour=probe(x, [r["answer"] for r in colour], list(range(len(colour)))))
    emit(part="answers", seconds=round(time.perf_counter() - t0, 1))


# ---------------------------------------------------------------- short training runs


def part_train(steps: int, layers: list[int], n_eval: int, batch: int, seed: int) -> None:
    """Train with today's feature layer and with `layers`, same seed, data and steps; score both on colour."""
    with tempfile.TemporaryDirectory(prefix="colour-diag-") as tmp:
        os.environ["SKIPIT_CACHE"] = tmp  # the feature caches go here; the shipped weights are never written
        from safetensors.torch import load_file

        from skipit.demo import build
        from skipit.demo.train import train

        today = build.FEATURE_LAYERS
        rng = random.Random("colour-diagnosis/train-eval")
        items = []
        while len(items) < n_eval:
            objs = scene_with(rng, None)
            if qa := ask(objs, "color", rng):
                items.append((objs, *qa, "color", "1 object" if len(objs) == 1 else "2-4 objects"))
        for name, value in (("today", today), ("candidate", layers)):
            build.FEATURE_LAYERS = value
            try:
                t0 = time.perf_counter()
                losses = []
                out = Path(tmp) / f"{name}.safetensors"

                def log(step: int, total: int, loss: float, name=name, t0=t0, losses=losses) -> None:
                    losses.append(loss)
                    if (step + 1) % 10 == 0:
                        emit(part="train", arm=name, step=step + 1, loss=round(float(np.mean(losses[-10:])), 3),
                             seconds=round(time.perf_counter() - t0))

                train(out, steps=steps, n_train=steps * 8, seed=seed, checkpoint_every=0, log=log)
                seconds = time.perf_counter() - t0
                model, processor = build.assemble(load_file(str(out)))
            finally:
                build.FEATURE_LAYERS = today
            rows = score_questions(model, processor, items, batch)
            groups = {g: summarise([r for r in rows if r["group"] == g]) for g in ("1 object", "2-4 objects")}
            emit(part="train", arm=name, vision_feature_layer=value, steps=steps, seconds=round(seconds),
                 train_loss_first10=round(float(np.mean(losses[:10])), 3),
                 train_loss_last10=round(float(np.mean(losses[-10:])), 3),
                 colour=summarise(rows), **groups, predicted=dict(Counter(r["pred"] for r in rows)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="answers,probe")
    ap.add_argument("--n-colour", type=int, default=120, help="colour questions per group (1 / 2-4 objects)")
    ap.add_argument("--n-other", type=int, default=25, help="questions of each other type")
    ap.add_argument("--n-scenes", type=int, default=400, help="scenes for the probes")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40, help="training steps per arm (part train)")
    ap.add_argument("--layers", default="0,-2", help="vision_feature_layer of the candidate arm (part train)")
    ap.add_argument("--n-eval", type=int, default=200, help="colour questions scoring each arm (part train)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trained", default=None, help="trained weights to diagnose instead of the shipped ones "
                    "(parts answers, probe)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    parts = set(args.parts.split(","))
    if parts & {"answers", "probe"}:
        from skipit import models
        from skipit.demo.build import build, default_model_path

        path = default_model_path()  # the cached model, never rebuilt
        if args.trained:
            path = build(Path(tempfile.mkdtemp(prefix="diagnosis-")) / "model", args.trained)
        model, processor = models.load(path, device="cpu")
        if "answers" in parts:
            part_answers(model, processor, args.n_colour, args.n_other, args.batch, [1, 4, 8, 15, 22, 30])
        if "probe" in parts:
            part_probe(model, processor, args.n_scenes, args.batch, [0, 1, 4, 8, 15])
    if "train" in parts:
        layers = [int(v) for v in args.layers.split(",")]
        part_train(args.steps, layers if len(layers) > 1 else layers[0], args.n_eval, args.batch, args.seed)


if __name__ == "__main__":
    main()
