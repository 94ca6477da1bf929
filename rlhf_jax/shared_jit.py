"""``shared_jit``: ``jax.jit`` whose compiled programs are shared, in memory, by every function
of the process that lowers to the same program.

jax keeps a compiled program per jitted *function object*. Every stage driver builds its step
as a fresh closure (over its model, hyperparameters and optimizer), so a process that runs
the same stage twice compiles it twice: the demo's plain PPO and its no-KL PPO (the KL
coefficient lives in the state), and PPO-ptx in every round of iterated RLHF, are one program
each, compiled 2-3 times at 15-25 s on 2 CPU cores; a test that checks a resumed run against
an uninterrupted one compiles both.

Here a program is keyed by what XLA would compile: the lowered StableHLO text, the argument
and result pytree structures, the device assignment and the compiler options. Executables stay
in memory (never serialized: jax's on-disk cache aborted on deserialized CPU executables, see
the README), at most ``MAX_PROGRAMS`` of them, least recently used evicted. A program whose
lowering carries host callbacks, hoisted constants or other per-closure objects is never
shared: it is compiled for its function alone, as ``jax.jit`` would.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax

log = logging.getLogger(__name__)

MAX_PROGRAMS = 32
_PROGRAMS: OrderedDict[tuple, tuple[Any, float]] = OrderedDict()  # key -> (jax.stages.Compiled, compile s)
STATS = {"compiled": 0, "shared": 0, "compile_s": 0.0, "saved_s": 0.0}  # process totals, for logs and tests
# saved_s: what the shared programs took to compile the first time (the compile time each reuse skipped)


class SharedJit:
    """``jax.jit(fn, **jit_kwargs)`` for positional array arguments (no static arguments); call it
    like the jitted function. Each argument signature (pytree structure, shapes, dtypes,
    shardings) is lowered once per object and compiled once per process and program."""

    def __init__(self, fn: Callable, **jit_kwargs) -> None:
        if "static_argnums" in jit_kwargs or "static_argnames" in jit_kwargs:
            raise ValueError("shared_jit takes no static arguments: close over them instead")
        self._jitted = jax.jit(fn, **jit_kwargs)
        self._by_signature: dict[tuple, Any] = {}

    def __call__(self, *args):
        leaves, tree = jax.tree.flatten(args)
        signature = (tree, tuple(_leaf_signature(x) for x in leaves))
        compiled = self._by_signature.get(signature)
        if compiled is None:
            compiled = self._by_signature[signature] = _compile(self._jitted.lower(*args))
        return compiled(*args)


def shared_jit(fn: Callable, **jit_kwargs) -> SharedJit:
    """See the module docstring; ``jit_kwargs`` as for ``jax.jit`` (shardings, donation)."""
    return SharedJit(fn, **jit_kwargs)


def _leaf_signature(x) -> tuple:
    if isinstance(x, jax.Array):
        return (x.aval, x.sharding)  # the aval: shape, dtype, weak type
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # numpy
        return (type(x), x.shape, x.dtype)
    return (type(x),)  # Python scalars trace as weakly typed scalars; their value is not part of the program


def _program_key(lowered) -> tuple | None:
    """What XLA compiles, or None when the lowering holds per-closure objects (never shared)."""
    try:
        computation = lowered._lowering  # jax's MeshComputation: no public view of these
        args = computation.compile_args
        if computation.const_args or args.get("host_callbacks") or args.get("keepalive"):
            return None
        devices = tuple(d.id for d in computation._device_list)
        options = tuple(sorted((k, repr(v)) for k, v in computation._compiler_options_kvs))
    except (AttributeError, KeyError, TypeError):  # another jax version: compile unshared, as jax.jit would
        return None
    text = hashlib.sha256(lowered.as_text().encode()).hexdigest()
    return (text, lowered.in_tree, lowered.out_tree, devices, jax.default_backend(), options)


def _compile(lowered):
    key = _program_key(lowered)
    if key is not None and key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        compiled, seconds = _PROGRAMS[key]
        STATS["shared"] += 1
        STATS["saved_s"] += seconds
        return compiled
    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    STATS["compiled"] += 1
    STATS["compile_s"] += seconds
    name = getattr(getattr(lowered, "_lowering", None), "_name", "a program")
    log.debug("compiled %s in %.1f s%s", name, seconds, "" if key else " (not shared)")
    if key is not None:
        _PROGRAMS[key] = (compiled, seconds)
        while len(_PROGRAMS) > MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)
    return compiled
