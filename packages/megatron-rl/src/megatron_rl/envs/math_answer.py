"""``math_answer``: word and competition problems checked by exact answer extraction.

The model's answer is taken from its completion in this order: the last ``\\boxed{...}``
(braces balanced, ``\\fbox`` too), else the last ``#### ...`` line (GSM8K's convention), else
the last number in the text. Answer and reference are normalised (``$``, ``\\text{}``,
``\\left``/``\\right``, spaces, thousands separators and a trailing period go) and compared as
exact rationals when both are numbers (``0.5`` equals ``\\frac{1}{2}`` and ``1/2``; ``1,000``
equals ``1000``), otherwise as strings. Reward 1 for a match, else 0.

Problems come from ``rl.env_data_path``, a JSONL file of ``{"question": ..., "answer": ...}``
objects (a GSM8K-style answer ending in ``#### 42`` is reduced to ``42``), or from the small
sample set shipped with the package (``envs/data/math_sample.jsonl``).
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from megatron_rl.envs.base import Feedback, Problem, read_jsonl

SAMPLE_SET = Path(__file__).parent / "data" / "math_sample.jsonl"
PROMPT_TEMPLATE = "Question: {question}\nGive the final answer as \\boxed{{...}}.\nAnswer:"

_HASHES = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def _boxed_contents(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept), and of
    ``\\boxed 5`` without braces."""
    found = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        i = match.end()
        if i < len(text) and text[i] == "{":
            depth, start = 0, i + 1
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    found.append(text[start:j])
                    break
        else:
            bare = re.match(r"[^\s$]+", text[i:])
            if bare:
                found.append(bare.group(0))
    return found


def extract_answer(text: str) -> str | None:
    """The final answer a completion states (see the module docstring), or None."""
    boxed = _boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def normalize_answer(answer: str) -> str:
    """A canonical spelling: no ``$``, ``\\text{}`` wrappers, ``\\left``/``\\right``, spaces,
    thousands separators or trailing period; ``\\dfrac``/``\\tfrac`` become ``\\frac``."""
    s = answer.strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\(left|right)\b", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", s)
    return s.rstrip(".")


def as_number(answer: str) -> Fraction | None:
    """The exact value of a normalised answer that is a number: an integer, a decimal, ``a/b``
    or ``\\frac{a}{b}`` (signs allowed); None for anything else."""
    s = normalize_answer(answer)
    frac = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(
        r"(-?)\\frac(\d)(\d)", s
    )
    try:
        if frac:
            sign = -1 if frac.group(1) else 1
            return sign * Fraction(int(frac.group(2)), int(frac.group(3)))
        if re.fullmatch(r"-?\d+/-?\d+", s):
            num, den = s.split("/")
            return Fraction(int(num), int(den))
        if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Exact equality of two answers after normalisation (as numbers when both are)."""
    if predicted is None:
        return False
    a, b = as_number(predicted), as_number(reference)
    if a is not None and b is not None:
        return a == b
    return normalize_answer(predicted) == normalize_answer(reference)


class MathAnswerEnv:
    """Problems from a list of ``{"question", "answer"}`` records, in a seeded order."""

    name = "math_answer"

    def __init__(
        self,
        records: list[dict[str, Any]],
        *,
        prompt_template: str = PROMPT_TEMPLATE,
        seed: int = 0,
    ) -> None:
        if not records:
            raise ValueError("MathAnswerEnv needs at least one problem")
        self.records = records
        self.prompt_template = prompt_template
        self.seed = seed

    @classmethod
    def from_jsonl(cls, path: str | Path, *, source: str = "rl.env_data_path", **kw: Any):
        """Problems of a JSONL file (``question`` and ``answer`` on every line)."""
        return cls(read_jsonl(path, required=("question", "answer"), source=source), **kw)

    def problem(self, index: int) -> Problem:
        # Every pass over the records is its own shuffle, seeded by the pass number.
        n = len(self.records)
        epoch, position = divmod(index, n)
        order = list(range(n))
        random.Random(f"{self.seed}/math/{epoch}").shuffle(order)
        record = self.records[order[position]]
        reference = str(record["answer"])
        reference = extract_answer(reference) if "####" in reference else reference.strip()
        return Problem(
            prompt=self.prompt_template.format(question=record["question"]),
            answer=reference,
            id=record.get("id", order[position]),
        )

    def demonstration(self, problem: Problem) -> str:
        """The reference answer, boxed as the prompt asks (for ``rl.sft_iters``)."""
        return f" \\boxed{{{problem.answer}}}"

    def score(self, problem: Problem, completion: str, turn: int = 0) -> Feedback:
        predicted = extract_answer(completion)
        correct = answers_match(predicted, problem.answer)
        return Feedback(
            reward=float(correct),
            info={"accuracy": float(correct), "answered": float(predicted is not None)},
        )


def build_math_answer(config: Any) -> MathAnswerEnv:
    """Registry entry ``math_answer``: ``rl.env_data_path``, or the shipped sample set."""
    path = config.rl.env_data_path
    if path is None:
        return MathAnswerEnv.from_jsonl(SAMPLE_SET, source="math_answer sample set")
    return MathAnswerEnv.from_jsonl(path, seed=config.train.seed)
