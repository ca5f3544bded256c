"""Text generation for the server: a short decode loop with OpenAI's sampling parameters.

``TextGenerator.stream`` yields the text of one request in pieces as tokens come, then a
``Finished``. The loop is gpt-fast's shape: one prefill call, then one call per token on the KV
cache, sampling on the device with the request's own ``torch.Generator`` (seeded by ``seed``, or at
random), so an answer depends only on its request: a request answered alone or after others gives
the same text for the same seed. ``temperature == 0`` is greedy (the tokens of ``model.generate``
without sampling).

Text pieces. Each step decodes every generated id and hands out the new text, holding back (a) a
tail that could still become a stop string and (b) trailing U+FFFD characters (an incomplete
multi-byte character a later token may complete). The pieces of a request therefore concatenate to
its final text, with nothing lost or repeated. Generation ends at ``max_tokens``
(``finish_reason="length"``), at an end-of-sequence token or at a stop string (``"stop"``; the
stop string itself is not returned).
"""

from __future__ import annotations

import inspect
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..errors import ConfigError

#: The plain chat template for models without one of their own (a byte-level model, the embedded
#: model): each message on its own line as ``role: content``, then ``assistant:`` for the reply.
PLAIN_CHAT_TEMPLATE_DOC = "'{role}: {content}\\n' per message, then 'assistant:'"


def plain_chat_prompt(messages: list[dict[str, str]]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Finished:
    """The end of a request's text: why it ended, and the token counts."""

    finish_reason: str          # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from a (vocab,) logits row: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))  # the first one always stays
        pick = torch.multinomial(sorted_p, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` must wait: a stop string's beginning, or U+FFFD."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    k = len(text)
    while k > 0 and text[k - 1] == "\ufffd":
        k -= 1
    return max(hold, len(text) - k)


class TextGenerator:
    """Generates for one request at a time (the server's worker thread calls ``stream``).

    ``lock`` is held around each model call, so readers of the runtime's counters (``/metrics``)
    never see a half-updated step.
    """

    def __init__(self, model: Any, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                 tokenizer: Any = None, max_context: int | None = None):
        self.model = model
        self.encode = encode
        self.decode = decode
        self.tokenizer = tokenizer
        cfg = model.config
        limit = getattr(cfg, "max_position_embeddings", None)
        if max_context is not None and limit is not None and max_context > limit:
            raise ConfigError(f"--max-context {max_context} exceeds the model's {limit} positions; use at most {limit}")
        self.max_context = int(max_context or limit or 2048)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(cfg, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()
        # transformers >= 5.2x names the KV cache argument and output ``cache``, earlier releases ``past_key_values``
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None) is not None

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The model's chat template where it has one, else ``plain_chat_prompt``."""
        if self.has_chat_template:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return self.encode(plain_chat_prompt(messages))

    @torch.no_grad()
    def stream(self, prompt_ids: list[int], params: SamplingParams,
               cancelled: Callable[[], bool] = lambda: False) -> Iterator[str | Finished]:
        """Text pieces, then one ``Finished``. Stops early (without ``Finished``) once ``cancelled()``."""
        if not prompt_ids:
            raise ConfigError("the prompt is empty; send at least one token")
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        x = torch.tensor([prompt_ids], device=self.device)
        ids: list[int] = []
        text = ""
        sent = 0
        cache = None
        finish = "length"
        for _ in range(params.max_tokens):
            if cancelled():
                return
            with self.lock:
                out = self.model(input_ids=x, use_cache=True, **{self.cache_arg: cache})
                cache = getattr(out, self.cache_arg)
                token = sample_next(out.logits[0, -1], params.temperature, params.top_p, gen)
            if token in self.eos_ids:
                finish = "stop"
                break
            ids.append(token)
            text = self.decode(ids)
            hits = [i for i in (text.find(s) for s in params.stop) if i >= 0]
            if hits:
                text = text[:max(min(hits), sent)]  # the stop string is not part of the answer
                finish = "stop"
                break
            ready = len(text) - _held_back(text, params.stop)
            if ready > sent:
                yield text[sent:ready]
                sent = ready
            x = torch.tensor([[token]], device=self.device)
        if len(text) > sent:
            yield text[sent:]
        yield Finished(finish, len(prompt_ids), len(ids))
