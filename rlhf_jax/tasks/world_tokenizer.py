"""The built-in world's tokenizer: one token per word of its language, and a chat template.

A word-level ``tokenizers`` model trained on the world's text, rebuilt with a sorted
vocabulary so the same world always has the same ids, wrapped as a
``transformers.PreTrainedTokenizerFast`` with ``<pad>`` (id 0), ``<eos>`` (id 1) and
single-token role markers. :meth:`rlhf_jax.tasks.world.World.build_tokenizer` gathers
the text and calls :func:`train_word_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhf_jax.tasks.world_lang import all_words

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "train_word_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>")
#: Role markers are single tokens; an assistant turn ends with ``<eos>``.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} <eos> "
    "{% else %}<|system|> {{ m['content'] }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def train_word_tokenizer(texts: list[str], out_dir: str | Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on ``texts`` (which hold every word of the language), saved to ``out_dir``.

    Every word of ``texts`` is one token; ``<pad>`` (id 0) and ``<eos>`` (id 1) differ; the
    chat template renders ``<|user|> ... <|assistant|> ... <eos>`` and supports
    ``add_generation_prompt``. Saved with ``save_pretrained(out_dir)``.
    """
    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(vocab_size=1000, min_frequency=1, special_tokens=list(SPECIAL_TOKENS))
    core.train_from_iterator(texts, trainer=trainer)
    # The trainer orders words by frequency; rebuild with a sorted vocabulary so ids do not depend on
    # how ties in frequency are broken (the same world always has the same ids).
    words = sorted(w for w in core.get_vocab() if w not in SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + tuple(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    missing = [w for w in all_words() if w not in vocab]
    if missing:  # pragma: no cover - all_words() is part of the training text
        raise RuntimeError(f"tokenizer is missing words of the language: {missing}")
    tok.save_pretrained(str(out_dir))
    return tok
