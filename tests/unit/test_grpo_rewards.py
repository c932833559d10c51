"""Reward functions (raylm.rewards) without Ray: TRL's calling convention, user files named
module:function from the working directory, the built-ins, the nansum of weighted rewards, and a
function that raises named with its sample."""

import math
import textwrap

import numpy as np
import pytest

from raylm import rewards
from raylm.rewards import RewardError, combine, exact_match, format_regex, length, load_reward, reward_modules, score

CHAT = [[{"role": "user", "content": "What is 2+3?"}]] * 4
DONE = [[{"role": "assistant", "content": c}] for c in (" 5", "5.", " 6", "five")]


def test_exact_match_numbers_and_text():
    assert exact_match(CHAT, DONE, answer=["5"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert exact_match(["q"] * 3, [" five ", "5", "Five"], answer=["five", None, "five"]) == [1.0, None, 0.0]
    assert exact_match(["q"], ["-3 apples"], answer=[-3]) == [1.0]
    with pytest.raises(KeyError, match="'answer'"):
        exact_match(["q"], ["5"], solution=["5"])


def test_format_regex_and_length():
    assert format_regex(["q"] * 3, [" 5", "5 apples", "12\n"]) == [1.0, 0.0, 1.0]
    assert format_regex(["q"] * 2, ["<a>x</a>", "x"], format_pattern=[r"<a>.*</a>", r"<a>.*</a>"]) == [1.0, 0.0]
    assert rewards.regex_reward(r"\d+")(["q"], ["42"]) == [1.0]
    assert length(["q"] * 2, ["abc", "ab"], completion_ids=[[1, 2], [3]]) == [2.0, 1.0]
    assert length(CHAT[:1], [[{"role": "assistant", "content": "abc"}]]) == [3.0]


def test_weighted_sum_skips_none_as_trl_does():
    per_func = score(["raylm.rewards:exact_match", "raylm.rewards:length"], [exact_match, length], ["q"] * 3,
                     ["5", "6", "5"], [[1], [1, 2], [1]], {"answer": ["5", "5", None]})
    assert np.isnan(per_func[2, 0]) and per_func[:, 1].tolist() == [1.0, 2.0, 1.0]
    assert combine(per_func, [1.0, 0.5]).tolist() == [1.5, 1.0, 0.5]
    only_none = score(["raylm.rewards:exact_match"], [exact_match], ["q"], ["5"], [[1]], {"answer": [None]})
    assert math.isnan(combine(only_none, [1.0])[0])  # unscorable: no reward at all, not 0


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def correct(prompts, completions, answer, **kwargs):
            return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

        def picky(prompts, completions, **kwargs):
            return [1.0 / (len(c) - 3) for c in completions]   # raises on a completion of 3 characters

        def short(prompts, completions, **kwargs):
            return [1.0]

        def wordy(prompts, completions, **kwargs):
            return ["yes" for _ in completions]
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # undone after the test (load_reward adds the cwd itself)
    return tmp_path


def test_user_file_from_the_working_directory(user_dir):
    fn = load_reward("my_rewards:correct")
    assert score(["my_rewards:correct"], [fn], ["q", "q"], ["5", "6"], [[1], [2]], {"answer": ["5", "5"]}).tolist() \
        == [[1.0], [0.0]]
    assert reward_modules(["my_rewards:correct", "raylm.rewards:length"]) == [str(user_dir / "my_rewards.py")]


def test_bad_reward_functions_are_errors_naming_function_and_sample(user_dir):
    with pytest.raises(RewardError, match="cannot import 'nowhere'"):
        load_reward("nowhere:fn")
    with pytest.raises(RewardError, match="has no function 'missing'"):
        load_reward("my_rewards:missing")
    picky = load_reward("my_rewards:picky")
    with pytest.raises(RewardError, match=r"my_rewards:picky raised on sample 1 \(prompt 'q2', completion 'abc'\).*"
                                          r"ZeroDivisionError"):
        score(["my_rewards:picky"], [picky], ["q1", "q2"], ["abcd", "abc"], [[1], [2]], {})
    with pytest.raises(RewardError, match="my_rewards:short returned 1 rewards for 2 completions"):
        score(["my_rewards:short"], [load_reward("my_rewards:short")], ["q"] * 2, ["a", "b"], [[1], [2]], {})
    with pytest.raises(RewardError, match="my_rewards:wordy returned 'yes' for sample 0"):
        score(["my_rewards:wordy"], [load_reward("my_rewards:wordy")], ["q"], ["a"], [[1]], {})


def test_gsm8k_reads_the_answer_after_the_hashes():
    from raylm.rewards import gsm8k, gsm8k_answer, gsm8k_flexible

    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert exact_match(["q"], ["#### 72"], answer=[gold]) == [0.0]  # why it needs its own: the answer is a solution
    assert gsm8k_answer(gold) == 72.0
    assert gsm8k_answer("#### 1,234") == 1234.0 and gsm8k_answer("so #### $18.00") == 18.0
    assert gsm8k_answer("#### -5") == -5.0 and gsm8k_answer("#### 3.5") == 3.5
    assert gsm8k_answer("#### 4 then #### 7") == 7.0  # the last one
    assert gsm8k_answer("It is 72.") is None and gsm8k_answer("It is 70 or 72.", strict=False) == 72.0
    assert gsm8k_answer("no number", strict=False) is None
    completions = ["24 in May, 72 in all.\n#### 72", "#### 72.0", "####72", "The answer is 72.", "#### 71", "####"]
    assert gsm8k(["q"] * 6, completions, answer=[gold] * 6) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert gsm8k_flexible(["q"] * 6, completions, answer=[gold] * 6) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    chat = [[{"role": "assistant", "content": "#### 1,000"}]]
    assert gsm8k(CHAT[:1], chat, answer=["... #### 1000"]) == [1.0]
    assert gsm8k(["q"] * 3, ["#### 5"] * 3, answer=["5", None, "no final answer"]) == [1.0, None, None]
    with pytest.raises(KeyError, match="'answer'"):
        gsm8k(["q"], ["#### 5"], solution=["#### 5"])
