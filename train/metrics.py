"""Task metrics for `lorabox eval`: which ones a recipe's task preset implies, computed with maintained libraries."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

# task preset -> the metrics that judge its answers against the references
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "summarization": ("rouge",),
    "code": ("bleu", "exact_match"),
    "instruction": ("bleu", "exact_match"),
    "classification": ("accuracy",),
}
# metric -> (import name, PyPI name as pixi.toml pins it)
LIBRARIES = {"rouge": ("rouge_score", "rouge-score"), "bleu": ("sacrebleu", "sacrebleu")}
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class MissingMetricLibrary(Exception):
    """A metrics package is not installed; the message names it and how to add it."""


def task_of(presets: list[str]) -> str | None:
    """The recipe's task preset (the last one wins, as presets apply in order), or None."""
    tasks = [name for name in presets if name in TASK_METRICS]
    return tasks[-1] if tasks else None


def check_libraries(metrics: tuple[str, ...]) -> None:
    """Raise MissingMetricLibrary before any model loads, naming each absent package."""
    missing = [LIBRARIES[m][1] for m in metrics if m in LIBRARIES and importlib.util.find_spec(LIBRARIES[m][0]) is None]
    if missing:
        raise MissingMetricLibrary(
            f"the metrics need {', '.join(missing)}, which this environment lacks; it is pinned in pixi.toml: "
            f"run `pixi install` (or `pip install {' '.join(missing)}` in a plain venv)"
        )


def rouge(answers: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (Google's rouge-score, the reference implementation), in 0..1."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(ref, answer) for answer, ref in zip(answers, references, strict=True)]
    return {kind: sum(s[kind].fmeasure for s in scores) / len(scores) for kind in ROUGE_TYPES}


def bleu(answers: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu's standard 13a tokenisation), in 0..100."""
    import sacrebleu

    return sacrebleu.corpus_bleu(answers, [references]).score


def exact_match(answers: list[str], references: list[str]) -> float:
    """Share of answers equal to their reference once surrounding whitespace is stripped."""
    return sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True)) / len(answers)


def accuracy(answers: list[str], references: list[str]) -> float:
    """Share of predicted labels equal to the reference label, ignoring case and surrounding whitespace."""
    return sum(a.strip().casefold() == r.strip().casefold() for a, r in zip(answers, references, strict=True)) / len(
        answers
    )


def task_scores(metrics: tuple[str, ...], answers: list[str], references: list[str]) -> dict[str, Any]:
    """{metric: value} for the named metrics over parallel lists of answers and references."""
    scores: dict[str, Any] = {}
    for name in metrics:
        if name == "rouge":
            scores |= rouge(answers, references)
        elif name == "bleu":
            scores["bleu"] = bleu(answers, references)
        elif name == "exact_match":
            scores["exact_match"] = exact_match(answers, references)
        elif name == "accuracy":
            scores["accuracy"] = accuracy(answers, references)
    return scores


def perplexity(loss: float) -> float:
    """exp(mean token loss); inf rather than OverflowError when the loss is huge."""
    return math.exp(loss) if loss < 700 else math.inf
