"""The `skipit` model for lmms-eval: any model skipit supports, optionally under a skip plan, answering greedily.

    lmms-eval --model skipit --model_args pretrained=PATH,plan=plan.json --tasks ... --batch_size 8

model_args: ``pretrained`` (a folder saved with save_pretrained() or a hub id; default: the embedded mini-llava,
built on first use), ``plan`` (a plan JSON made for that checkpoint; default: none), ``dtype`` (default float32),
``max_new_tokens`` (when the task does not set it; default 128).

Prompts and inputs come from `skipit.prompts`, as in skipit's own evaluation: one user turn holding the request's
images and then the task's text, rendered with the processor's chat template, generation prompt added. Batches are
the requests in the order lmms-eval gives them (documents in order), left-padded and decoded greedily, so
`--batch_size B` forms the same batches as `vqa.evaluate(..., batch_size=B)` on the same records.
"""

from __future__ import annotations

import torch
from lmms_eval.api.model import lmms
from loguru import logger  # lmms-eval's own logger
from PIL import Image
from tqdm import tqdm

from skipit import models, prompts
from skipit.errors import SkipitError
from skipit.plan import Plan
from skipit.skipping import apply_plan


class SkipitLMM(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        plan: str | None = None,
        dtype: str = "float32",
        max_new_tokens: int = 128,
        batch_size: int | str | None = 1,
        device: str | None = None,
        max_batch_size: int | None = None,  # lmms-eval passes it to every model; batches here are fixed-size
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise SkipitError(
                f"unknown model_args for skipit: {', '.join(sorted(kwargs))} "
                "(it takes pretrained, plan, dtype, max_new_tokens)"
            )
        if pretrained is None:
            from skipit.demo.build import ensure_built

            pretrained = ensure_built()
        torch_dtype = models.torch_dtype(dtype)
        if torch_dtype is None:
            raise SkipitError(f"dtype must name a torch dtype such as float32 or bfloat16, got {dtype!r}")
        try:
            self.batch_size = int(batch_size or 1)
        except ValueError:
            raise SkipitError(f"skipit needs a whole-number --batch_size, got {batch_size!r}") from None
        self.pretrained = str(pretrained)
        self.max_new_tokens = int(max_new_tokens)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.processor = models.load(self.pretrained, dtype=torch_dtype, device=str(self._device))
        self.plan = Plan.load(plan) if plan else None
        if self.plan is not None:
            apply_plan(self.model, self.plan)
        self.text_only = prompts.is_text_only(self.processor)  # a tokenizer: skipit's causal LMs
        self._warned_sampling = False

    @property
    def device(self) -> torch.device:
        return self._device

    # -- prompts and batches ------------------------------------------------------------------------------------

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list[Image.Image]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        visuals = [v for v in (visuals or []) if v is not None]
        if any(not isinstance(v, Image.Image) for v in visuals):
            kinds = sorted({type(v).__name__ for v in visuals if not isinstance(v, Image.Image)})
            raise SkipitError(f"task {task!r} gives {', '.join(kinds)} visuals: the skipit model takes images only")
        if visuals and self.text_only:
            raise SkipitError(f"task {task!r} gives images, but {self.pretrained} is a text-only model")
        return [v.convert("RGB") for v in visuals]

    def prompt(self, text: str, n_images: int) -> str:
        """The chat-templated prompt: one user turn with `n_images` images, then `text` (`prompts.chat_text`)."""
        return prompts.chat_text(self.processor, text, n_images)

    def _inputs(self, texts: list[str], images: list[Image.Image]) -> dict:
        return prompts.model_inputs(self.processor, texts, images, device=self._device, dtype=self.model.dtype)

    @torch.inference_mode()
    def _generate(self, texts: list[str], images: list[Image.Image], max_new_tokens: int) -> list[str]:
        inputs = self._inputs(texts, images)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new, skip_special_tokens=True)

    def _batches(self, args: list[tuple]):
        """Runs of consecutive requests with the same task, split and generation settings, at most batch_size long."""
        batch, key = [], None
        for i, a in enumerate(args):
            k = (a[4], a[5], repr(sorted(a[1].items())))
            if batch and (k != key or len(batch) == self.batch_size):
                yield batch
                batch = []
            batch.append(i)
            key = k
        if batch:
            yield batch

    # -- lmms-eval's interface ----------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        args = [r.args for r in requests]
        results: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), disable=self.rank != 0, desc="skipit")
        for batch in self._batches(args):
            gen_kwargs = dict(args[batch[0]][1])
            sampling = gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0
            if sampling and not self._warned_sampling:
                logger.warning("the skipit model answers greedily: sampling settings are ignored")
                self._warned_sampling = True
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else [s for s in until if s]
            max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            texts, images = [], []
            for i in batch:
                context, _, doc_to_visual, doc_id, task, split = args[i]
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
                texts.append(self.prompt(context, len(visuals)))
                images += visuals
            for i, text in zip(batch, self._generate(texts, images, max_new_tokens), strict=True):
                for stop in until:
                    text = text.split(stop, 1)[0]
                results[i] = text.strip()
                self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), results[i])
            bar.update(len(batch))
        bar.close()
        return results

    @torch.inference_mode()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Sum of the continuation's token log-probabilities after the prompt, and whether greedy decoding gives it."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="skipit"):
            context, target, doc_to_visual, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            images = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = self.prompt(context, len(images))
            n_prompt = self._inputs([prompt], images)["input_ids"].shape[1]
            inputs = self._inputs([prompt + continuation], images)
            ids = inputs["input_ids"][0, n_prompt:]
            if ids.numel() == 0:
                results.append((0.0, True))
                continue
            logits = self.model(**inputs).logits[0, n_prompt - 1:-1].float()
            logprob = logits.log_softmax(-1).gather(-1, ids[:, None]).sum()
            results.append((float(logprob), bool((logits.argmax(-1) == ids).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the skipit model does not do multi-round generation")
