"""The built-in synthetic instruction-following world that ``rlhf-jax demo`` runs.

A small language (about 75 words: nouns, digits, colours, grammar, instruction and filler
words; see :mod:`rlhf_jax.tasks.world_lang`), a plain-text pretraining corpus in it,
simulated users who ask for five instruction families (reverse, sort, repeat, replace,
count) in their own phrasing style, labelers who write demonstrations with realistic
errors, and a hidden gold preference (correct, concise, properly ended answers; see
:mod:`rlhf_jax.tasks.world_labels`) that labelers rank samples by through Thurstone
noise calibrated to InstructGPT's ~73% inter-labeler agreement. Pure Python + numpy,
deterministic from ``WorldConfig.seed`` (every knob: :mod:`rlhf_jax.tasks.world_config`;
the word-level tokenizer and chat template: :mod:`rlhf_jax.tasks.world_tokenizer`)::

    world = World(WorldConfig(seed=0))
    tok = world.build_tokenizer(run_dir / "tokenizer")
    paths = world.write_files(run_dir / "data")       # pretrain, heldout, demos, prompts
    ...                                              # SFT, then sample K per prompt
    recs = world.rankings(prompts, samples, user_ids, seed=1)
    world.gold_score(prompt, response)               # the judge the RM never sees

Every prompt ends with ``.`` or ``?``, so plain ``{"prompt", "response"}`` records keep
the prompt/response boundary visible; ``write_files(chat=True)`` writes ``{"messages"}``
records for the chat template instead.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Collection, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rlhf_jax.tasks import world_labels as wl
from rlhf_jax.tasks.world_config import WorldConfig
from rlhf_jax.tasks.world_lang import (
    NOUN_GROUPS,
    STYLES,
    all_words,
    answer_words,
    corpus_doc,
    correct_answer,
    family_of,
    make_prompt,
)
from rlhf_jax.tasks.world_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, train_word_tokenizer

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "World", "WorldConfig", "correct_answer", "family_of"]


def _text_seed(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


class World:
    """The synthetic world of one :class:`WorldConfig`; every method is deterministic in it."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config if config is not None else WorldConfig()
        self._prompts: list[dict] | None = None

    # ------------------------------------------------------------------------- text and prompts

    def pretraining_corpus(self, n: int, split: str = "train") -> list[dict]:
        """``n`` plain-text documents ``{"text"}`` (no instructions) of at most 40 words.

        ``split="train"`` and ``"heldout"`` are independent streams (for the held-out
        pretraining loss of the alignment-tax measurement); the first ``m`` documents do
        not depend on ``n``.
        """
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        rng = np.random.default_rng([self.config.seed, 1, 0 if split == "train" else 1])
        return [{"text": corpus_doc(rng)} for _ in range(n)]

    def users(self) -> list[dict]:
        """Per user: ``{"user_id", "style", "family_probs" [F], "group_probs" [G]}``."""
        cfg = self.config
        out = []
        for u in range(cfg.num_users):
            rng = np.random.default_rng([cfg.seed, 2, u])
            out.append(
                {
                    "user_id": f"u{u:03d}",
                    "style": STYLES[int(rng.integers(len(STYLES)))],
                    "family_probs": rng.dirichlet(np.full(len(cfg.families), cfg.family_concentration)),
                    "group_probs": rng.dirichlet(np.ones(len(NOUN_GROUPS))),
                }
            )
        return out

    def prompts(self) -> list[dict]:
        """All prompts, ``{"prompt", "user_id", "family"}``, user by user, no two equal.

        Each user asks ``prompts_per_user`` prompts, of families drawn from their own
        preference, in their own style (``terse`` "reverse : ...", ``polite`` "please
        reverse ...", ``question`` "can you reverse ... ?") with probability
        ``main_style_prob``, and about their favourite noun groups.
        """
        if self._prompts is None:
            cfg, seen, rows = self.config, set(), []
            for user in self.users():
                rng = np.random.default_rng([cfg.seed, 3, int(user["user_id"][1:])])
                count = misses = 0
                while count < cfg.prompts_per_user:
                    if misses > 100 * cfg.prompts_per_user:
                        raise ValueError(
                            f"WorldConfig: cannot find {cfg.num_users * cfg.prompts_per_user} distinct "
                            f"prompts of families {cfg.families}; ask for fewer"
                        )
                    family = cfg.families[int(rng.choice(len(cfg.families), p=user["family_probs"]))]
                    style = user["style"] if rng.random() < cfg.main_style_prob else STYLES[int(rng.integers(3))]
                    prompt = make_prompt(family, style, rng, user["group_probs"], cfg.list_len)
                    if prompt not in seen:
                        seen.add(prompt)
                        rows.append({"prompt": prompt, "user_id": user["user_id"], "family": family})
                        count += 1
                    else:
                        misses += 1
            self._prompts = rows
        return [dict(r) for r in self._prompts]

    # ------------------------------------------------------------------------- labelers

    def demonstrations(self, prompts: Sequence[dict | str]) -> list[dict]:
        """Labeler-written answers ``{"prompt", "response", "user_id", "error"}``.

        A fraction ``demo_error_rate`` (in expectation) has one error (``error`` names its
        kind; ``"none"`` otherwise); of the rest, a fraction ``demo_filler_rate`` is wrapped
        in filler (``error`` "prefix" or "suffix"). Each prompt's demonstration depends only
        on the seed and the prompt text, not on which other prompts are passed.
        """
        out = []
        for p in prompts:
            rec = {"prompt": p} if isinstance(p, str) else p
            rng = np.random.default_rng([self.config.seed, 4, _text_seed(rec["prompt"])])
            words, kind = answer_words(rec["prompt"]), "none"
            if rng.random() < self.config.demo_error_rate:
                words, kind = wl.with_error(words, rng)
            elif self.config.demo_filler_rate > 0 and rng.random() < self.config.demo_filler_rate:
                kind = "prefix" if rng.random() < 0.5 else "suffix"
                words = wl.corrupt(words, kind, rng)
            out.append(
                {"prompt": rec["prompt"], "response": " ".join(words), "user_id": rec.get("user_id"), "error": kind}
            )
        return out

    def synthetic_responses(
        self,
        prompt: str,
        k: int,
        rng: np.random.Generator,
        *,
        error_rate: float = 0.5,
        second_error_rate: float = 0.3,
        salad_rate: float = 0.1,
    ) -> list[str]:
        """K responses of SFT-sample quality: the correct answer, one or two labeler-style errors, or word salad.

        The pools labeler agreement is calibrated on; also a model-free stand-in for
        samples in quick tests.
        """
        answer, out = answer_words(prompt), []
        for _ in range(k):
            if rng.random() < salad_rate:
                out.append(wl.word_salad(rng))
                continue
            words = answer
            if rng.random() < error_rate:
                words = wl.with_error(words, rng)[0]
                if rng.random() < second_error_rate:
                    words = wl.with_error(words, rng)[0]
            out.append(" ".join(words))
        return out

    def gold_score(self, prompt: str, response: str, *, ended: bool | None = None) -> float:
        """The hidden gold preference of ``response`` to ``prompt``: higher is better, in [-2.3, 1].

        ``2 * correctness - 1`` (partial credit by word edit distance) minus style
        penalties for filler words, filler after the answer, and a cut response (no
        ``<eos>`` in it and ``ended=False``). A correct, concise answer scores 1.
        """
        correctness, style = wl.gold_parts(prompt, response, self.config.gold_weights, ended=ended)
        return correctness + style

    def rank(
        self,
        prompt: str,
        responses: Sequence[str],
        rng: np.random.Generator,
        *,
        labeler: int | None = None,
        ended: Sequence[bool] | None = None,
    ) -> list[int]:
        """One labeler's ranks of K responses (0 = best; identical responses tie).

        Thurstone: each distinct response gets ``correctness + m_l * style + sigma * N(0, 1)``
        (``m_l`` labeler ``labeler``'s weight on style; 1 for ``labeler=None``).
        ``ended[i] = False`` marks a response cut at the length limit.
        """
        cfg = self.config
        m = wl.labeler_style_weight(cfg.seed, labeler, cfg.labeler_spread)
        utilities: dict[str, float] = {}
        for i, r in enumerate(responses):
            c, s = wl.gold_parts(prompt, r, cfg.gold_weights, ended=None if ended is None else ended[i])
            utilities.setdefault(r, c + m * s)
        return wl.thurstone_ranks(list(responses), utilities, cfg.labeler_sigma, rng)

    def rankings(
        self,
        prompts: Sequence[str],
        responses: Sequence[Sequence[str]],
        user_ids: Sequence[str | None],
        seed: int,
        *,
        ended: Sequence[Sequence[bool]] | None = None,
    ) -> list[dict]:
        """Ranking records ``{"prompt", "responses", "ranks", "user_id", "labeler"}`` (design.md format).

        Each group is ranked by one labeler drawn from ``num_labelers`` (see :meth:`rank`;
        ``ended[i][j] = False`` marks response j of group i as cut at the length limit).
        Groups whose responses are all identical carry no ordered pair and are left out
        (the loader would reject them), so the result can be shorter than ``prompts``.
        """
        if not len(prompts) == len(responses) == len(user_ids):
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} response groups, {len(user_ids)} user ids")
        rng = np.random.default_rng([self.config.seed, 5, seed])
        out = []
        for i, (prompt, group, user) in enumerate(zip(prompts, responses, user_ids)):
            if len(group) < 2:
                raise ValueError(f"a ranking needs K >= 2 responses, got {len(group)} for {prompt!r}")
            labeler = int(rng.integers(self.config.num_labelers))
            ranks = self.rank(prompt, group, rng, labeler=labeler, ended=None if ended is None else ended[i])
            if len(set(ranks)) > 1:
                out.append(
                    {"prompt": prompt, "responses": list(group), "ranks": ranks, "user_id": user, "labeler": labeler}
                )
        return out

    def _two_labelers(self, prompts, responses, seed: int):
        rng = np.random.default_rng([self.config.seed, 6, seed])
        for prompt, group in zip(prompts, responses):
            a, b = (int(x) for x in rng.choice(self.config.num_labelers, 2, replace=False))
            yield group, self.rank(prompt, group, rng, labeler=a), self.rank(prompt, group, rng, labeler=b), prompt

    def labeler_agreement(self, prompts: Sequence[str], responses: Sequence[Sequence[str]], seed: int) -> float:
        """Fraction of pairs of distinct responses that two independent labelers order the same way."""
        agree = total = 0
        for group, ra, rb, _ in self._two_labelers(prompts, responses, seed):
            a, t = wl.pair_agreement(group, ra, rb)
            agree, total = agree + a, total + t
        return agree / max(total, 1)

    def labeler_accuracy(self, prompts: Sequence[str], responses: Sequence[Sequence[str]], seed: int) -> float:
        """Fraction of pairs with distinct gold scores that one labeler orders like the gold preference."""
        agree = total = 0
        for group, ra, _, prompt in self._two_labelers(prompts, responses, seed):
            gold = [self.gold_score(prompt, r) for r in group]
            ranks = [sorted(set(gold), reverse=True).index(g) for g in gold]  # gold order as ranks, ties shared
            a, t = wl.pair_agreement(group, ra, ranks)
            agree, total = agree + a, total + t
        return agree / max(total, 1)

    # ------------------------------------------------------------------------- files

    def build_tokenizer(self, out_dir: str | Path):
        """A word-level tokenizer trained with ``tokenizers`` on the corpus and all task text.

        Every word of the language is one token; ``<pad>`` (id 0) and ``<eos>`` (id 1)
        differ; the chat template renders ``<|user|> ... <|assistant|> ... <eos>`` and
        supports ``add_generation_prompt``. Saved with ``save_pretrained(out_dir)``.

        Returns:
          a ``transformers.PreTrainedTokenizerFast``.
        """
        texts = [d["text"] for d in self.pretraining_corpus(min(self.config.pretrain_docs, 5000))]
        prompts = self.prompts()
        texts += [p["prompt"] for p in prompts] + [d["response"] for d in self.demonstrations(prompts)]
        texts.append(" ".join(all_words()))
        return train_word_tokenizer(texts, out_dir)

    def write_files(
        self, out_dir: str | Path, *, chat: bool = False, demo_users: Collection[str] | None = None
    ) -> dict[str, Path]:
        """Writes the world's data sets as JSONL in design.md's formats; returns their paths.

        ``pretrain`` / ``pretrain_heldout`` (``{"text"}``), ``demonstrations``
        (``{"prompt", "response", "user_id", "error"}``, one per prompt of the users in
        ``demo_users``, default every user) and ``prompts`` (``{"prompt", "user_id",
        "family"}``, every prompt); with ``chat=True`` prompts and demonstrations are
        ``{"messages"}`` dialogues instead. ``world`` is the config as JSON. Split by
        ``user_id`` downstream (SFT / RM / PPO / held-out users); pass ``demo_users`` to
        keep held-out users' demonstrations out of the file altogether.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        prompts = self.prompts()
        demos = self.demonstrations([p for p in prompts if demo_users is None or p["user_id"] in demo_users])
        if chat:
            demos = [
                {
                    "messages": [
                        {"role": "user", "content": d["prompt"]},
                        {"role": "assistant", "content": d["response"]},
                    ],
                    "user_id": d["user_id"],
                    "error": d["error"],
                }
                for d in demos
            ]
            prompts = [
                {"messages": [{"role": "user", "content": p["prompt"]}], "user_id": p["user_id"], "family": p["family"]}
                for p in prompts
            ]
        rows = {
            "pretrain": self.pretraining_corpus(cfg.pretrain_docs, "train"),
            "pretrain_heldout": self.pretraining_corpus(cfg.heldout_docs, "heldout"),
            "demonstrations": demos,
            "prompts": prompts,
        }
        paths = {}
        for name, recs in rows.items():
            paths[name] = out / f"{name}.jsonl"
            paths[name].write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
        paths["world"] = out / "world.json"
        paths["world"].write_text(json.dumps(asdict(cfg), indent=1) + "\n", encoding="utf-8")
        return paths
