"""Train mini-llava's projector on the `shapes` train split, with the vision tower frozen.

The vision tower is frozen, so its features are computed once and cached on disk; each step then runs only
the projector and the language model. Loss: cross-entropy on the answer tokens and the closing end-of-turn
token, as in LLaVA's instruction tuning.

With `lora_rank > 0` (the default used for the shipped weights), low-rank adapters on the language model's
attention projections are trained too, as LLaVA fine-tunes its LLM; they are merged into the pretrained
weights when the model is assembled (see build.py), so the language layers are then close to, but not exactly,
SmolLM2's.

Alignment (`align_steps`, `align_weight`): the VQA loss alone never taught the projector to keep colour (the
colour diagnosis in docs/benchmarks.md: its gradient only appears once the LM already reads colour, so training
settles on a prior). So, as LLaVA's first stage aligns vision features to the LM's word embeddings, every vision
token over an object is trained to equal the sum of the embeddings of that object's words (" small" + " red" +
" circle"): first the projector alone (cheap: no LM), then as an extra loss next to the VQA loss.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from skipit.data import shapes
from skipit.data.shapes import COLUMNS, ROWS, SPLITS, Obj, object_map, render, sample_scene, scene_questions
from skipit.demo.build import LORA_TARGETS, assemble, cache_dir
from skipit.evaluation import vqa
from skipit.prompts import CAPTION_PROMPT, caption_text


@torch.no_grad()  # not inference_mode: the cached features feed a trained projector
def vision_features(model, processor, images, batch_size: int = 64) -> torch.Tensor:
    """The features LLaVA feeds its projector (config.vision_feature_layer, CLS dropped), for all images."""
    cfg = model.config
    out = []
    for i in range(0, len(images), batch_size):
        pixels = processor.image_processor(images[i:i + batch_size], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(model.device)
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, list) else [cfg.vision_feature_layer]
        hs = torch.cat([hidden[j] for j in layers], dim=-1)  # as LlavaModel.get_image_features concatenates them
        out.append(hs[:, 1:] if cfg.vision_feature_select_strategy == "default" else hs)
    return torch.cat(out)


class Packed(NamedTuple):
    """One image's questions packed into one row: the shared prefix (system prompt and image), then each
    question-and-answer as its own segment that sees the prefix and itself only."""

    ids: list[int]
    positions: list[int]  # each segment continues from the prefix, exactly as if asked alone
    segments: list[int]  # 0: shared prefix; i: the i-th question
    targets: list[int]  # indices of answer tokens (each answer and its end-of-turn token)


def tokenize(processor, model, conversations) -> list[Packed]:
    """Pack every question about one image into one training row.

    Each question is tokenized as the single-turn prompt `vqa.answer` (or, for `CAPTION_PROMPT`, captioning) uses at
    inference; the tokens up to the last image token are the same for all of them and are kept once. Segments do not
    see each other, so no answer can be copied from another question about the same image (with plain multi-turn
    data "What shape is the blue object? square" gives away "What color is the square?"), while the image is still
    run once for all.
    """
    tok = processor.tokenizer
    n_img = model.config.image_seq_length
    image_id = model.config.image_token_id
    out = []
    for turns in conversations:
        prefix: list[int] | None = None
        ids: list[int] = []
        positions: list[int] = []
        segments: list[int] = []
        targets: list[int] = []
        for i, (question, answer) in enumerate(turns, start=1):
            # the caption turn gets the captioning prompt captions are asked with at inference, questions the VQA one
            text = caption_text(processor) if question == CAPTION_PROMPT else vqa.prompt_text(processor, question)
            text = text.replace(processor.image_token, processor.image_token * n_img)
            q_ids = tok(text, add_special_tokens=False)["input_ids"]
            split = len(q_ids) - q_ids[::-1].index(image_id)
            if prefix is None:
                prefix = q_ids[:split]
                ids, positions, segments = list(prefix), list(range(split)), [0] * split
            elif q_ids[:split] != prefix:
                raise ValueError("questions about one image must share the prompt up to the image")
            a_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rest = q_ids[split:]
            targets += range(len(ids) + len(rest), len(ids) + len(rest) + len(a_ids))
            ids += rest + a_ids
            positions += range(split, split + len(rest) + len(a_ids))
            segments += [i] * (len(rest) + len(a_ids))
        out.append(Packed(ids, positions, segments, targets))
    return out


def packed_mask(segments: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, 1, T, T) attention mask, True where query t may see key s: causal, and s is in the shared
    prefix or in t's own segment. Padding is seen by nobody (a padding row sees itself, to keep softmax finite)."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
    mask = causal & same & valid[:, None, :] & valid[:, :, None]
    mask |= torch.eye(t, dtype=torch.bool, device=segments.device)
    return mask[:, None]


def batch_loss(model, feats: torch.Tensor, seqs: list[Packed], image_token_id: int, projected=None):
    """Mean cross-entropy over the answer tokens of a batch of packed rows (`projected`: the projector's output
    for `feats`, when the caller already has it)."""
    lm = model.model.language_model
    pad = model.generation_config.pad_token_id
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    positions = torch.zeros_like(ids)
    segments = torch.full_like(ids, -1)
    for i, s in enumerate(seqs):
        n = len(s.ids)
        ids[i, :n] = torch.tensor(s.ids)
        positions[i, :n] = torch.tensor(s.positions)
        segments[i, :n] = torch.tensor(s.segments)
    ids, positions, segments = ids.to(model.device), positions.to(model.device), segments.to(model.device)
    embeds = lm.embed_tokens(ids)
    image_mask = ids == image_token_id
    if projected is None:
        projected = model.model.multi_modal_projector(feats)
    embeds = embeds.masked_scatter(image_mask[..., None], projected.reshape(-1, projected.shape[-1]).to(embeds.dtype))
    mask = packed_mask(segments, segments >= 0)
    hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    # predict token t+1 from position t, only over answer tokens: the LM head runs on those rows alone
    rows, cols, targets = [], [], []
    for i, s in enumerate(seqs):
        for t in s.targets:
            rows.append(i)
            cols.append(t - 1)
            targets.append(s.ids[t])
    logits = model.lm_head(hidden[rows, cols])
    return F.cross_entropy(logits.float(), torch.tensor(targets, device=logits.device))


def training_scenes(n: int, seed: int, captions: bool = False):
    """`n` train-split scenes: their images, one conversation each covering every question type the scene can pose
    (with `captions`, also the caption prompt and the scene's reference caption), and the scenes' objects."""
    rng = random.Random(f"shapes-train-conversations/{seed}/{SPLITS['train']}")
    scenes = [sample_scene(rng) for _ in range(n)]
    conversations = [[(q, a) for q, a, _ in scene_questions(s, rng)] for s in scenes]
    if captions:  # after the questions, so the questions' random draws are the same with and without
        conversations = [t + [(CAPTION_PROMPT, shapes.caption(s))] for t, s in zip(conversations, scenes, strict=True)]
    return [render(s) for s in scenes], conversations, scenes


ALIGN_MIN_COVER = 0.25  # a patch is an object's when the object covers at least this share of its pixels


POSITION_WORDS = ("row", "column")


def patch_words(scenes: list[list[Obj]], tokenizer, grid: int, patch: int = 14, positions: tuple[str, ...] = ()
                ) -> torch.Tensor:  # fmt: skip
    """(n, grid * grid, 3) token ids of " <size>", " <colour>", " <shape>" for the object under each patch (raster
    order, as the vision tokens), -1 for background; `positions` ("row", "column" or both, in that order) appends
    " <row>" and/or " <column>". Small objects cover less than one patch: each object also keeps the patch it covers
    most.

    `positions` is the lever for column questions: from scratch it cost colour, shape and size what it gave column;
    from weights that already read the object words, the row and column words and then the column word alone took
    column from 0.57 to 0.81 (docs/benchmarks.md, the stages of `RECIPE`)."""
    def word(w: str) -> int:
        (token,) = tokenizer(" " + w, add_special_tokens=False)["input_ids"]  # one token each in SmolLM2
        return token

    unknown = set(positions) - set(POSITION_WORDS)
    if unknown:
        raise ValueError(f"unknown position words {sorted(unknown)}; available: {', '.join(POSITION_WORDS)}")
    positions = tuple(p for p in POSITION_WORDS if p in positions)
    out = torch.full((len(scenes), grid * grid, 3 + len(positions)), -1, dtype=torch.long)
    for n, objs in enumerate(scenes):
        labels = torch.tensor(list(object_map(objs, grid * patch).getdata()), dtype=torch.long)
        labels = labels.view(grid, patch, grid, patch).permute(0, 2, 1, 3).reshape(grid * grid, patch * patch)
        for i, o in enumerate(objs):
            cover = (labels == i + 1).float().mean(dim=1)
            keep = (cover >= ALIGN_MIN_COVER) | ((cover == cover.max()) & (cover > 0))
            where = {"row": ROWS[o.row], "column": COLUMNS[o.col]}
            words = (o.size, o.color, o.shape) + tuple(where[p] for p in positions)
            out[n, keep] = torch.tensor([word(w) for w in words])
    return out


def align_loss(projected: torch.Tensor, words: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Squared distance between each object patch's vision token and the sum of its words' embeddings, relative to
    the targets' mean square (unitless: 1.0 for an all-zero output), averaged over object patches."""
    on_object = words[..., 0] >= 0
    target = embeddings[words[on_object]].sum(dim=1).float()
    return F.mse_loss(projected[on_object].float(), target) / target.pow(2).mean()


def cached_features(model, processor, images, n: int, seed: int) -> torch.Tensor:
    layers = model.config.vision_feature_layer
    tag = "_".join(map(str, layers)) if isinstance(layers, list) else str(layers)
    path = cache_dir() / f"shapes-train-features-{n}-{seed}-layers{tag}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"]
    feats = vision_features(model, processor, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": feats.contiguous()}, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").replace(path)
    return feats


def add_lora(model, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Inject LoRA adapters (peft) into the language model's attention projections; return their parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    inject_adapter_in_model(config, model.model.language_model)
    params = [p for n, p in model.model.language_model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def trained_state(model, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """Projector weights plus LoRA factors as `lora.<module>.A/B`, with the scale folded into B."""
    state = {f"multi_modal_projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()}
    for name, module in model.model.language_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            state[f"lora.{name}.A"] = module.lora_A["default"].weight
            state[f"lora.{name}.B"] = module.lora_B["default"].weight * (alpha / rank)
    return {k: v.detach().cpu().half().contiguous() for k, v in state.items()}  # fp16 halves the committed file


def train(
    out: str | Path,
    steps: int = 150,
    batch_size: int = 8,
    lr: float = 2e-3,
    lora_rank: int = 16,
    lora_alpha: float = 32.0,
    lora_lr: float = 1e-3,
    n_train: int = 4000,
    align_steps: int = 1000,
    align_weight: float = 1.0,
    align_positions: tuple[str, ...] = (),
    captions: bool = False,
    init: str | Path | None = None,
    seed: int = 0,
    bf16: bool = True,
    checkpoint_every: int = 50,
    log: Callable[[int, int, float], None] | None = None,
    device: str = "cpu",
) -> Path:
    """Train and save the projector (+ LoRA factors) as safetensors at `out` (temp file, then rename).

    First `align_steps` steps of the projector alone on the alignment loss (batches of 64 images), then `steps`
    steps of the VQA loss + `align_weight` x the alignment loss. `log(step, total, loss)` counts both stages.

    `init`: continue from trained weights (e.g. the shipped ones) instead of a random projector: their LoRA is merged
    into the LM, new adapters train on top, and the saved file stacks both factor pairs (rank r_init + r), so it
    loads like any other.
    """
    torch.manual_seed(seed)
    start = load_file(str(init)) if init else None
    model, processor = assemble(trained=start)
    model.to(device)
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)

    images, conversations, scenes = training_scenes(n_train, seed, captions)
    feats = cached_features(model, processor, images, n_train, seed).to(device)
    grid = int(math.isqrt(feats.shape[1]))
    words = patch_words(scenes, processor.tokenizer, grid, positions=align_positions).to(device)
    embeddings = model.get_input_embeddings().weight.detach()
    seqs = tokenize(processor, model, conversations)
    image_token_id = model.config.image_token_id
    total = align_steps + steps
    rng = random.Random(seed)

    if align_steps:  # stage 1: the projector alone, dense targets on every object patch
        opt = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(align_steps))
        for step in range(align_steps):
            idx = rng.sample(range(len(feats)), min(64, len(feats)))
            loss = align_loss(projector(feats[idx]), words[idx], embeddings)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log:
                log(step, total, loss.item())

    groups = [{"params": list(projector.parameters()), "lr": lr}]
    if lora_rank:
        groups.append({"params": add_lora(model, lora_rank, lora_alpha), "lr": lora_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps))
    order: list[int] = []
    trainable = [p for g in groups for p in g["params"]]
    for step in range(steps):
        if len(order) < batch_size:  # epochs over the scenes; with steps x batch <= n_train no scene repeats
            order += rng.sample(range(len(seqs)), len(seqs))
        idx, order = order[:batch_size], order[batch_size:]
        # bf16 autocast: ~1.5x faster on CPUs with AVX512-BF16; the trained weights stay fp32
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            projected = projector(feats[idx])
            loss = batch_loss(model, feats[idx], [seqs[i] for i in idx], image_token_id, projected=projected)
            if align_weight:
                loss = loss + align_weight * align_loss(projected, words[idx], embeddings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        if log:
            log(align_steps + step, total, loss.item())
        if checkpoint_every and (step + 1) % checkpoint_every == 0:
            _save(stacked(start, trained_state(model, lora_rank, lora_alpha)), Path(out))
    _save(stacked(start, trained_state(model, lora_rank, lora_alpha)), Path(out))
    return Path(out)


MAX_SAVED_RANK = 32  # stacked LoRA factors beyond this are truncated (SVD), so the committed file stays near 20 MB


# The shipped weights: each stage continues from the one before (`init`), on fresh scenes (its own seed).
RECIPE: tuple[dict, ...] = (
    {"steps": 150, "align_steps": 1000, "seed": 0},  # align the projector to word embeddings, then the answers
    {"steps": 150, "align_steps": 0, "lr": 1e-3, "lora_lr": 1e-3, "seed": 1},  # more answers: every type but column
    {"steps": 60, "align_steps": 0, "lr": 1e-3, "lora_lr": 1e-3, "seed": 2, "align_positions": ("row", "column")},
    {"steps": 60, "align_steps": 0, "lr": 1e-3, "lora_lr": 1e-3, "seed": 3, "align_positions": ("column",),
     "captions": True},  # the column word alone (" middle" is also a row word), and the reference captions
)


def train_recipe(out: str | Path, recipe: tuple[dict, ...] = RECIPE, log: Callable[[int, int, float], None] | None
                 = None, device: str = "cpu", **overrides) -> Path:  # fmt: skip
    """Run the stages of `recipe` in turn, each from the weights of the one before, and write the last to `out`.
    Each stage's weights are kept next to `out` (`<out stem>.stage<i>.safetensors`). `log(step, total, loss)` counts
    the steps of all stages; `overrides` apply to every stage (tests shrink them)."""
    out = Path(out)
    recipe = tuple({**stage, **overrides} for stage in recipe)
    totals = [stage.get("align_steps", 1000) + stage["steps"] for stage in recipe]
    done, init = 0, None
    for i, stage in enumerate(recipe):
        def stage_log(step: int, _total: int, loss: float, offset: int = done) -> None:
            if log:
                log(offset + step, sum(totals), loss)

        path = out if i == len(recipe) - 1 else out.with_name(f"{out.stem}.stage{i + 1}{out.suffix}")
        init = train(path, init=init, log=stage_log, device=device, **stage)
        done += totals[i]
    return out


def stacked(start: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor],
            max_rank: int = MAX_SAVED_RANK) -> dict[str, torch.Tensor]:  # fmt: skip
    """`new`'s projector with the LoRA factors of `start` and `new` stacked: B0 @ A0 + B1 @ A1 = [B0 B1] @ [A0; A1],
    then `compact`ed to `max_rank`."""
    if start is None:
        return new
    out = dict(new)
    for key in (k for k in start if k.startswith("lora.")):
        if key not in new:
            out[key] = start[key]
        else:
            out[key] = torch.cat([start[key], new[key]], dim=0 if key.endswith(".A") else 1).contiguous()
    return compact(out, max_rank)


def compact(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Each LoRA pair with more than `rank` rows re-factored to the best rank-`rank` approximation of its product B @ A
    (exact when the product's rank is at most `rank`); other tensors unchanged."""
    out = dict(state)
    for a_key in (k for k in state if k.startswith("lora.") and k.endswith(".A")):
        b_key = a_key[: -len(".A")] + ".B"
        a, b = state[a_key].float(), state[b_key].float()
        if a.shape[0] <= rank:
            continue
        # SVD of the small r x r core of B @ A = (Qb Rb)(Qa Ra)^T, never of the full (out x in) product
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u, sv, vh = torch.linalg.svd(rb @ ra.T)
        root = sv[:rank].sqrt()
        out[b_key] = ((qb @ u[:, :rank]) * root).to(state[b_key].dtype).contiguous()
        out[a_key] = (root[:, None] * (vh[:rank] @ qa.T)).to(state[a_key].dtype).contiguous()
    return out


def _warmup_cosine(steps: int) -> Callable[[int], float]:
    """Linear warm-up over the first 5 % of the steps, then cosine decay to zero."""
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return schedule


def _save(state: dict[str, torch.Tensor], out: Path) -> None:
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(out)
