"""Train mini-llava's projector on the `shapes` train split, with the vision tower frozen.

The vision tower is frozen, so its features are computed once and cached on disk; each step then runs only
the projector and the language model. Loss: cross-entropy on the answer tokens and the closing end-of-turn
token, as in LLaVA's instruction tuning.

With `lora_rank > 0` (the default used for the shipped weights), low-rank adapters on the language model's
attention projections are trained too, as LLaVA fine-tunes its LLM; they are merged into the pretrained
weights when the model is assembled (see build.py), so the language layers are then close to, but not exactly,
SmolLM2's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from skipit.data.shapes import SPLITS, render, sample_scene, scene_questions
from skipit.demo.build import LORA_TARGETS, assemble, cache_dir
from skipit.evaluation import vqa


@torch.no_grad()  # not inference_mode: the cached features feed a trained projector
def vision_features(model, processor, images, batch_size: int = 64) -> torch.Tensor:
    """The features LLaVA feeds its projector (config.vision_feature_layer, CLS dropped), for all images."""
    cfg = model.config
    out = []
    for i in range(0, len(images), batch_size):
        pixels = processor.image_processor(images[i:i + batch_size], return_tensors="pt")["pixel_values"]
        hs = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        out.append(hs[:, 1:] if cfg.vision_feature_select_strategy == "default" else hs)
    return torch.cat(out)


def tokenize(processor, model, conversations) -> list[tuple[list[int], list[int]]]:
    """Token ids of each multi-turn conversation about one image, and the positions of its answer tokens.

    A conversation is a list of (question, answer) turns; the image goes with the first question, as in LLaVA's
    multi-turn instruction data. Targets are each answer and its end-of-turn token.
    """
    tok = processor.tokenizer
    n_img = model.config.image_seq_length
    out = []
    for turns in conversations:
        ids: list[int] = []
        targets: list[int] = []
        for i, (question, answer) in enumerate(turns):
            messages = vqa.prompt_messages(question, with_image=i == 0)
            if i:  # later turns: just this user turn, without the system prompt the template adds to a first turn
                messages = [{"role": "system", "content": ""}, *messages]
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if i:
                text = text[text.index("<|im_start|>user"):]
            text = text.replace(processor.image_token, processor.image_token * n_img)
            ids += tok(text, add_special_tokens=False)["input_ids"]
            a_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            targets += range(len(ids), len(ids) + len(a_ids))
            ids += a_ids + tok("\n", add_special_tokens=False)["input_ids"]
        out.append((ids, targets))
    return out


def batch_loss(model, feats: torch.Tensor, seqs: list[tuple[list[int], list[int]]], image_token_id: int):
    """Mean cross-entropy over the answer tokens of a batch of tokenized conversations."""
    lm = model.model.language_model
    pad = model.generation_config.pad_token_id
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (s, _) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    embeds = lm.embed_tokens(ids)
    image_mask = ids == image_token_id
    projected = model.model.multi_modal_projector(feats)
    embeds = embeds.masked_scatter(image_mask[..., None], projected.reshape(-1, projected.shape[-1]).to(embeds.dtype))
    hidden = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    # predict token t+1 from position t, only over answer tokens: the LM head runs on those rows alone
    rows, cols, targets = [], [], []
    for i, (s, answer_positions) in enumerate(seqs):
        for t in answer_positions:
            rows.append(i)
            cols.append(t - 1)
            targets.append(s[t])
    logits = model.lm_head(hidden[rows, cols])
    return F.cross_entropy(logits.float(), torch.tensor(targets))


def training_scenes(n: int, seed: int):
    """`n` train-split scenes, each with one conversation covering every question type it can pose."""
    rng = random.Random(f"shapes-train-conversations/{seed}/{SPLITS['train']}")
    scenes = [sample_scene(rng) for _ in range(n)]
    return [render(s) for s in scenes], [[(q, a) for q, a, _ in scene_questions(s, rng)] for s in scenes]


def cached_features(model, processor, images, n: int, seed: int) -> torch.Tensor:
    path = cache_dir() / f"shapes-train-conversation-features-{n}-{seed}.safetensors"
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
    return {k: v.detach().half().contiguous() for k, v in state.items()}  # fp16 halves the committed file


def train(
    out: str | Path,
    steps: int = 350,
    batch_size: int = 8,
    lr: float = 2e-3,
    lora_rank: int = 16,
    lora_alpha: float = 32.0,
    lora_lr: float = 1e-3,
    n_train: int = 3000,
    seed: int = 0,
    bf16: bool = True,
    checkpoint_every: int = 50,
    log: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Train and save the projector (+ LoRA factors) as safetensors at `out` (temp file, then rename)."""
    torch.manual_seed(seed)
    model, processor = assemble(trained=None)
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    groups = [{"params": list(projector.parameters()), "lr": lr}]
    if lora_rank:
        groups.append({"params": add_lora(model, lora_rank, lora_alpha), "lr": lora_lr})

    images, conversations = training_scenes(n_train, seed)
    feats = cached_features(model, processor, images, n_train, seed)
    seqs = tokenize(processor, model, conversations)
    image_token_id = model.config.image_token_id

    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = random.Random(seed)
    order: list[int] = []
    trainable = [p for g in groups for p in g["params"]]
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(seqs)), len(seqs))
        idx, order = order[:batch_size], order[batch_size:]
        # bf16 autocast: ~1.5x faster on CPUs with AVX512-BF16; the trained weights stay fp32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = batch_loss(model, feats[idx], [seqs[i] for i in idx], image_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        if log:
            log(step, steps, loss.item())
        if checkpoint_every and (step + 1) % checkpoint_every == 0:
            _save(trained_state(model, lora_rank, lora_alpha), Path(out))
    _save(trained_state(model, lora_rank, lora_alpha), Path(out))
    return Path(out)


def _save(state: dict[str, torch.Tensor], out: Path) -> None:
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(out)
