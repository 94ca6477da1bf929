"""GGUF -> float weights through transformers: the dequantizing half of :mod:`rlhf_jax.models.gguf`.

:func:`dequantize_into` reads a GGUF file with transformers' GGUF loader (which dequantizes
the tensors), rebuilds a fresh model from the config without ``quantization_config`` (a
GGUF-loaded model refuses ``save_pretrained``), loads the state dict into it and saves it
with the tokenizer as a Hugging Face directory. The helpers around it make that fast
(each GGUF file parsed once, memory maps read as plain arrays, no random init of weights
that are overwritten anyway). :func:`~rlhf_jax.models.gguf.convert_gguf` wraps it with
the idempotent, atomic directory handling.

torch, transformers and gguf are imported inside the functions only, so this module
imports without them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["dequantize_into"]


def dequantize_into(src: Path, tmp: Path, dtype: str) -> dict:
    """Dequantize ``src`` with transformers and save it into the new directory ``tmp``."""
    try:
        import gguf  # noqa: F401 - transformers' GGUF reader needs it
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ImportError(
            f"converting GGUF files needs torch, transformers, gguf and accelerate ({e}); "
            "pip install 'rlhf_jax[dev]' or pip install torch gguf accelerate"
        ) from e

    torch_dtype = getattr(torch, dtype)
    with _parse_gguf_once():
        file_type = _file_type(src)
        log.warning(
            "%s: weights are dequantized from a quantized GGUF file (%s); they are not the original "
            "float checkpoint and differ from it by the quantization error",
            src.name,
            file_type,
        )
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with _no_init_weights():  # every weight is overwritten below: skip the random init (~10 s at 262k vocab)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = {k: v.to(torch_dtype) for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"{src.name}: rebuilt model does not match the dequantized weights "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    generation_config = getattr(loaded, "generation_config", None)
    if generation_config is not None:
        model.generation_config = generation_config
    del loaded
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    mode = (tmp / "config.json").stat().st_mode & 0o777
    for f in tmp.iterdir():  # safetensors writes its file 0600; give every file the umask's mode
        f.chmod(mode)
    return {
        "gguf_file_type": file_type,
        "transformers": transformers.__version__,
        "note": "weights dequantized from a quantized GGUF file",
    }


def _no_init_weights():
    """transformers' context that skips weight initialisation (moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


@contextlib.contextmanager
def _parse_gguf_once():
    """Within the block, transformers parses each GGUF file once instead of three times.

    transformers builds a new ``gguf.GGUFReader`` (pure-Python parsing of every metadata
    field: ~12 s for SmolLM2's 49k-token vocabulary on one core) for the config, the
    weights and the tokenizer, and rebuilds ``gguf.get_tensor_name_map`` for every
    submodule (~400 times, ~13 s). Both are looked up on the ``gguf`` module at call time,
    so memoising them here cuts a conversion from about a minute to about 25 s. The readers
    are read-only memory maps; the originals are restored on exit. The reader parses over a
    plain ndarray view of its memory map (:func:`_plain_reader`): 3-4x faster on large
    vocabularies (Gemma 3's 262k tokens: 24 s -> 7 s).
    """
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = _plain_reader(reader_cls)(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


@functools.cache
def _plain_reader(reader_cls: type) -> type:
    """``reader_cls`` (gguf.GGUFReader) reading through a plain ndarray view of its np.memmap.

    The reader slices its data once per metadata value (three times per token of a 262k
    vocabulary); slicing an np.memmap goes through Python-level ``__getitem__`` and
    ``__array_finalize__``, a plain ndarray view of the same pages does not. Same bytes,
    same fields and tensors.
    """
    import numpy as np

    class _PlainReader(reader_cls):
        def _get(self, offset, dtype, count=1, override_order=None):
            if type(self.data) is not np.ndarray:
                self.data = self.data.view(np.ndarray)  # keeps the memmap (and its mmap) alive as .base
            return super()._get(offset, dtype, count, override_order)

    return _PlainReader


def _file_type(src: Path) -> str:
    """The GGUF's quantization name (general.file_type), e.g. 'MOSTLY_Q4_1', or 'unknown'."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(src))
        field = reader.fields.get("general.file_type")
        if field is None:
            return "unknown"
        value = int(field.parts[field.data[0]][0])
        return gguf.LlamaFileType(value).name
    except Exception:  # noqa: BLE001 - informative only
        return "unknown"
