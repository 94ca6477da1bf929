"""Several rewards in one score (Sparrow, Glaese et al. 2022): reward models plus rule rewards.

The PPO score of a response is a weighted sum of components::

    score(x, y) = sum_i w_i * r_i(x, y)

where each ``r_i`` is a reward model (a scalar-head ``CausalLM`` read at the last real
token, ``reward.score_sequences``) or a **rule reward**: a pure, jit-able function

    rule(prompt_ids [B, P], response_ids [B, R], response_mask [B, R]) -> [B]

of the token ids (prompts left-padded with the tokenizer's pad token; ``response_mask`` is 1
up to and including the EOS). :class:`RewardSum` holds the components; :func:`load_rule`
imports a rule named ``"module:function"`` (``rlhf-jax ppo --rule-reward``) with importlib,
never eval. Three rules ship as examples: :func:`length_penalty`,
:func:`repetition_penalty`, and the factory :func:`banned_tokens` (bind its token ids in
your own module: ``no_urls = rewards.banned_tokens([1234, 5678])``, then
``--rule-reward my_module:no_urls``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.reward import score_sequences

RuleFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

__all__ = ["RewardSum", "load_rule", "length_penalty", "repetition_penalty", "banned_tokens"]


# ----------------------------------------------------------------------------- example rules


def length_penalty(prompt_ids: jax.Array, response_ids: jax.Array, response_mask: jax.Array) -> jax.Array:
    """Minus the response length as a fraction of the limit: ``-sum_t m_t / R``, in [-1, 0].

    A brake on length drift (reward models often prefer longer answers); weigh it with
    ``--reward-weights``.

    >>> m = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    >>> print(length_penalty(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 4), jnp.int32), m))
    [-0.5 -1. ]
    """
    chex.assert_rank([prompt_ids, response_ids, response_mask], 2)
    mask = jnp.asarray(response_mask).astype(jnp.float32)
    return 0.0 - jnp.sum(mask, axis=1) / mask.shape[1]


def repetition_penalty(prompt_ids: jax.Array, response_ids: jax.Array, response_mask: jax.Array) -> jax.Array:
    """Minus the fraction of real response tokens that repeat the token just before them.

    ``-#{t >= 1: m_t = 1, y_t = y_{t-1}} / max(1, sum_t m_t)``: 0 for a response without
    immediate repeats, close to -1 for a degenerate loop of one token.

    >>> ids = jnp.array([[5, 5, 5, 6], [5, 6, 7, 0]])
    >>> m = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    >>> print(repetition_penalty(jnp.zeros((2, 1), jnp.int32), ids, m))
    [-0.5  0. ]
    """
    chex.assert_rank([prompt_ids, response_ids, response_mask], 2)
    chex.assert_equal_shape([response_ids, response_mask])
    real = jnp.asarray(response_mask) != 0
    repeats = (response_ids[:, 1:] == response_ids[:, :-1]) & real[:, 1:] & real[:, :-1]  # [B, R-1]
    n = jnp.maximum(jnp.sum(real, axis=1), 1).astype(jnp.float32)
    return 0.0 - jnp.sum(repeats, axis=1).astype(jnp.float32) / n  # 0.0 - x: no -0.0


def banned_tokens(token_ids: Sequence[int], *, penalty: float = 1.0) -> RuleFn:
    """A rule: ``-penalty`` for every real response token that is one of ``token_ids``.

    A factory, because the ids belong to your tokenizer: bind them in your own module
    (``no_digits = rewards.banned_tokens([17, 18, 19])``) and name that with
    ``--rule-reward my_module:no_digits``.

    >>> rule = banned_tokens([7, 9], penalty=0.5)
    >>> ids, m = jnp.array([[7, 3, 9, 7]]), jnp.array([[1, 1, 1, 0]])  # the last 7 is padding
    >>> print(rule(jnp.zeros((1, 2), jnp.int32), ids, m))
    [-1.]
    """
    banned = tuple(int(t) for t in token_ids)
    if not banned:
        raise ValueError("banned_tokens: give at least one token id")

    def banned_token_penalty(prompt_ids: jax.Array, response_ids: jax.Array, response_mask: jax.Array) -> jax.Array:
        chex.assert_equal_shape([response_ids, response_mask])
        hits = jnp.isin(response_ids, jnp.asarray(banned, response_ids.dtype)) & (jnp.asarray(response_mask) != 0)
        return 0.0 - penalty * jnp.sum(hits, axis=1).astype(jnp.float32)

    return banned_token_penalty


# ----------------------------------------------------------------------------- loading and combining


def load_rule(spec: str) -> RuleFn:
    """The rule function named ``"package.module:function"`` (importlib; no eval).

    Raises:
      ValueError: a malformed spec, a module that cannot be imported, a missing attribute,
        or something that cannot be called as ``f(prompt_ids, response_ids, response_mask)``;
        the message names ``spec``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"rule reward {spec!r}: expected 'module:function', e.g. 'rlhf_jax.rewards:length_penalty'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"rule reward {spec!r}: cannot import module {module_name!r}: {e}") from e
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"rule reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"rule reward {spec!r}: {attr!r} is not callable")
    try:
        inspect.signature(fn).bind(None, None, None)
    except TypeError as e:
        raise ValueError(f"rule reward {spec!r}: must take (prompt_ids, response_ids, response_mask): {e}") from e
    except ValueError:  # no signature available (some builtins): let the call decide
        pass
    return fn


@dataclasses.dataclass(frozen=True)
class RewardSum:
    """``score = sum_i weights[i] * component_i`` over reward models, then rule rewards.

    Attributes:
      models: scalar-head reward models (anything ``reward.score_sequences`` can read).
      rules: rule functions ``(prompt_ids [B,P], response_ids [B,R], response_mask [B,R]) -> [B]``.
      weights: one per model then per rule; None: all 1.
      names: one per component (metrics ``objective/scores/<name>``); None: ``rm``, ``rm1``,
        ... for models and each rule's ``__name__``.

    Params are a tuple, one tree per model, in order (rules have none).
    """

    models: tuple = ()
    rules: tuple = ()
    weights: tuple[float, ...] | None = None
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "rules", tuple(self.rules))
        n = len(self.models) + len(self.rules)
        if n == 0:
            raise ValueError("RewardSum: at least one reward model or rule reward is needed")
        weights = (1.0,) * n if self.weights is None else tuple(float(w) for w in self.weights)
        if len(weights) != n:
            raise ValueError(f"RewardSum: {len(weights)} weights for {n} components")
        names = self.names
        if names is None:
            names = [("rm" if i == 0 else f"rm{i}") for i in range(len(self.models))]
            names += [getattr(r, "__name__", f"rule{i}") for i, r in enumerate(self.rules)]
        names = unique_names(names)
        if len(names) != n:
            raise ValueError(f"RewardSum: {len(names)} names for {n} components")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "names", names)

    def components(
        self, params: Sequence[Any], sequences: jax.Array, sequence_mask: jax.Array, prompt_len: int
    ) -> dict[str, jax.Array]:
        """Each component's unweighted score ``[B]`` by name, for prompt + response ``[B, P+R]``."""
        if len(params) != len(self.models):
            raise ValueError(f"RewardSum: {len(params)} param trees for {len(self.models)} reward models")
        out = {}
        for name, model, p in zip(self.names, self.models, params):
            out[name] = score_sequences(model, p, sequences, sequence_mask)
        prompt_ids, response_ids = sequences[:, :prompt_len], sequences[:, prompt_len:]
        response_mask = sequence_mask[:, prompt_len:]
        for name, rule in zip(self.names[len(self.models) :], self.rules):
            score = jnp.asarray(rule(prompt_ids, response_ids, response_mask)).astype(jnp.float32)
            chex.assert_shape(score, (sequences.shape[0],))
            out[name] = score
        return out

    def total(self, components: dict[str, jax.Array]) -> jax.Array:
        """``sum_i w_i * component_i`` -> ``[B]`` (one model of weight 1: its score, bit for bit)."""
        total = None
        for name, w in zip(self.names, self.weights):
            term = components[name] * w
            total = term if total is None else total + term
        return total


def unique_names(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` with repeats suffixed ``_1``, ``_2``, ... (``["rm", "rm"] -> ("rm", "rm_1")``)."""
    out: list[str] = []
    for n in names:
        name, k = n, 0
        while name in out:
            k += 1
            name = f"{n}_{k}"
        out.append(name)
    return tuple(out)
