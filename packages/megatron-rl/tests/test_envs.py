"""Environments and their verifiers; the char tokenizer."""

from __future__ import annotations

import json

import pytest

from mcore.core import McoreError, get_registry
from megatron_rl.envs import (
    ArithmeticEnv,
    MathAnswerEnv,
    StringTaskEnv,
    answers_match,
    extract_answer,
    per_position_reward,
)
from megatron_rl.envs.math_answer import SAMPLE_SET, as_number
from megatron_rl.tokenizer import CharTokenizer


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("first \\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("nested \\boxed{\\text{a}_{1}} end", "\\text{a}_{1}"),
        ("bare \\boxed 7 done", "7"),
        ("step 1: 10 apples\n#### 1,250", "1,250"),
        ("We have 3 cats and 12 dogs, so 15 pets.", "15"),
        ("a fraction 3/4 at the end", "3/4"),
        ("no number here", None),
    ],
)
def test_answer_extraction(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer


def test_answers_match_exactly_after_normalisation() -> None:
    assert answers_match("1,000", "1000")
    assert answers_match("$0.5$", "\\frac{1}{2}")
    assert answers_match("\\dfrac{2}{4}", "1/2")
    assert answers_match("6.50", "6.5")
    assert answers_match("\\text{ 12 }.", "12")
    assert answers_match("-3", "-3.0")
    assert not answers_match("13", "12")
    assert not answers_match(None, "12")
    assert answers_match("x + 1", "x+1")  # not a number: compared as text
    assert as_number("\\frac12") == as_number("0.5")
    assert as_number("1/0") is None


def test_math_answer_env_scores_and_reads_jsonl(tmp_path) -> None:
    env = MathAnswerEnv.from_jsonl(SAMPLE_SET)
    assert len(env.records) == 20
    first_pass = {env.problem(i).id for i in range(20)}
    assert first_pass == set(range(20))  # one pass visits every problem once
    problem = env.problem(3)
    assert problem.prompt.startswith("Question: ") and problem.prompt.endswith("Answer:")
    assert env.score(problem, f"... so \\boxed{{{problem.answer}}}").reward == 1.0
    assert env.score(problem, "I think \\boxed{-999}").reward == 0.0
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "2+2?", "answer": "two plus two\n#### 4"}) + "\n")
    gsm = MathAnswerEnv.from_jsonl(data)
    assert gsm.problem(0).answer == "4"
    assert gsm.score(gsm.problem(0), "It is 4.").info == {"accuracy": 1.0, "answered": 1.0}
    data.write_text('{"question": "no answer"}\n')
    with pytest.raises(McoreError, match=r"gsm.jsonl:1 lacks 'answer'"):
        MathAnswerEnv.from_jsonl(data)
    with pytest.raises(McoreError, match="rl.env_data_path: cannot read"):
        MathAnswerEnv.from_jsonl(tmp_path / "missing.jsonl")


def test_arithmetic_env_verifies_and_asks_again() -> None:
    env = ArithmeticEnv(max_operand=9, ops="+-*", seed=1)
    problems = [env.problem(i) for i in range(50)]
    assert [p.prompt for p in problems] == [env.problem(i).prompt for i in range(50)]
    for p in problems:
        a, op, b = p.prompt[0], p.prompt[1], p.prompt[2:-1]
        assert p.answer == eval(f"{a}{op}{b}")
    p = problems[0]
    right = env.score(p, f"{p.answer}\nmore text")
    assert (right.reward, right.done) == (1.0, True)
    assert env.score(p, str(p.answer), turn=1).reward == 0.5
    wrong = env.score(p, f"{p.answer}0")
    assert (wrong.reward, wrong.done) == (0.0, False)
    assert wrong.observation == f"\nno. again: {p.prompt}"


def test_string_tasks_give_dense_per_position_rewards() -> None:
    assert per_position_reward("abca", "abca") == 1.0
    assert per_position_reward("abda", "abca") == 0.75
    assert per_position_reward("abcaXX", "abca") == pytest.approx(4 / 6)  # too long costs
    assert per_position_reward("ab", "abca") == 0.5
    assert per_position_reward("", "ab") == 0.0
    copy = StringTaskEnv("copy", alphabet="xy", min_length=3, max_length=3, seed=0)
    reverse = StringTaskEnv("reverse", alphabet="xy", min_length=3, max_length=3, seed=0)
    p, q = copy.problem(5), reverse.problem(5)
    assert p.prompt.endswith("=") and len(p.answer) == 3 and set(p.answer) <= {"x", "y"}
    assert q.answer == p.answer[::-1]
    assert copy.score(p, p.answer).info == {"exact_match": 1.0}


def test_char_tokenizer_round_trips_and_names_unknown_characters() -> None:
    tok = CharTokenizer("ab=")
    assert tok.encode("ab=ba") == [0, 1, 2, 1, 0]
    assert (tok.eod, tok.bos, tok.pad, tok.vocab_size) == (3, 3, 3, 4)
    assert tok.decode([0, 1, tok.eod, 2]) == "ab="
    with pytest.raises(McoreError, match="'c' of 'abc' is not in"):
        tok.encode("abc")
    built = get_registry("tokenizer").get("char")(None)
    assert built.vocab_size == len(built.alphabet) + 1


def test_registered_environments_and_agents(tiny) -> None:
    config = tiny(rl__env_max_operand=5)
    envs = get_registry("rl_env")
    assert {"arithmetic", "string_copy", "string_reverse", "math_answer"} <= set(envs.names())
    assert envs.get("string_reverse")(config).name == "string_reverse"
    assert envs.get("arithmetic")(config).max_operand == 5
    assert len(envs.get("math_answer")(config).records) == 20
    assert {"single_turn", "multi_turn"} <= set(get_registry("rl_agent").names())


def test_demonstrations_are_correct_answers_and_their_absence_is_named() -> None:
    from megatron_rl.envs import ArithmeticEnv, StringTaskEnv
    from megatron_rl.envs.base import demonstration

    math = MathAnswerEnv.from_jsonl(SAMPLE_SET)
    for env in (StringTaskEnv("reverse"), StringTaskEnv("copy"), ArithmeticEnv(), math):
        for i in range(20):
            problem = env.problem(i)
            assert env.score(problem, demonstration(env, problem)).reward == 1.0

    class NoAnswers:
        name = "no_answers"

    with pytest.raises(McoreError, match=r"rl.sft_iters > 0 needs demonstrations.*'no_answers'"):
        demonstration(NoAnswers(), StringTaskEnv("copy").problem(0))
