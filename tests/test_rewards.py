import math
from types import SimpleNamespace

import pytest
import torch

from dgrpo.config import RewardConfig, TrainConfig, load_config, to_dict
from dgrpo.corpus import CharTokenizer, VocabularyError
from dgrpo.errors import ConfigError
from dgrpo.models.checkpoint import save_checkpoint
from dgrpo.models.judge import Judge, judge_config
from dgrpo.models.rewards import (CharFrequencyReward, EnsembleJudgeReward, JudgeReward, RegexReward, RewardFunction,
                                  SubstringFrequencyReward, build_reward, combine_member_rewards,
                                  compute_member_rewards, compute_rewards, member_std, validate_rewards)

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


# --- judge ensembles ------------------------------------------------------------------------

MEMBERS = torch.tensor([[0.2, 0.9, 0.5, 0.7],
                        [0.4, 0.1, 0.5, 0.7],
                        [0.6, 0.5, 0.5, 0.1]])


def test_ensemble_formulas_by_hand():
    # column by column: mean, sample std (divisor M - 1 = 2), min
    mean = [0.4, 0.5, 0.5, 0.5]
    # (0.2-0.4)^2 + 0 + (0.6-0.4)^2 = 0.08 -> /2 = 0.04 -> 0.2; (0.16 + 0.16 + 0) / 2 = 0.16 -> 0.4; 0;
    # (0.04 + 0.04 + 0.16) / 2 = 0.12
    std = [0.2, 0.4, 0.0, math.sqrt(0.12)]
    assert member_std(MEMBERS).tolist() == pytest.approx(std)
    assert combine_member_rewards(MEMBERS, "mean").tolist() == pytest.approx(mean)
    assert combine_member_rewards(MEMBERS, "min").tolist() == pytest.approx([0.2, 0.1, 0.5, 0.1])
    assert combine_member_rewards(MEMBERS, "mean_minus_std", 0.5).tolist() == pytest.approx(
        [0.4 - 0.1, 0.5 - 0.2, 0.5, 0.5 - 0.5 * math.sqrt(0.12)])
    assert combine_member_rewards(MEMBERS, "mean_minus_std", 0.0).tolist() == pytest.approx(mean)
    two = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # M = 2: sample std = |a - b| / sqrt(2)
    assert member_std(two).tolist() == pytest.approx([1 / math.sqrt(2), 0.0])
    assert combine_member_rewards(two[:1], "mean").tolist() == [0.0, 1.0]  # one member is itself
    with pytest.raises(ValueError, match="M >= 2"):
        combine_member_rewards(two[:1], "mean_minus_std")
    with pytest.raises(ValueError, match="unknown ensemble mode 'median'"):
        combine_member_rewards(MEMBERS, "median")


def save_judge(root, name, seed, block=8, tok=TOK, preset="tiny"):
    torch.manual_seed(seed)
    judge = Judge(judge_config(preset, tok.n_chars, block))
    path = root / name
    save_checkpoint(path, kind="judge", model_config=judge.cfg, vocab=tok.to_dict(), weights=judge,
                    config={"seed": seed})
    return str(path)


def test_ensemble_reward_scores_with_every_member(tmp_path):
    paths = [save_judge(tmp_path, f"j{seed}", seed) for seed in (1, 2, 3)]
    tokens = enc("ab ab ab", "eeeeeeee", "abcdeabc")
    for mode, coef in (("mean", 1.0), ("mean_minus_std", 2.0), ("min", 1.0)):
        cfg = RewardConfig(kind="judge", judge_checkpoints=paths, ensemble=mode, ensemble_std_coef=coef)
        fn = build_reward(cfg, TOK)
        assert isinstance(fn, EnsembleJudgeReward) and fn.block_size == 8
        singles = torch.stack([compute_rewards(JudgeReward.from_checkpoint(p, TOK), tokens) for p in paths])
        rewards, members = compute_member_rewards(fn, tokens)
        assert members.shape == (3, 3) and members.dtype == torch.float32
        assert torch.allclose(members, singles)
        assert torch.allclose(rewards, combine_member_rewards(singles, mode, coef))
        assert torch.allclose(compute_rewards(fn, tokens), rewards)
    # a reward that is not an ensemble is its own single member
    fn = build_reward(RewardConfig(kind="char_frequency", chars="e"), TOK)
    rewards, members = compute_member_rewards(fn, tokens)
    assert members.tolist() == [rewards.tolist()] == [[0.0, 1.0, 0.125]]


def test_ensemble_members_must_agree(tmp_path):
    a = save_judge(tmp_path, "a", 1)
    short = save_judge(tmp_path, "short", 2, block=16)
    with pytest.raises(ValueError, match="member 1 scores windows of 16 characters, member 0 of 8"):
        build_reward(RewardConfig(kind="judge", judge_checkpoints=[a, short]), TOK)
    other_tok = CharTokenizer.from_text("abcdefg \n")
    other = save_judge(tmp_path, "other", 3, tok=other_tok)
    with pytest.raises(VocabularyError):
        EnsembleJudgeReward([JudgeReward.from_checkpoint(a), JudgeReward.from_checkpoint(other)])
    with pytest.raises(ValueError, match="at least two judges"):
        EnsembleJudgeReward([JudgeReward.from_checkpoint(a)])


@pytest.mark.parametrize("fields, message", [
    ({"judge_checkpoint": "a", "judge_checkpoints": ["b", "c"]}, "not both"),
    ({"judge_checkpoints": ["b"]}, "at least two judges"),
    ({"judge_checkpoints": ["b", "b"]}, "names a judge twice"),
    ({"judge_checkpoint": "a", "ensemble": "min"}, "combine the judges of reward.judge_checkpoints"),
    ({"judge_checkpoint": "a", "ensemble_std_coef": 2.0}, "combine the judges of reward.judge_checkpoints"),
    ({"kind": "char_frequency", "ensemble": "min"}, "combine the judges of reward.judge_checkpoints"),
    ({}, "needs reward.judge_checkpoint"),
])
def test_ensemble_config_errors(fields, message):
    overrides = [f"reward.{k}={v}" for k, v in fields.items()]
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, overrides=["reward.kind=judge", *overrides])


def test_configs_round_trip_through_their_dicts():
    """Checkpoints and Tune trials store a config as its full dict and validate it again."""
    for cfg in (TrainConfig(), load_config(TrainConfig, overrides=[
            "reward.kind=judge", "reward.judge_checkpoints=[a,b]", "reward.ensemble=min"])):
        assert TrainConfig.model_validate(to_dict(cfg)) == cfg


def test_ensemble_config_paths():
    cfg = RewardConfig(kind="judge", judge_checkpoints=["a", "b"], ensemble="mean_minus_std", ensemble_std_coef=0.5)
    assert cfg.judge_paths == ["a", "b"]
    assert RewardConfig(kind="judge", judge_checkpoint="a").judge_paths == ["a"]
    assert RewardConfig(kind="char_frequency").judge_paths == []
