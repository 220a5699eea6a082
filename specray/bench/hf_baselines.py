"""The transformers baselines: target-only `generate` and assisted generation with the same draft, batch 1.

A `TimingStreamer` (transformers' BaseStreamer) stamps every chunk `generate` pushes: one token per
step for target-only decoding, one verified block per round for assisted generation (so its τ is
tokens per chunk; transformers reports no drafted counts, so it has no α). EOS is switched off on the
loaded models, as `ignore_eos` on the specray side: every output is exactly max_tokens long.
Sampling matches specray's: temperature only (no top-k, top-p 1); request i is seeded seed + i."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from specray.bench.metrics import Measurement, Trace
from specray.bench.settings import AssistSetting
from specray.core.device import pick_device
from specray.core.loader import load_transformers_model, parse_dtype
from specray.core.sequence import SpecStats


class TimingStreamer(BaseStreamer):
    """Records each pushed chunk of new tokens into a Trace; the first push (the prompt) is skipped."""

    def __init__(self, trace: Trace):
        self.trace, self.prompt_seen = trace, False

    def put(self, value: torch.Tensor) -> None:  # value: [1, n] or [n] token ids
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.trace.add(time.perf_counter(), value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def load_model(path: str, dtype: str, device: str):
    """A transformers causal LM from an HF directory or a GGUF file, EOS off, in eval mode."""
    model = load_transformers_model(path)
    model.generation_config.eos_token_id = None
    device = pick_device(device)
    return model.to(device=device, dtype=parse_dtype(dtype, device)).eval()


def generation_config(max_tokens: int, temperature: float, pad_id: int) -> GenerationConfig:
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {}
    return GenerationConfig(max_new_tokens=max_tokens, pad_token_id=pad_id, **sampling)


def configure_assistant(assistant, setting: AssistSetting) -> None:
    """Set the draft length schedule where transformers reads it: the assistant's generation config
    (the heuristic schedule carries its K across calls, so each setting starts afresh)."""
    gc = assistant.generation_config
    gc.num_assistant_tokens = setting.num_assistant_tokens
    gc.num_assistant_tokens_schedule = setting.schedule
    gc.assistant_confidence_threshold = setting.threshold


@torch.inference_mode()
def run(model, prompts: list[list[int]], max_tokens: int, temperature: float, seed: int = 0, assistant=None,
        on_done: Callable[[], None] | None = None) -> Measurement:
    """One request at a time; assisted generation when given an assistant (its τ as speculation stats)."""
    config = generation_config(max_tokens, temperature, model.config.pad_token_id or 0)
    traces = []
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        torch.manual_seed(seed + i)
        ids = torch.tensor([prompt], device=model.device)  # [1, prompt_len]
        trace = Trace(time.perf_counter())
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                       assistant_model=assistant, streamer=TimingStreamer(trace))
        traces.append(trace)
        if on_done is not None:
            on_done()
    wall = time.perf_counter() - start
    if assistant is None:
        return Measurement(traces, wall)
    chunks, tokens = sum(len(t.sizes) for t in traces), sum(len(t.token_ids) for t in traces)
    return Measurement(traces, wall, SpecStats(num_steps=chunks, num_accepted_tokens=tokens - chunks))


def calibrate(model, assistant, prompts: list[list[int]], settings: tuple[AssistSetting, ...], max_tokens: int,
              temperature: float, seed: int = 0, on_done: Callable[[], None] | None = None
              ) -> list[tuple[AssistSetting, Measurement]]:
    """Every assisted setting on the calibration prompts (one untimed request first, to warm it up)."""
    out = []
    for setting in settings:
        configure_assistant(assistant, setting)
        run(model, prompts[:1], 4, temperature, seed, assistant)
        configure_assistant(assistant, setting)
        out.append((setting, run(model, prompts, max_tokens, temperature, seed, assistant, on_done)))
    return out
