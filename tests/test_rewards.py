import math
from types import SimpleNamespace

import pytest
import torch

from dgrpo.config import RewardConfig
from dgrpo.corpus import CharTokenizer, VocabularyError
from dgrpo.models.checkpoint import save_checkpoint
from dgrpo.models.judge import Judge, judge_config
from dgrpo.models.rewards import (CharFrequencyReward, JudgeReward, RegexReward, RewardFunction,
                                  SubstringFrequencyReward, build_reward, compute_rewards, validate_rewards)

TOK = CharTokenizer.from_text("abcde \n")  # ids: '\n'=0 ' '=1 a=2 b=3 c=4 d=5 e=6, [MASK]=7


def enc(*texts):
    return torch.stack([TOK.encode(t) for t in texts])


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- programmatic rewards -------------------------------------------------------------------

def test_char_frequency_exact_values():
    tokens = enc("aab ", "cccc", "abcd")
    r = CharFrequencyReward(TOK, "a")(tokens)
    assert r.dtype == torch.float32 and r.shape == (3,)
    assert r.tolist() == [0.5, 0.0, 0.25]
    assert CharFrequencyReward(TOK, "ac")(tokens).tolist() == [0.5, 1.0, 0.5]
    assert CharFrequencyReward(TOK, "aa")(tokens).tolist() == [0.5, 0.0, 0.25]  # a char counts once
    masked = tokens.clone()
    masked[0, 0] = TOK.mask_id  # a [MASK] never counts
    assert CharFrequencyReward(TOK, "a")(masked).tolist() == [0.25, 0.0, 0.25]


def test_char_frequency_unknown_char_is_an_error():
    with pytest.raises(VocabularyError, match=r"'z'.*not in the corpus vocabulary"):
        CharFrequencyReward(TOK, "az")
    with pytest.raises(ValueError, match="at least one character"):
        CharFrequencyReward(TOK, "")


def test_substring_frequency_counts_overlaps():
    r = SubstringFrequencyReward(TOK, "aa")(enc("aaab", "abab"))
    assert r.tolist() == pytest.approx([2 / 3, 0.0])
    with pytest.raises(VocabularyError, match="substring 'zz'"):
        SubstringFrequencyReward(TOK, "zz")


def test_regex_counts_and_normalisation():
    tokens = enc("ab ab ab", "abcdeabc", "eeeeeeee")
    raw = RegexReward(TOK, r"ab", normalize=False)(tokens)
    assert raw.dtype == torch.float32 and raw.tolist() == [3.0, 2.0, 0.0]
    assert RegexReward(TOK, r"ab")(tokens).tolist() == [3 / 8, 2 / 8, 0.0]
    assert RegexReward(TOK, r"\bab\b", normalize=False)(tokens).tolist() == [3.0, 0.0, 0.0]
    assert RegexReward(TOK, r"e+", normalize=False)(tokens).tolist() == [0.0, 1.0, 1.0]  # non-overlapping


def test_bad_regex_names_the_pattern():
    with pytest.raises(ValueError, match=r"'\(ab' is not a valid regular expression"):
        RegexReward(TOK, "(ab")


def test_rewards_reject_non_2d_tokens():
    with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
        CharFrequencyReward(TOK, "a")(TOK.encode("abc"))


# --- compute_rewards: NaN / inf / wrong shape are errors -------------------------------------

class Fixed(RewardFunction):
    name = "fixed"

    def __init__(self, values):
        self.values = values

    def __call__(self, tokens):
        return self.values


@pytest.mark.parametrize("values, match", [
    (torch.tensor([1.0, float("nan"), 0.0]), r"non-finite rewards at rows \[1\]"),
    (torch.tensor([float("inf"), 0.0, float("-inf")]), r"non-finite rewards at rows \[0, 2\]"),
    (torch.zeros(2), r"shape \(2,\)"),
    (torch.zeros(3, 1), r"shape \(3, 1\)"),
    (torch.tensor(0.5), r"shape \(\)"),
])
def test_compute_rewards_rejects_bad_rewards(values, match):
    with pytest.raises(ValueError, match=match) as info:
        compute_rewards(Fixed(values), enc("abcd", "abcd", "abcd"))
    assert "reward 'fixed'" in str(info.value) and "3 finite floats" in str(info.value)


def test_compute_rewards_returns_float32():
    r = compute_rewards(Fixed(torch.tensor([1, 2, 3])), enc("abcd", "abcd", "abcd"))
    assert r.dtype == torch.float32 and r.tolist() == [1.0, 2.0, 3.0]
    r = compute_rewards(Fixed([0.5, 0.25, 0.0]), enc("abcd", "abcd", "abcd"))
    assert r.dtype == torch.float32 and r.tolist() == [0.5, 0.25, 0.0]


# --- build_reward by name ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_judge_dir(tmp_path_factory):
    torch.manual_seed(0)
    judge = Judge(judge_config("tiny", TOK.n_chars, 8))
    path = tmp_path_factory.mktemp("judge") / "j"
    save_checkpoint(path, kind="judge", model_config=judge.cfg, vocab=TOK.to_dict(), weights=judge)
    return str(path)


def test_build_reward_by_name(random_judge_dir):
    tokens = enc("ab ab ab", "eeeeeeee")
    fn = build_reward(RewardConfig(kind="char_frequency", chars="e"), TOK)
    assert isinstance(fn, CharFrequencyReward) and compute_rewards(fn, tokens).tolist() == [0.0, 1.0]
    fn = build_reward(RewardConfig(kind="regex", pattern="ab", normalize=False), TOK)
    assert isinstance(fn, RegexReward) and compute_rewards(fn, tokens).tolist() == [3.0, 0.0]
    # duck-typed configs work too
    fn = build_reward(SimpleNamespace(kind="regex", pattern="e", normalize=True), TOK)
    assert compute_rewards(fn, tokens).tolist() == [0.0, 1.0]
    fn = build_reward(RewardConfig(kind="judge", judge_checkpoint=random_judge_dir), TOK)
    assert isinstance(fn, JudgeReward) and fn.name == "judge"
    r = compute_rewards(fn, tokens)
    assert r.shape == (2,) and bool(((r >= 0) & (r <= 1)).all())
    assert torch.allclose(r, 1 - fn.judge.score(tokens))
    with pytest.raises(ValueError, match="unknown reward kind 'bleu'"):
        build_reward(SimpleNamespace(kind="bleu"), TOK)
    with pytest.raises(ValueError, match="needs reward.judge_checkpoint"):
        build_reward(SimpleNamespace(kind="judge", judge_checkpoint=None), TOK)


def test_judge_reward_checks_length_and_vocabulary(random_judge_dir):
    fn = build_reward(SimpleNamespace(kind="judge", judge_checkpoint=random_judge_dir), TOK)
    with pytest.raises(ValueError, match="exactly 8 characters"):
        fn(enc("abcd"))
    with pytest.raises(ValueError, match="exactly 8 characters"):
        fn(torch.zeros(1, 9, dtype=torch.long))
    other = CharTokenizer.from_text("xyz")
    with pytest.raises(VocabularyError, match="different corpora"):
        build_reward(SimpleNamespace(kind="judge", judge_checkpoint=random_judge_dir), other)
    assert math.isfinite(float(fn(enc("abcdabcd"))[0]))


# --- validate_rewards: shape (n,) and finite, else a message naming the rows ---

def test_validate_rewards_ok():
    assert validate_rewards(torch.tensor([1.0, -2.0, 0.0]), 3) is None


def test_validate_rewards_nan():
    with pytest.raises(ValueError, match=r"must return 3 finite floats.*rows \[1\]") as e:
        validate_rewards(torch.tensor([1.0, float("nan"), 0.0]), 3)
    assert "nan" in str(e.value)


def test_validate_rewards_inf():
    with pytest.raises(ValueError, match=r"must return 3 finite floats.*rows \[0, 2\]"):
        validate_rewards(torch.tensor([float("inf"), 0.0, float("-inf")]), 3)


@pytest.mark.parametrize("bad", [torch.zeros(2), torch.zeros(3, 1), torch.zeros(1, 3), torch.tensor(1.0)])
def test_validate_rewards_wrong_shape(bad):
    with pytest.raises(ValueError, match=r"must return 3 finite floats.*got shape"):
        validate_rewards(bad, 3)
