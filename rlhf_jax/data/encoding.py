"""Encoding with a Hugging Face tokenizer: the pad != eos contract, vocabulary checks, chat templates.

Helpers shared by the tokenize_* functions. Plain-string prompts get the tokenizer's
BOS (if it prepends one by default) and are encoded without other special tokens; the
spelling of a special token inside a plain text (a literal ``<|endoftext|>`` in a web
page or a user's prompt) is encoded as ordinary text, never as the control token.
Dialogues are rendered with the tokenizer's chat template, whose text carries its own
special tokens; a message whose content spells a special token cannot be told apart
from them, so that dialogue is dropped (``special_token_in_text``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_ENCODE_CHUNK = 1024


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """Returns (pad_id, eos_id); both must exist and differ (EOS must stay visible)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token")
    if pad is None:
        raise ValueError(f"the tokenizer has no pad_token_id; add a pad token distinct from eos (id {eos})")
    if pad == eos:
        raise ValueError(
            f"pad_token_id ({pad}) == eos_token_id ({eos}): padding would hide the real EOS; add a distinct pad token"
        )
    return int(pad), int(eos)


def check_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Checks that a tokenizer fits a model's embedding table.

    Args:
      tokenizer: the tokenizer the data is encoded with.
      vocab_size: the model's ``ModelConfig.vocab_size``.

    Raises:
      ValueError: if ``len(tokenizer) > vocab_size``, if pad / eos / bos ids are out of
        ``[0, vocab_size)``, if pad or eos is missing, or if pad == eos.
    """
    pad, eos = special_ids(tokenizer)
    n = len(tokenizer)
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    for name, tid in (("pad", pad), ("eos", eos), ("bos", tokenizer.bos_token_id)):
        if tid is not None and not 0 <= tid < vocab_size:
            raise ValueError(f"{name}_token_id {tid} is outside the model's vocabulary [0, {vocab_size})")


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, literal: bool = True) -> list[list[int]]:
    """Encodes texts without added special tokens, in batched calls.

    Args:
      tokenizer: the tokenizer.
      texts: the texts.
      literal: True for data text: a special token's spelling in it is split like any
        other text (``split_special_tokens``); False for chat-template renderings, whose
        special-token spellings are the template's control tokens.
    """
    out: list[list[int]] = []
    for i in range(0, len(texts), _ENCODE_CHUNK):
        chunk = list(texts[i : i + _ENCODE_CHUNK])
        enc = tokenizer(chunk, add_special_tokens=False, split_special_tokens=literal)
        out.extend(list(x) for x in enc["input_ids"])
    return out


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[bos] if the tokenizer puts a BOS in front of plain text by default (Llama), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    if with_special[:1] == [bos] and with_special[1 : 1 + len(without)] == without:
        return [int(bos)]
    return []


class DropExample(Exception):
    """An example that cannot be tokenised; ``reason`` is its SkipReport key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages``.

    Raises:
      DropExample: ``special_token_in_text`` if a message's content spells one of the
        tokenizer's special tokens (it would become that control token, e.g. an EOS in
        the middle of a turn), ``chat_template_error`` if the template rejects them.
    """
    from jinja2 import TemplateError

    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("records use 'messages' but the tokenizer has no chat_template")
    specials = [t for t in tokenizer.all_special_tokens if t]
    if any(t in m["content"] for m in messages for t in specials):
        raise DropExample("special_token_in_text")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, ValueError):
        raise DropExample("chat_template_error") from None
    return text


def prompt_ids(tokenizer: PreTrainedTokenizerBase, records: Sequence[dict]) -> list[list[int] | str]:
    """Prompt token ids per record (a drop reason string where rendering failed).

    String prompts: BOS prefix (if the tokenizer uses one) + encode(prompt). Dialogue
    prompts: the chat template rendered with ``add_generation_prompt=True``, encoded.
    """
    bos = bos_prefix(tokenizer)
    out: list[Any] = [None] * len(records)
    rendered, plain = [], []  # (record index, text)
    for i, rec in enumerate(records):
        if rec.get("messages") is None:
            plain.append((i, rec["prompt"]))
            continue
        try:
            rendered.append((i, render(tokenizer, rec["messages"], add_generation_prompt=True)))
        except DropExample as d:
            out[i] = d.reason
    for group, prefix, literal in ((plain, bos, True), (rendered, [], False)):
        for (i, _), ids in zip(group, encode(tokenizer, [t for _, t in group], literal=literal)):
            out[i] = prefix + ids
    return out


def dialogue_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered dialogue and a 0/1 target mask over its assistant turns.

    The span of assistant turn i is the tokens added between
    ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])``.
    """
    texts = [render(tokenizer, messages, add_generation_prompt=False)]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns:
        if i == 0:
            raise DropExample("chat_template_error")
        texts.append(render(tokenizer, messages[:i], add_generation_prompt=True))
        texts.append(render(tokenizer, messages[: i + 1], add_generation_prompt=False))
    enc = encode(tokenizer, texts, literal=False)
    ids, mask = enc[0], [0] * len(enc[0])
    for j in range(len(turns)):
        before, after = enc[1 + 2 * j], enc[2 + 2 * j]
        if len(after) < len(before) or ids[: len(before)] != before or ids[: len(after)] != after:
            raise DropExample("chat_template_not_incremental")
        mask[len(before) : len(after)] = [1] * (len(after) - len(before))
    return ids, mask
