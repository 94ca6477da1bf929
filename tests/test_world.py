"""Tests of rlhf_jax.tasks.world: the built-in synthetic instruction world (numpy only, no jax)."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest

from rlhf_jax.data import load_records, tokenize_demonstrations, tokenize_prompts, tokenize_text
from rlhf_jax.tasks import world_labels as wl
from rlhf_jax.tasks.world import World, WorldConfig, correct_answer, family_of
from rlhf_jax.tasks.world_lang import FAMILIES, FILLER, STYLES, TEMPLATES, all_words, answer_words


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The default world with its tokenizer and files, built once (and timed)."""
    out = tmp_path_factory.mktemp("world")
    start = time.perf_counter()
    world = World(WorldConfig())
    tok = world.build_tokenizer(out / "tokenizer")
    paths = world.write_files(out / "data")
    return world, tok, paths, time.perf_counter() - start


@pytest.fixture(scope="module")
def world(built):
    return built[0]


def test_default_world_builds_in_under_10_seconds(built):
    _, _, paths, seconds = built
    assert seconds < 10.0, f"building the default world took {seconds:.1f} s"
    assert set(paths) >= {"pretrain", "pretrain_heldout", "demonstrations", "prompts"}


def test_demonstrations_of_chosen_users_only(tmp_path):
    world = World(WorldConfig(num_users=6, prompts_per_user=5, pretrain_docs=10, heldout_docs=10))
    paths = world.write_files(tmp_path, demo_users={"u001", "u004"})
    demos, _ = load_records(paths["demonstrations"], "demonstrations")
    prompts, _ = load_records(paths["prompts"], "prompts")
    assert {d["user_id"] for d in demos} == {"u001", "u004"} and len(demos) == 10 and len(prompts) == 30


def test_deterministic_from_seed(tmp_path, world):
    again = World(WorldConfig())
    assert again.prompts() == world.prompts()
    assert again.demonstrations(again.prompts()) == world.demonstrations(world.prompts())
    assert again.pretraining_corpus(50, "heldout") == world.pretraining_corpus(50, "heldout")
    small = WorldConfig(num_users=4, prompts_per_user=5, pretrain_docs=30, heldout_docs=10)
    a = World(small).write_files(tmp_path / "a")
    b = World(small).write_files(tmp_path / "b")
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    with pytest.raises(ValueError, match="distinct prompts"):
        World(WorldConfig(families=("repeat",), list_len=(3, 3), num_users=40, prompts_per_user=30)).prompts()
    other = World(WorldConfig(seed=1, num_users=4, prompts_per_user=5))
    assert other.prompts() != World(small).prompts()
    # Train and held-out corpora are different streams; a longer corpus extends a shorter one.
    assert world.pretraining_corpus(20) != world.pretraining_corpus(20, "heldout")
    assert world.pretraining_corpus(30)[:20] == world.pretraining_corpus(20)
    # A demonstration depends on its prompt only, not on the other prompts passed.
    prompts = world.prompts()
    assert world.demonstrations(prompts[5:7]) == world.demonstrations(prompts)[5:7]


def test_prompts_and_answers_are_small_and_checkable(world):
    prompts = world.prompts()
    assert len(prompts) == 40 * 30
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    assert {p["family"] for p in prompts} == set(FAMILIES)
    vocab = set(all_words())
    for p in prompts:
        words = p["prompt"].split()
        answer = answer_words(p["prompt"])
        assert len(words) <= 12 and words[-1] in (".", "?")
        assert "." not in words[:-1] and "?" not in words[:-1]
        assert 1 <= len(answer) <= 12 and not FILLER & set(answer)
        assert set(words) <= vocab and family_of(p["prompt"]) == p["family"]
    cases = {
        "reverse : cat fig box .": "box fig cat",
        "please sort 7 2 5 7 .": "2 5 7 7",
        "can you repeat owl 3 times ?": "owl owl owl",
        "replace cat with hen : cat dog cat .": "hen dog hen",
        "please replace cat with hen in dog cat .": "dog hen",
        "how many words in cat fig cat ?": "3",
        "count : pen .": "1",
    }
    for prompt, answer in cases.items():
        assert correct_answer(prompt) == answer
    with pytest.raises(ValueError, match="not a prompt"):
        correct_answer("the cat sees the dog .")


def test_correct_answer_beats_every_corruption(world):
    rng = np.random.default_rng(0)
    for p in world.prompts()[::3]:
        prompt, answer = p["prompt"], answer_words(p["prompt"])
        best = world.gold_score(prompt, " ".join(answer))
        assert best == pytest.approx(1.0)
        assert world.gold_score(prompt, " ".join(answer), ended=False) < best
        for kind in wl.ERROR_KINDS:
            bad = wl.corrupt(answer, kind, rng)
            if bad != answer:
                assert world.gold_score(prompt, " ".join(bad)) < best, (prompt, kind, bad)
        assert world.gold_score(prompt, wl.word_salad(rng)) < best


def test_gold_prefers_concise_answers_that_end_properly(world):
    prompt = "please reverse cat dog owl ."
    verbose = ("owl dog cat", "ok : owl dog cat", "sure , here it is : owl dog cat")
    scores = [world.gold_score(prompt, r) for r in verbose]
    assert scores[0] > scores[1] > scores[2]
    assert world.gold_score(prompt, "owl dog cat") > world.gold_score(prompt, "owl dog cat done .")
    # Filler after the answer costs more than the same filler before it (no proper end).
    assert world.gold_score(prompt, "ok : owl dog cat") > world.gold_score(prompt, "owl dog cat ok :")
    # Partial credit: one wrong word is better than two, both better than salad.
    assert 1.0 > world.gold_score(prompt, "owl dog fox") > world.gold_score(prompt, "owl pig fox") > -1.0
    # Decoded model output: scored up to <eos>; no <eos> and ended=False is a cut response.
    assert world.gold_score(prompt, "owl dog cat <eos> <pad> <pad>") == pytest.approx(1.0)
    assert world.gold_score(prompt, "owl dog cat", ended=False) == pytest.approx(1.0 - world.config.no_eos_penalty)
    count = "how many words in cat fig cat ?"
    assert world.gold_score(count, "4") > world.gold_score(count, "6")


def test_tokenizer_one_token_per_word_and_chat_template(built, tmp_path):
    world, tok, _, _ = built
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    for w in all_words():
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, w
    prompt = world.prompts()[0]["prompt"]
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids).split() == text.split() == ["<|user|>", *prompt.split(), "<|assistant|>"]
    assert len(ids) == len(prompt.split()) + 2  # role markers are single tokens
    full = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": correct_answer(prompt)}], tokenize=False
    )
    full_ids = tok(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(ids)] == ids and full_ids[-1] == tok.eos_token_id
    # The saved directory reloads with the same ids and template; ids do not depend on the run.
    from transformers import PreTrainedTokenizerFast  # not AutoTokenizer: it imports torch (seconds)

    again = PreTrainedTokenizerFast.from_pretrained(str(built[2]["prompts"].parent.parent / "tokenizer"))
    assert again.get_vocab() == tok.get_vocab() and again.chat_template == tok.chat_template
    assert (
        World(WorldConfig(seed=3, num_users=3, prompts_per_user=4, pretrain_docs=50))
        .build_tokenizer(tmp_path / "t")
        .get_vocab()
        == tok.get_vocab()
    )


def test_demonstration_error_rate_and_kinds(world):
    demos = world.demonstrations(world.prompts())
    rate = np.mean([d["error"] != "none" for d in demos])
    lo, hi = world.config.demo_error_rate - 0.05, world.config.demo_error_rate + 0.05
    assert lo <= rate <= hi, rate
    kinds = Counter(d["error"] for d in demos)
    assert set(kinds) == {"none", *wl.ERROR_KINDS}
    for d in demos:
        correct = d["response"] == correct_answer(d["prompt"])
        assert correct == (d["error"] == "none") and d["response"].strip()
    # Errors make the demonstrations imperfect by the gold preference; the rest are perfect.
    gold = np.asarray([world.gold_score(d["prompt"], d["response"]) for d in demos])
    assert np.all(gold[[d["error"] == "none" for d in demos]] == 1.0)
    assert np.all(gold[[d["error"] != "none" for d in demos]] < 1.0)


def test_verbose_labelers_wrap_correct_answers_in_filler():
    base = WorldConfig(num_users=20, prompts_per_user=20, demo_error_rate=0.2)
    plain = World(base).demonstrations(World(base).prompts())
    verbose_world = World(WorldConfig(num_users=20, prompts_per_user=20, demo_error_rate=0.2, demo_filler_rate=0.5))
    verbose = verbose_world.demonstrations(verbose_world.prompts())
    # content errors are untouched (same rows, same errors); filler only wraps the error-free ones
    assert all(v == p for p, v in zip(plain, verbose) if p["error"] != "none")
    wrapped = [v for p, v in zip(plain, verbose) if p["error"] == "none" and v["error"] != "none"]
    clean = [p for p in plain if p["error"] == "none"]
    assert 0.4 <= len(wrapped) / len(clean) <= 0.6
    for d in wrapped:
        assert d["error"] in ("prefix", "suffix")
        words = d["response"].split()
        content = [w for w in words if w not in FILLER]
        assert content == answer_words(d["prompt"]) and len(content) < len(words)
        correctness, style = wl.gold_parts(d["prompt"], d["response"], verbose_world.config.gold_weights)
        assert correctness == 1.0 and style < 0.0  # right answer, style the gold preference dislikes


def test_users_differ_in_style_and_families(world):
    by_user: dict[str, list[dict]] = {}
    for p in world.prompts():
        by_user.setdefault(p["user_id"], []).append(p)
    assert len(by_user) == 40 and all(len(v) == 30 for v in by_user.values())

    def style(prompt: str) -> str:
        fam = family_of(prompt)
        for s in STYLES:
            head = TEMPLATES[fam][s].split("{")[0]
            if prompt.startswith(head):
                return s
        raise AssertionError(prompt)

    main = {}
    for user, rows in by_user.items():
        counts = Counter(style(r["prompt"]) for r in rows)
        s, n = counts.most_common(1)[0]
        assert n >= 0.6 * len(rows), (user, counts)  # each user mostly keeps to one style
        main[user] = s
    assert set(main.values()) == set(STYLES)  # but users differ
    fams = [Counter(r["family"] for r in rows).most_common(1)[0][0] for rows in by_user.values()]
    assert len(set(fams)) >= 3  # favourite families differ between users


def _pools(world, n, seed):
    rng = np.random.default_rng(seed)
    prompts = [p["prompt"] for p in world.prompts()[:n]]
    return prompts, [world.synthetic_responses(p, int(rng.integers(4, 10)), rng) for p in prompts]


def test_labeler_agreement_is_calibrated(world):
    prompts, pools = _pools(world, 1200, seed=11)
    agreement = world.labeler_agreement(prompts, pools, seed=0)
    assert 0.69 <= agreement <= 0.77, agreement
    # A single labeler agrees with the gold order more often than with another labeler.
    assert agreement < world.labeler_accuracy(prompts, pools, seed=0) < 0.9
    # Noise-free labelers rank exactly by the gold score and always agree.
    exact = World(WorldConfig(labeler_sigma=0.0, labeler_spread=0.0, num_users=5, prompts_per_user=10))
    p2, pools2 = _pools(exact, 50, seed=1)
    assert exact.labeler_agreement(p2, pools2, seed=0) == 1.0


def test_rank_ties_identical_responses(world):
    prompt = "please reverse cat dog owl ."
    responses = ["owl dog cat", "owl dog", "owl dog cat", "cat fig"]
    ranks = world.rank(prompt, responses, np.random.default_rng(0), labeler=2)
    assert ranks[0] == ranks[2] and len(set(ranks)) == 3 and min(ranks) == 0
    exact = World(WorldConfig(labeler_sigma=0.0))
    assert exact.rank(prompt, responses, np.random.default_rng(0)) == [0, 1, 0, 2]
    # A response cut at the length limit (ended=False) loses no_eos_penalty.
    cut = exact.rank(prompt, ["owl dog cat", "owl dog cat ok"], np.random.default_rng(0), ended=[False, True])
    assert cut == [1, 0]


def test_rankings_records_load(world, tmp_path):
    prompts, pools = _pools(world, 60, seed=3)
    pools[0] = [pools[0][0]] * 4  # all identical: no ordered pair, left out
    users = [p["user_id"] for p in world.prompts()[:60]]
    recs = world.rankings(prompts, pools, users, seed=0)
    n_ordered = sum(len(set(g)) > 1 for g in pools)
    assert 50 <= n_ordered < 60 and len(recs) == n_ordered and recs == world.rankings(prompts, pools, users, seed=0)
    assert all(4 <= len(r["responses"]) <= 9 and len(r["ranks"]) == len(r["responses"]) for r in recs)
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    loaded, report = load_records(path, "rankings")
    assert len(loaded) == n_ordered and report.skipped == 0
    assert loaded[0]["user_id"] == recs[0]["user_id"] and "labeler" in loaded[0]["meta"]


@pytest.mark.parametrize("chat", [False, True])
def test_write_files_load_and_tokenize(built, tmp_path, chat):
    world, tok, paths, _ = built
    if chat:
        paths = World(WorldConfig(num_users=5, prompts_per_user=8, pretrain_docs=40)).write_files(tmp_path, chat=True)
    kinds = {"pretrain": "text", "pretrain_heldout": "text", "demonstrations": "demonstrations", "prompts": "prompts"}
    loaded = {}
    for name, kind in kinds.items():
        recs, report = load_records(paths[name], kind)
        assert report.skipped == 0 and recs, name
        loaded[name] = recs
    assert len(loaded["pretrain"]) == (40 if chat else world.config.pretrain_docs)
    assert len(loaded["demonstrations"]) == len(loaded["prompts"]) == (40 if chat else 1200)
    assert all(r["user_id"] for r in loaded["demonstrations"] + loaded["prompts"])
    demos = tokenize_demonstrations(loaded["demonstrations"], tok, seq_len=32)
    assert demos.report.kept == len(loaded["demonstrations"])
    assert tokenize_prompts(loaded["prompts"], tok, max_prompt_len=16).report.kept == len(loaded["prompts"])
    text = tokenize_text(loaded["pretrain_heldout"], tok, seq_len=64)
    assert len(text) > 0 and not np.any(text.arrays["input_ids"] == tok.unk_token_id)
