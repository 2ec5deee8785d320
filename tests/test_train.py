import torch

from skipit.demo.train import batch_loss, tokenize, training_scenes, vision_features
from skipit.evaluation import vqa


def test_packed_rows_hold_every_question_once_after_one_image(tiny_llava):
    model, processor = tiny_llava
    images, conversations = training_scenes(3, seed=0)
    assert len(images) == len(conversations) == 3
    tok = processor.tokenizer
    for row, turns in zip(tokenize(processor, model, conversations), conversations, strict=True):
        assert len(turns) >= 3  # count and existence always apply, and most scenes pose more
        assert row.ids.count(model.config.image_token_id) == model.config.image_seq_length  # the image, once
        assert len(row.ids) == len(row.positions) == len(row.segments)
        assert sorted(set(row.segments)) == list(range(len(turns) + 1))
        answers = tok.decode([row.ids[t] for t in row.targets]).split()
        assert answers == [w for _, a in turns for w in (a, "<|im_end|>")]
        for i, (question, answer) in enumerate(turns, start=1):  # each segment is the single-turn prompt + answer
            seg = [j for j, s in enumerate(row.segments) if s in (0, i)]
            prompt = vqa.prompt_text(processor, question)
            alone = processor(images=[images[0]], text=[prompt])["input_ids"][0]
            alone += tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert [row.ids[j] for j in seg] == alone
            assert [row.positions[j] for j in seg] == list(range(len(seg)))


def test_packed_loss_equals_each_question_asked_alone(tiny_llava):
    """Reference: every question run on its own through the model's ordinary forward (processor + pixels)."""
    model, processor = tiny_llava
    images, conversations = training_scenes(2, seed=3)
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
    images, conversations = training_scenes(4, seed=0)
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
