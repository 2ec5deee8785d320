"""Tiny random models built in the tests: no downloads, seconds to run."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from skipit.data import shapes
from skipit.demo.build import IMAGE_TOKEN, build_processor

# Tiny models run fastest on one thread; on a shared 2-core machine more threads make them 10-100x slower.
torch.set_num_threads(1)

SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
WORDS = sorted(
    {*shapes.COLORS, *shapes.SHAPES, *shapes.SIZES, *shapes.ROWS, *shapes.COLUMNS, *shapes.NUMBER_WORDS}
    | set(
        "what color is the shape object how many shapes are in image small or large top middle bottom row left right "
        "column there a yes no answer question using single word phrase system user assistant , . ?".split()
    )
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + [w for w in WORDS if w])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", additional_special_tokens=[IMAGE_TOKEN],
    )
    return fast


@pytest.fixture(scope="session")
def tiny_llava():
    """A LLaVA with the mini-llava layout (DINOv2 tower, CLS dropped, Llama LM) at toy size: 4 vision tokens."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    config = LlavaConfig(
        vision_config=Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
            image_size=28,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=4,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, build_processor(tok, image_size=28)
