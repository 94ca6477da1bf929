"""Unsafe artefacts: pickles, custom code and tokenizer/model mismatches are refused at load time.

* A crafted pickle (its ``__reduce__`` creates a marker file) in every place a loader could
  meet it (HF weights under any pickle suffix, a shard named by a safetensors index, a
  file renamed to ``.safetensors``, an Orbax run directory) is refused: the marker never
  appears, and an audit hook proves the pickle file is not even opened where the loader
  can tell by its name.
* A tokenizer that needs custom code is refused before transformers reads it, and the
  option that would allow remote code appears nowhere in the project.
* A tokenizer larger than the model's embedding, special ids outside the vocabulary and
  pad == eos are errors when a stage starts, before any training step (not NaNs later).
"""

from __future__ import annotations

import json
import pickle
import runpy
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from rlhf_jax import checkpoint, data
from rlhf_jax.models import from_pretrained, load_tokenizer
from rlhf_jax.models.hf_config import CheckpointError
from rlhf_jax.tasks import tiny

REPO = Path(__file__).resolve().parents[1]
PICKLE_NAMES = [
    "pytorch_model.bin",
    "model.pt",
    "model.pth",
    "model.ckpt",
    "weights.pkl",
    "pytorch_model-00001-of-00002.bin",
]


# ============================================================================ helpers


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file is the side effect."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


_OPENED: list[str] | None = None  # paths opened while watch_opens() is active


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, Path)):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one is idle outside watch_opens()


@contextmanager
def watch_opens():
    """Collects the paths of every file Python opens inside the block."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny HF model directory (config.json + safetensors + tokenizer), vocab = len(tokenizer)."""
    root = tmp_path_factory.mktemp("unsafe")
    tok = tiny.make_tokenizer(root / "tokenizer", num_words=16)
    return tiny.make_model_dir(
        root / "base", vocab_size=len(tok), hidden_size=16, num_layers=1, num_heads=2, tokenizer=tok
    )


def copy_dir(src: Path, dst: Path, *, weights: bool = True) -> Path:
    shutil.copytree(src, dst, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
    return dst


# ============================================================================ pickles


def test_payload_is_live(tmp_path):
    """The payload really has a side effect when unpickled (so the tests below can fail)."""
    marker = tmp_path / "marker"
    pickle.loads(payload(marker)).close()
    assert marker.exists()


@pytest.mark.parametrize("name", PICKLE_NAMES)
def test_pickle_weights_are_refused_unread(base, tmp_path, name):
    d = copy_dir(base, tmp_path / "pickled", weights=False)
    marker = tmp_path / "marker"
    (d / name).write_bytes(payload(marker))
    for load in (lambda: from_pretrained(d), lambda: checkpoint.load_model(d)):
        with watch_opens() as opened, pytest.raises(CheckpointError, match=rf"pickle.*{name}.*refused") as e:
            load()
        assert str(d) in str(e.value) and "safetensors" in str(e.value)
        assert str(d / name) not in opened and not marker.exists()


@pytest.mark.parametrize("shard", ["pytorch_model.bin", "../outside.safetensors", "/tmp/elsewhere.safetensors"])
def test_index_naming_a_foreign_shard_is_refused(base, tmp_path, shard):
    d = copy_dir(base, tmp_path / "sharded", weights=False)
    marker = tmp_path / "marker"
    target = (d / shard) if not shard.startswith("/") else tmp_path / "elsewhere.safetensors"
    target.write_bytes(payload(marker))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"transformer.wte.weight": shard}}))
    with watch_opens() as opened, pytest.raises(CheckpointError, match=r"not \*\.safetensors files inside.*refused"):
        from_pretrained(d)
    assert not any(Path(p).name == target.name for p in opened) and not marker.exists()


def test_safetensors_beside_a_pickle_ignores_the_pickle(base, tmp_path):
    d = copy_dir(base, tmp_path / "both")
    marker = tmp_path / "marker"
    (d / "pytorch_model.bin").write_bytes(payload(marker))
    with watch_opens() as opened:
        model, _, tok = checkpoint.load_model(d)
    assert model.config.vocab_size == len(tok) and str(d / "config.json") in opened  # the hook sees opens
    assert str(d / "pytorch_model.bin") not in opened and not marker.exists()


def test_pickle_renamed_to_safetensors_is_a_clear_error(base, tmp_path):
    d = copy_dir(base, tmp_path / "renamed", weights=False)
    marker = tmp_path / "marker"
    (d / "model.safetensors").write_bytes(payload(marker))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        from_pretrained(d)
    assert not marker.exists()


def test_run_dir_holding_pickles_is_refused(base, tmp_path):
    """An Orbax run directory whose checkpoint files were swapped for pickles: an error, no side effect."""
    import numpy as np

    from rlhf_jax.models import CausalLM

    model, params, tok = checkpoint.load_model(base)
    run = tmp_path / "run"
    checkpoint.write_model_info(run, CausalLM(model.config), tok)
    with checkpoint.Checkpointer(run / "checkpoints", async_save=False) as ckpt:
        ckpt.save(1, {"params": params, "step": np.int32(1)}, {"best_metric": None})
    marker = tmp_path / "marker"
    files = [f for f in (run / "checkpoints" / "1").rglob("*") if f.is_file()]
    assert files
    for f in files:
        f.write_bytes(payload(marker))
    for which in ("latest", "best"):  # orbax reads JSON and tensorstore files, never pickles
        with pytest.raises((checkpoint.CheckpointRestoreError, ValueError)):  # today: a UnicodeDecodeError
            checkpoint.load_model(run, which=which)
        assert not marker.exists()

    shutil.rmtree(run / "checkpoints")  # only a pickle where the checkpoints should be
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "state.pkl").write_bytes(payload(marker))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load_model(run)
    assert not marker.exists()


# ============================================================================ malformed config.json

HOSTILE_VALUES = ["DELETE", None, "x", -1, 0, 1.5, [1], True, float("nan"), float("inf"), {"a": 1}]


def _family_configs():
    from rlhf_jax.config import ModelConfig

    common = {"vocab_size": 64, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 32}
    return [
        ModelConfig(family="gpt2", qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True, **common),
        ModelConfig(family="llama", activation="silu", num_kv_heads=1, intermediate_size=32, **common),
        ModelConfig(family="neox", intermediate_size=32, rotary_pct=0.5, activation="gelu", **common),
    ]


def test_malformed_config_fields_are_checkpoint_errors():
    """Every field of config.json deleted, nulled or given a hostile value: a ModelConfig or a
    CheckpointError naming config.json, never a KeyError/TypeError/AttributeError."""
    from rlhf_jax.models.hf import config_to_hf
    from rlhf_jax.models.hf_config import config_from_hf

    errors = 0
    for cfg in _family_configs():
        hf = config_to_hf(cfg).to_dict()
        assert config_from_hf(hf).family == cfg.family
        for key in hf:
            for value in HOSTILE_VALUES:
                bad = {k: v for k, v in hf.items() if k != key}
                if value != "DELETE":
                    bad[key] = value
                try:
                    config_from_hf(bad)
                except CheckpointError as e:
                    assert str(e).startswith("config.json: "), str(e)
                    errors += 1
    assert errors > 100
    hf = config_to_hf(_family_configs()[1]).to_dict()
    for key, value, message in [
        ("hidden_size", None, "required field 'hidden_size' is missing"),
        ("num_attention_heads", "2", "num_attention_heads='2' must be a positive int"),
        ("rms_norm_eps", float("nan"), "rms_norm_eps=nan must be a positive number"),
        ("tie_word_embeddings", "false", "tie_word_embeddings='false' must be true or false"),
        ("rope_parameters", [1], "rope_parameters must be an object"),
        ("hidden_act", ["silu"], "hidden_act=\\['silu'\\] is not supported"),
    ]:
        with pytest.raises(CheckpointError, match=f"config.json: {message}"):
            config_from_hf({**hf, key: value})


def test_unreadable_json_files_name_the_file(base, tmp_path):
    d = copy_dir(base, tmp_path / "badjson")
    (d / "config.json").write_bytes(b"\x80\x04 not json")
    with pytest.raises(CheckpointError, match=r"config\.json: cannot read JSON"):
        from_pretrained(d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object, got list"):
        from_pretrained(d)


# ============================================================================ custom code


EVIL_MODULE = "open({marker!r}, 'w').close()\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n"


@pytest.mark.parametrize("where", ["tokenizer_config.json", "config.json"])
def test_tokenizer_custom_code_is_refused(base, tmp_path, where):
    d = copy_dir(base, tmp_path / "custom")
    marker = tmp_path / "marker"
    (d / "tokenization_evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    cfg = json.loads((d / where).read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    if where == "tokenizer_config.json":
        cfg["tokenizer_class"] = "EvilTokenizer"
    (d / where).write_text(json.dumps(cfg))
    for load in (lambda: load_tokenizer(d), lambda: checkpoint.load_model(d)):
        with pytest.raises(CheckpointError, match=rf"{where}: the tokenizer needs custom code"):
            load()
        assert not marker.exists()
    runpy.run_path(str(d / "tokenization_evil.py"))  # the module is live: importing it leaves the marker
    assert marker.exists()


def _project_files() -> list[Path]:
    """The project's own files: what git tracks or would track (never a virtualenv, a build
    or a cache, wherever they sit); outside a git checkout, every file not inside a virtualenv."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
        return [REPO / name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        venvs = {cfg.parent for cfg in REPO.rglob("pyvenv.cfg")}
        return [p for p in REPO.rglob("*") if p.is_file() and not any(v in p.parents for v in venvs)]


def test_remote_code_option_appears_nowhere():
    """The transformers option that allows running downloaded code is not written anywhere in
    the project (a virtualenv inside the clone, as the README's quick start makes, is not scanned)."""
    needle = "trust_remote" + "_code"
    suffixes = (".py", ".md", ".toml", ".sh", ".json", ".yaml", ".yml", ".cfg", ".txt", "")
    hits = []
    for path in _project_files():
        if path.is_file() and path.suffix in suffixes:
            text = path.read_text(errors="replace")
            hits += [f"{path.relative_to(REPO)}:{i}" for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert not hits, hits


def test_project_file_scan_skips_a_virtualenv_in_the_clone():
    """The README's quick start creates .venv inside the clone; the scan above must not walk into it."""
    files = _project_files()
    assert any(p.name == "pyproject.toml" for p in files)
    assert not any(".venv" in p.relative_to(REPO).parts for p in files)


# ============================================================================ vocabulary mismatches


def _grown_tokenizer_dir(base: Path, dst: Path, extra: int, *, pad_is_eos: bool = False) -> Path:
    d = copy_dir(base, dst)
    tok = load_tokenizer(d)
    tok.add_tokens([f"extra{i}" for i in range(extra)])
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(d)
    return d


def _stage_configs(d: Path, out: Path):
    from rlhf_jax.config import RewardConfig, SFTConfig

    unused = str(out / "never_read.jsonl")  # the stage must fail before it reads data
    return [
        ("sft", SFTConfig(data=unused, init=str(d), out=str(out / "sft"))),
        ("rm", RewardConfig(data=unused, init=str(d), out=str(out / "rm"))),
    ]


@pytest.mark.parametrize("extra,pad_is_eos", [(2, False), (1, True)])
def test_tokenizer_larger_than_embedding_stops_the_stage(base, tmp_path, extra, pad_is_eos):
    """Tokens beyond the embedding (beyond the one pad row load_model adds) fail at stage start."""
    from rlhf_jax.drivers import run_rm, run_sft

    d = _grown_tokenizer_dir(base, tmp_path / "grown", extra, pad_is_eos=pad_is_eos)
    for name, cfg in _stage_configs(d, tmp_path):
        with pytest.raises(ValueError, match=r"has \d+ tokens but the model's vocab_size is"):
            {"sft": run_sft, "rm": run_rm}[name](cfg)
        assert not (Path(cfg.out) / "checkpoints").exists()


def test_load_model_rejects_tokenizer_larger_than_embedding(base, tmp_path):
    d = _grown_tokenizer_dir(base, tmp_path / "grown", 2)
    with pytest.raises(ValueError, match="tokens but the model's vocab_size is"):
        checkpoint.load_model(d)


def test_pad_equal_eos_checkpoint_gets_a_pad_row(base, tmp_path):
    """pad == eos in an HF directory: load_model adds a distinct pad AND an embedding row for it."""
    d = _grown_tokenizer_dir(base, tmp_path / "padeos", 0, pad_is_eos=True)
    with pytest.warns(UserWarning, match="equal to EOS"):
        model, params, tok = checkpoint.load_model(d)
    assert tok.pad_token_id != tok.eos_token_id and len(tok) == model.config.vocab_size
    assert params["embed"]["embedding"].shape[0] == len(tok)
    data.check_vocab(tok, model.config.vocab_size)


class _Ids:
    """A tokenizer stand-in with chosen special ids (real tokenizers keep ids below len())."""

    def __init__(self, n: int, **ids: int | None) -> None:
        self.n, self.pad_token_id, self.eos_token_id, self.bos_token_id = n, 0, 1, 2
        for k, v in ids.items():
            setattr(self, f"{k}_token_id", v)

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize(
    "ids,message",
    [
        ({"eos": 50}, r"eos_token_id 50 is outside the model's vocabulary \[0, 40\)"),
        ({"pad": 40}, r"pad_token_id 40 is outside"),
        ({"bos": 41}, r"bos_token_id 41 is outside"),
        ({"pad": -1}, r"pad_token_id -1 is outside"),
        ({"pad": 1}, r"pad_token_id \(1\) == eos_token_id \(1\)"),
        ({"pad": None}, r"no pad_token_id"),
        ({"eos": None}, r"no eos_token_id"),
    ],
)
def test_special_ids_are_checked(ids, message):
    with pytest.raises(ValueError, match=message):
        data.check_vocab(_Ids(30, **ids), 40)
