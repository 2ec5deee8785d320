from pathlib import Path

import pytest
import torch

from skipit.demo.train import batch_loss, tokenize, training_scenes, vision_features
from skipit.evaluation import vqa
from skipit.prompts import CAPTION_PROMPT, caption_text


@pytest.mark.parametrize("captions", [False, True])
def test_packed_rows_hold_every_question_once_after_one_image(tiny_llava, captions):
    model, processor = tiny_llava
    images, conversations, _ = training_scenes(3, seed=0, captions=captions)
    assert len(images) == len(conversations) == 3
    assert all((turns[-1][0] == CAPTION_PROMPT) == captions for turns in conversations)
    tok = processor.tokenizer
    for row, turns in zip(tokenize(processor, model, conversations), conversations, strict=True):
        assert len(turns) >= 3  # count and existence always apply, and most scenes pose more
        assert row.ids.count(model.config.image_token_id) == model.config.image_seq_length  # the image, once
        assert len(row.ids) == len(row.positions) == len(row.segments)
        assert sorted(set(row.segments)) == list(range(len(turns) + 1))
        answers = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, a in turns]
        assert [row.ids[t] for t in row.targets] == [i for ids in answers for i in ids]
        for i, (question, answer) in enumerate(turns, start=1):  # each segment is the single-turn prompt + answer
            seg = [j for j, s in enumerate(row.segments) if s in (0, i)]
            prompt = caption_text(processor) if question == CAPTION_PROMPT else vqa.prompt_text(processor, question)
            alone = processor(images=[images[0]], text=[prompt])["input_ids"][0]
            alone += tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert [row.ids[j] for j in seg] == alone
            assert [row.positions[j] for j in seg] == list(range(len(seg)))


def test_packed_loss_equals_each_question_asked_alone(tiny_llava):
    """Reference: every question run on its own through the model's ordinary forward (processor + pixels)."""
    model, processor = tiny_llava
    images, conversations, _ = training_scenes(2, seed=3)
    feats = vision_features(model, processor, images)
    seqs = tokenize(processor, model, conversations)
    with torch.no_grad():
        packed = batch_loss(model, feats, seqs, model.config.image_token_id)
        tok = processor.tokenizer
        losses = []
        for image, turns in zip(images, conversations, strict=True):
            for question, answer in turns:
                prompt = vqa.prompt_text(processor, question)
                a_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                inputs = processor(images=[image], text=[prompt], return_tensors="pt")
                ids = torch.cat([inputs["input_ids"], torch.tensor([a_ids])], dim=1)
                logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
                n = len(a_ids)
                losses.append(torch.nn.functional.cross_entropy(logits[-n - 1:-1], ids[0, -n:], reduction="none"))
    assert torch.allclose(packed, torch.cat(losses).mean(), atol=1e-5)


def test_projector_alone_learns(tiny_llava):
    model, processor = tiny_llava
    model = type(model)(model.config).eval()  # a private copy: this test trains it
    with torch.no_grad():  # a random toy head gives near-uniform logits whatever the input; sharpen it
        model.lm_head.weight.mul_(50)
    model.requires_grad_(False)
    proj = model.model.multi_modal_projector
    proj.requires_grad_(True)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "multi_modal_projector" not in k}
    images, conversations, _ = training_scenes(4, seed=0)
    feats = vision_features(model, processor, images)
    assert feats.shape == (4, 4, 32)  # 2x2 patches, CLS dropped
    seqs = tokenize(processor, model, conversations)
    opt = torch.optim.AdamW(proj.parameters(), lr=3e-2)
    losses = []
    for _ in range(20):
        loss = batch_loss(model, feats, seqs, model.config.image_token_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]  # the toy LM cannot fit the answers, but it must learn
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_merged_lora_equals_the_trained_adapters(tiny_llava):
    from skipit.demo.build import load_trained
    from skipit.demo.train import add_lora, trained_state

    model, _ = tiny_llava
    trained_model = type(model)(model.config).eval()
    trained_model.load_state_dict(model.state_dict())
    params = add_lora(trained_model, rank=2, alpha=4.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:  # peft starts B at zero; give every factor a value, as training would
            p.normal_(0, 0.2)
    ids = torch.randint(5, 40, (2, 9))
    with torch.no_grad():
        expected = trained_model(input_ids=ids).logits
        merged = type(model)(model.config).eval()
        merged.load_state_dict(model.state_dict())
        load_trained(merged, trained_state(trained_model, rank=2, alpha=4.0))
        got = merged(input_ids=ids).logits
        untouched = model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=2e-3)  # the factors are stored in fp16
    assert (untouched - expected).abs().max() > 0.05  # the adapters did change the model


def test_continued_training_stacks_its_lora_on_the_starting_weights(tiny_llava):
    # `train(init=...)`: the start's LoRA is merged, new adapters train on top, the saved file stacks both
    from skipit.demo.build import load_trained
    from skipit.demo.train import add_lora, stacked, trained_state

    model, _ = tiny_llava

    def copy():
        out = type(model)(model.config).eval()
        out.load_state_dict(model.state_dict())
        return out

    def adapted(seed: int):
        m = copy()
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in add_lora(m, rank=2, alpha=4.0):
                p.normal_(0, 0.2)
        return trained_state(m, rank=2, alpha=4.0)

    start, new = adapted(1), adapted(2)
    ids = torch.randint(5, 40, (2, 9))
    with torch.no_grad():
        in_turn = copy()
        load_trained(in_turn, start)
        load_trained(in_turn, new)  # what training on top of the merged start means
        at_once = copy()
        load_trained(at_once, stacked(start, new))
        only_new = copy()
        load_trained(only_new, new)
        expected, got, partial = (m(input_ids=ids).logits for m in (in_turn, at_once, only_new))
    assert next(k for k in stacked(start, new) if k.endswith(".A")) and all(
        stacked(start, new)[k].shape[0 if k.endswith(".A") else 1] == 4 for k in new if k.startswith("lora."))
    assert torch.allclose(got, expected, atol=1e-4)
    assert (partial - expected).abs().max() > 0.05  # the start's factors matter
    assert stacked(None, new) is new


class _WordIds:
    """Tokenizer stand-in: each word is one token (as the size, colour and shape words are in SmolLM2)."""

    vocab = {" small": 1, " large": 2, " red": 3, " blue": 4, " circle": 5, " square": 6,
             " top": 7, " middle": 8, " bottom": 9, " left": 10, " right": 11}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab[text]]}


def test_compact_keeps_a_low_rank_product_exactly_and_otherwise_its_best_approximation():
    from skipit.demo.train import compact

    torch.manual_seed(0)
    b, a = torch.randn(40, 6) @ torch.randn(6, 12), torch.randn(12, 30)  # rank-12 factors of a rank-6 product
    full_b, full_a = torch.randn(40, 12), torch.randn(12, 30)
    state = {"lora.q.A": a, "lora.q.B": b, "lora.k.A": full_a, "lora.k.B": full_b, "proj.w": torch.ones(3)}
    out = compact(state, 6)
    assert out["lora.q.A"].shape == (6, 30) and out["lora.q.B"].shape == (40, 6)
    torch.testing.assert_close(out["lora.q.B"] @ out["lora.q.A"], b @ a, rtol=1e-4, atol=1e-4)
    sv = torch.linalg.svdvals(full_b @ full_a)  # Eckart-Young: the best rank-6 error is the dropped singular values
    error = torch.linalg.matrix_norm(out["lora.k.B"] @ out["lora.k.A"] - full_b @ full_a)
    assert abs(error - sv[6:].pow(2).sum().sqrt()) < 1e-3 * sv[0]
    assert out["proj.w"] is state["proj.w"] and compact(state, 12)["lora.k.A"] is full_a


def test_patch_words_mark_the_patches_each_object_covers():
    from skipit.data.shapes import Obj
    from skipit.demo.train import patch_words

    big = Obj("square", "red", "large", 1, 1)  # the centre cell, 0.84 of its 37 px side: the middle 2x2 patches
    small = Obj("circle", "blue", "small", 0, 0)  # 16 px across: less than one 14 px patch
    assert patch_words([[big, small]], _WordIds(), grid=8).shape == (1, 64, 3)  # size, colour, shape
    words = patch_words([[big, small]], _WordIds(), grid=8, positions=("row", "column"))[0].view(8, 8, 5)
    assert words[3:5, 3:5].tolist() == [[[2, 3, 6, 8, 8]] * 2] * 2  # large red square, middle row, middle column
    assert (words[..., 1] == 3).sum() >= 4 and (words[..., 1] == 3).sum() <= 9
    assert (words[..., 1] == 4).sum() >= 1  # the small circle keeps the patch it covers most
    assert words[1, 1].tolist() == [1, 4, 5, 7, 10]  # top left; its centre, (18.7, 18.7) px, is in patch (1, 1)
    assert words[7, 7].tolist() == [-1] * 5 and words[0, 7].tolist() == [-1] * 5  # background
    column_only = patch_words([[big, small]], _WordIds(), grid=8, positions=("column",))[0].view(8, 8, 4)
    assert column_only[1, 1].tolist() == [1, 4, 5, 10]  # left column; no row word


def test_align_loss_is_zero_on_the_word_embeddings_and_one_at_zero():
    from skipit.demo.train import align_loss

    torch.manual_seed(0)
    embeddings = torch.randn(10, 6)
    words = torch.tensor([[[1, 2, 3], [-1, -1, -1]], [[4, 5, 6], [7, 8, 9]]])
    exact = embeddings[words.clamp(min=0)].sum(dim=2)
    exact[0, 1] = 100.0  # background patches are not scored
    assert align_loss(exact, words, embeddings).item() < 1e-6
    assert abs(align_loss(torch.zeros(2, 2, 6), words, embeddings).item() - 1.0) < 1e-6


def test_the_recipe_runs_its_stages_in_turn_each_from_the_weights_before(monkeypatch, tmp_path):
    from skipit.demo import train as training

    calls, logged = [], []

    def fake_train(out, init=None, log=None, device="cpu", **stage):
        calls.append((Path(out).name, init and Path(init).name, stage))
        for step in range(stage.get("align_steps", 1000) + stage["steps"]):
            log(step, -1, 0.5)
        return Path(out)

    monkeypatch.setattr(training, "train", fake_train)
    recipe = ({"steps": 3, "seed": 0}, {"steps": 2, "align_steps": 0, "seed": 1},
              {"steps": 4, "align_steps": 0, "seed": 2, "align_positions": ("column",)})
    out = training.train_recipe(tmp_path / "w.safetensors", recipe, log=lambda s, t, _: logged.append((s, t)),
                                align_steps=1)  # an override reaches every stage
    assert out == tmp_path / "w.safetensors"
    assert [(o, i) for o, i, _ in calls] == [("w.stage1.safetensors", None), ("w.stage2.safetensors",
                                              "w.stage1.safetensors"), ("w.safetensors", "w.stage2.safetensors")]
    assert [c[2]["seed"] for c in calls] == [0, 1, 2] and all(c[2]["align_steps"] == 1 for c in calls)
    assert calls[2][2]["align_positions"] == ("column",)
    assert [s for s, _ in logged] == list(range(4 + 3 + 5)) and {t for _, t in logged} == {12}
