"""What the skipping engine needs to know about a model family, and nothing more, read off the model itself.

`Adapter` is the generic adapter: it serves every causal LM and every conditional-generation VLM whose text decoder
has the common layout, and finds everything it needs on the model instead of in a per-family table:
- the text decoder (the module owning `layers` and `norm`): the first of `BACKBONE_PATHS` under the model;
- the LM head: `model.get_output_embeddings()`;
- the vision tokens: the config's image/video placeholder ids (`image_token_id` / `image_token_index`,
  `video_token_id` / `video_token_index`), counted only in a call that carries pixels, i.e. one of the forward
  arguments whose name starts with `pixel_values`.
A model that lacks one of them gets one line naming what was looked for and where.

Positions need no per-family code: in transformers 5 each decoder layer receives `position_embeddings = (cos, sin)`
already resolved per token, shaped `(batch or 1, seq, head_dim)`; that holds for Qwen2-VL's 3-D M-RoPE too, whose
sections are recombined inside its rotary module (`models/qwen2_vl/modeling_qwen2_vl.py`,
`Qwen2VLRotaryEmbedding.forward`). Slicing cos/sin along the token axis therefore keeps every token's original
position, and `take_positions` is the one place to override for a family that lays them out differently.

Masks: the engine builds each layer's mask itself, on original sequence indices, for the tokens the layer processes.
What it needs to know per layer is read here: its sliding window (`windows`, as transformers reads the config to
build its sliding masks and caches), its attention chunk (`chunks`, Llama 4's chunked layers) and, for families whose
mask lets some tokens attend to each other bidirectionally (`token_type_ids`), the blocks of such tokens (`blocks`,
defined by a subclass).

Linear-attention layers (`recurrent`) take a 2-D padding mask instead, and run over the tokens they process in order;
only a family adapter that knows their cache serves them (`served_kinds`, Qwen3.5).

What the engine cannot reproduce is found here too (`plan_refusal`): layer kinds other than full, sliding-window and
chunked attention (linear attention, outside the families that serve it), bidirectional masks a family adapter does
not define, rotary that is not a real (cos, sin) pair (`check_positions`, unless a family adapter slices its own
kind).
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from skipit import compat
from skipit.errors import SkipitError

# Attention classes whose keys and values skipit computes by itself (pre-attention norm, k/v projections, rotary on
# the keys, as their forward does), so that frozen vision tokens cost the k and v projections only; any other class
# runs its whole attention on them and the output is thrown away. Each was read against LlamaAttention's forward:
# Qwen2 differs only by projection biases (in the Linear modules) and a sliding window (a matter of the mask, which
# the engine builds), Mistral only by the sliding window, Qwen3 and Qwen3-VL by a per-head RMSNorm of queries and
# keys (`q_norm`, `k_norm`, applied before the heads are transposed, as `_heads` does); Gemma 3 by the same per-head
# norms (applied after the transpose, over the same last axis) and its scaling (`attention.scaling`, from
# `query_pre_attn_scalar`), without softcapping; Gemma (PaliGemma's text model) not at all (its `is_causal` flag only
# matters without a mask, see `causal_without_mask`).
KEYS_VALUES_ONLY = frozenset({
    "LlamaAttention", "Qwen2VLAttention", "Qwen2_5_VLAttention", "Qwen2Attention", "MistralAttention",
    "Qwen3Attention", "Qwen3VLTextAttention", "Qwen3VLMoeTextAttention", "Gemma3Attention", "GemmaAttention",
})  # fmt: skip

# Where the text decoder (the module owning `layers` and `norm`) sits, relative to the model, first match wins:
# VLMs with a base model (LLaVA, Qwen-VL, InternVL, Mistral3, ...), Idefics3/SmolVLM, causal LMs, and VLMs that wrap a
# whole causal LM (Llama 4).
BACKBONE_PATHS = ("model.language_model", "model.text_model", "model", "language_model.model", "language_model")
IMAGE_TOKEN_NAMES = ("image_token_id", "image_token_index")
VIDEO_TOKEN_NAMES = ("video_token_id", "video_token_index")

# Layer kinds (the text config's `layer_types`) the engine can run on a token subset: their masks are built on
# original sequence indices (a sliding layer's query at index q sees keys at indices k with q - window < k <= q, as
# transformers' `sliding_window_overlay`; a chunked layer's, those of its chunk, counted from the row's first real
# token, as `chunked_overlay`).
SERVED_KINDS = ("full_attention", "sliding_attention", "chunked_attention")
# Layer kinds the engine cannot run on a token subset, and why.
LAYER_KINDS = {
    "linear_attention": "hybrid linear-attention layers (a recurrent state, not per-token keys; served for Qwen3.5's "
                        "Gated DeltaNet only)",
}


def _attribute(root, path: str):
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


def layer_types(config) -> list[str]:
    """Each decoder layer's kind, as transformers reads it to build the cache: the config's `layer_types`, else
    sliding/chunked when `sliding_window` / `attention_chunk_size` is set, else full attention."""
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return list(kinds)
    n = getattr(config, "num_hidden_layers", 0) or 0
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return ["sliding_attention"] * n
    if getattr(config, "attention_chunk_size", None) is not None:
        return ["chunked_attention"] * n
    return ["full_attention"] * n


def sliding_windows(config) -> list[int | None]:
    """Each decoder layer's sliding window (None: full attention), as transformers builds its masks: every
    "sliding_attention" layer of `layer_types` gets the config's `sliding_window`."""
    window = getattr(config, "sliding_window", None)
    return [window if kind == "sliding_attention" else None for kind in layer_types(config)]


class Adapter:
    """The generic adapter (see the module docstring); a family whose layout differs subclasses it."""

    def __init__(self, model: nn.Module, family: str = "generic"):
        self.model, self.family = model, family
        path = next((p for p in BACKBONE_PATHS if isinstance(getattr(_attribute(model, p), "layers", None),
                                                             nn.ModuleList)), None)  # fmt: skip
        name = type(model).__name__
        if path is None:
            looked = ", ".join(f"{p}.layers" for p in BACKBONE_PATHS)
            raise SkipitError(f"{name} is not supported: found no decoder layers (looked for {looked})")
        self._backbone = _attribute(model, path)
        if not isinstance(getattr(self._backbone, "norm", None), nn.Module):
            raise SkipitError(f"{name} is not supported: its text decoder ({path}) has no final `norm`")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(head, nn.Module):
            raise SkipitError(f"{name} is not supported: it has no LM head (get_output_embeddings() is None)")
        self._head = head
        # Forward arguments that carry pixels: image-token ids count as vision tokens only in a call that carries
        # them (or their encoding, which generate() computes up front and passes as `mm_encoder_outputs`), so an
        # image-token id the model happens to generate later is treated as text, as transformers itself does.
        parameters = inspect.signature(model.forward).parameters
        self.pixel_inputs = tuple(p for p in parameters if p.startswith("pixel_values"))
        config = model.config
        ids = [next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)
               for names in (IMAGE_TOKEN_NAMES, VIDEO_TOKEN_NAMES)]  # fmt: skip
        self._vision_ids = [int(i) for i in ids if i is not None] if self.pixel_inputs else []
        if self.pixel_inputs and not self._vision_ids:
            raise SkipitError(
                f"{name} is not supported: it takes {self.pixel_inputs[0]} but its config has no image token id "
                f"(looked for {', '.join(IMAGE_TOKEN_NAMES + VIDEO_TOKEN_NAMES)})"
            )

    @property
    def backbone(self) -> nn.Module:
        """The text decoder module that owns `layers` and `norm`."""
        return self._backbone

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def final_norm(self) -> nn.Module:
        return self.backbone.norm

    @property
    def lm_head(self) -> nn.Module:
        return self._head

    @property
    def attn_implementation(self) -> str:
        return self.backbone.config._attn_implementation

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    # Layers after which the model writes into the residual stream before the next layer (Qwen3-VL's deepstack):
    # their output must be the whole sequence, in original order.
    injected_after: frozenset[int] = frozenset()

    def set_attn_implementation(self, implementation: str) -> str:
        """Switch the language backbone (only) to `implementation` through transformers' own
        `set_attn_implementation`; returns the previous one, to restore."""
        previous, text_config = self.attn_implementation, self.backbone.config
        if text_config is self.model.config:
            self.model.set_attn_implementation(implementation)
        else:
            keys = [k for k in self.model.config.sub_configs if getattr(self.model.config, k, None) is text_config]
            if not keys:
                raise SkipitError(f"cannot find the text backbone's config in {type(self.model).__name__}'s config")
            self.model.set_attn_implementation({keys[0]: implementation})
        return previous

    def vision_token_ids(self) -> list[int]:
        return list(self._vision_ids)

    @property
    def windows(self) -> list[int | None]:
        """Each decoder layer's sliding window, or None for full attention (see `sliding_windows`)."""
        return sliding_windows(self.backbone.config)

    @property
    def chunks(self) -> list[int | None]:
        """Each decoder layer's attention chunk (transformers' `attention_chunk_size` for "chunked_attention"
        layers), or None."""
        config = self.backbone.config
        size = getattr(config, "attention_chunk_size", None)
        return [size if kind == "chunked_attention" else None for kind in layer_types(config)]

    # Whether this adapter reproduces the bidirectional blocks the model's mask builds from `token_type_ids` (see
    # `blocks`); the generic adapter does not, so a VLM whose forward takes them is refused.
    bidirectional_blocks = False
    # Whether a block pair must also be inside a sliding layer's window: AND(window, OR(causal, block)) (Gemma 3), or
    # not: OR(AND(window, causal), block) (PaliGemma 2, whose blocks go through transformers' sliding mask builder).
    blocks_in_window = True
    # Whether the family's forward builds causal masks (plus its blocks) whatever the text config's
    # `use_bidirectional_attention` says (PaliGemma); the flag then only makes attention non-causal without a mask.
    masks_ignore_bidirectional_flag = False

    @property
    def causal_without_mask(self) -> bool:
        """Whether the text attention is causal when given no mask (SDPA's `is_causal`, from the attention module's
        flag); when not, the engine passes a mask to every run of several queries."""
        return not getattr(self.backbone.config, "use_bidirectional_attention", False)

    def blocks(self, inputs: dict, first_call: bool) -> torch.Tensor | None:
        """(batch, seq) block ids of the current call's tokens, -1 outside any block: two tokens of the same block
        attend to each other whatever their order (inside the window, in a sliding layer). None when the call has
        none. `first_call`: the cache held nothing before this call. Defined by the families whose mask has such
        blocks."""
        return None

    # Layer kinds this adapter runs under plans; a family adapter may add "linear_attention" (see `recurrent`).
    served_kinds = SERVED_KINDS

    @property
    def recurrent(self) -> list[bool]:
        """Whether each decoder layer is a linear-attention layer (a recurrent state and a short causal conv over
        the tokens it processes, in order, instead of cached keys): the engine gives it the 2-D padding mask of its
        tokens, as transformers' `create_recurrent_attention_mask` does, not an attention mask."""
        return [kind == "linear_attention" for kind in layer_types(self.backbone.config)]

    def plan_refusal(self) -> str | None:
        """Why a non-empty skip plan cannot run exactly on this model (one clause), or None."""
        config = self.backbone.config
        kinds = layer_types(config)
        for kind in dict.fromkeys(kinds):
            if kind not in self.served_kinds:
                layers = [j for j, k in enumerate(kinds) if k == kind]
                why = LAYER_KINDS.get(kind, f"{kind!r} layers (only full and sliding-window attention are supported)")
                return f"it has {why}: layers {layers}"
        if "sliding_attention" in kinds and not isinstance(getattr(config, "sliding_window", None), int):
            return f"it has sliding-window layers without an integer sliding_window ({config.sliding_window!r})"
        if "chunked_attention" in kinds and not isinstance(getattr(config, "attention_chunk_size", None), int):
            return f"it has chunked layers without an integer attention_chunk_size ({config.attention_chunk_size!r})"
        flag = getattr(config, "use_bidirectional_attention", False) and not self.masks_ignore_bidirectional_flag
        if not getattr(config, "is_causal", True) or flag:
            return "its text model attends bidirectionally (is_causal=False or use_bidirectional_attention)"
        if ("token_type_ids" in inspect.signature(self.model.forward).parameters and self._vision_ids
                and not self.bidirectional_blocks):  # fmt: skip
            return ("its image tokens attend to each other bidirectionally (token_type_ids), a mask skip plans do "
                    "not reproduce")
        return None

    def vision_mask(self, input_ids: torch.Tensor | None, inputs: dict) -> torch.Tensor | None:
        """(batch, seq) bool, True at vision tokens; None when this call holds none."""
        ids = self.vision_token_ids()
        encoded = inputs.get("mm_encoder_outputs") or {}
        if not ids or not (
            any(inputs.get(name) is not None for name in self.pixel_inputs)
            or any(v is not None for v in encoded.values())
        ):
            return None
        if input_ids is None:
            raise SkipitError(
                "a skip plan needs input_ids to find the vision tokens: pass input_ids, not inputs_embeds"
            )
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))

    @staticmethod
    def check_positions(position_embeddings, layer: nn.Module) -> None:
        """Refuse rotary positions that `take_positions` cannot slice per token: here, anything but a real (cos, sin)
        pair."""
        pe = position_embeddings
        if not (isinstance(pe, (tuple, list)) and len(pe) == 2
                and all(isinstance(t, torch.Tensor) and not t.is_complex() for t in pe)):  # fmt: skip
            raise SkipitError(
                f"skip plans need {type(layer).__name__} to receive its rotary positions as a real (cos, sin) pair, "
                f"which keeps each token's position when tokens are dropped; got {type(pe).__name__}"
            )

    def check_call(self, inputs: dict, plan) -> None:
        """Refuse a forward call (its `inputs`) that `plan` cannot run exactly on this model; nothing here."""

    @staticmethod
    def take_positions(position_embeddings, index: torch.Tensor):
        """Keep the rotary (cos, sin) of the tokens at `index` (batch, n): their original positions."""
        rows = torch.arange(index.shape[0], device=index.device)[:, None]
        return tuple(t.expand(index.shape[0], *t.shape[1:])[rows, index] for t in position_embeddings)

    @staticmethod
    def _heads(attention: nn.Module, projected: torch.Tensor, norm: str) -> torch.Tensor:
        """(batch, heads, seq, head_dim) from a q or k projection (batch, seq, heads * head_dim), normed per head
        where the attention class norms them (`q_norm` / `k_norm`)."""
        x = projected.view(*projected.shape[:-1], -1, attention.head_dim)
        if isinstance(getattr(attention, norm, None), nn.Module):
            x = getattr(attention, norm)(x)
        return x.transpose(1, 2)

    @staticmethod
    def attention_parts(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(pre-attention norm, self-attention) of a decoder layer: enough to cache keys/values of frozen tokens."""
        try:
            return layer.input_layernorm, layer.self_attn
        except AttributeError:
            raise SkipitError(
                f"{type(layer).__name__} has no input_layernorm/self_attn, so late entry 'frozen' cannot run on it: "
                "use late_entry_mode 'absent'"
            ) from None

    def cache_keys_values(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> None:
        """Write the keys/values of `hidden` (tokens that keep their states) to the layer's cache.

        `kwargs` are the layer's: the cache (under `compat.cache_kwarg`'s name) and `position_embeddings` of exactly
        these tokens.
        """
        norm, attention = self.attention_parts(layer)
        x = norm(hidden)
        if type(attention).__name__ not in KEYS_VALUES_ONLY:
            attention(hidden_states=x, **kwargs)
            return
        keys = self._heads(attention, attention.k_proj(x), "k_norm")
        values = attention.v_proj(x).view(*x.shape[:-1], -1, attention.head_dim).transpose(1, 2)
        rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        _, keys = rotary(keys[:, :0], keys, *kwargs["position_embeddings"])  # no queries needed
        compat.get_cache(kwargs).update(keys, values, attention.layer_idx)

    def check_ranking(self, layer: nn.Module) -> None:
        """Refuse pruning by `layer`'s attention unless `last_query_attention` reproduces its attention class."""
        attention = self.attention_parts(layer)[1]
        if type(attention).__name__ not in KEYS_VALUES_ONLY:
            raise SkipitError(
                f"pruning vision tokens by attention is not supported for {type(attention).__name__} "
                f"(supported: {', '.join(sorted(KEYS_VALUES_ONLY))})"
            )

    def last_query_attention(self, layer: nn.Module, hidden: torch.Tensor, position_embeddings, valid: torch.Tensor,
                             last: torch.Tensor, window: int | None = None) -> torch.Tensor:  # fmt: skip
        """The attention weights (batch, seq) of each row's token `last` on the tokens of `hidden`, mean over heads,
        as `layer` computes them from its input `hidden` (what FastV ranks vision tokens by); `valid` masks padding,
        `window` is the layer's sliding window (None: full attention). `last` is a text token: no bidirectional block
        reaches it.

        Computed from the pre-attention norm, q/k projections and rotary, as the attention classes in
        `KEYS_VALUES_ONLY` do; so the layer itself keeps running under SDPA, which does not return weights.
        """
        norm, attention = self.attention_parts(layer)
        self.check_ranking(layer)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        x = norm(hidden)
        d = attention.head_dim
        query = self._heads(attention, attention.q_proj(x[rows, last][:, None]), "q_norm")  # (batch, heads, 1, d)
        keys = self._heads(attention, attention.k_proj(x), "k_norm")  # (batch, kv heads, seq, d)
        cos, sin = (t.expand(len(rows), *t.shape[1:]) for t in position_embeddings)
        rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        query, _ = rotary(query, query[:, :0], cos[rows, last][:, None], sin[rows, last][:, None])
        _, keys = rotary(keys[:, :0], keys, cos, sin)
        query = query.view(len(rows), keys.shape[1], -1, d)  # query heads grouped by the kv head they share
        scores = torch.einsum("bgqd,bgkd->bgqk", query.float(), keys.float()) * attention.scaling
        seq = torch.arange(hidden.shape[1], device=hidden.device)
        allowed = valid & (seq[None] <= last[:, None])
        if window is not None:
            allowed &= seq[None] > last[:, None] - window
        scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
        return scores.softmax(-1).mean((1, 2))
