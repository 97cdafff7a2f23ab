"""GSM8K scoring: exact match of the final number.

A GSM8K reference answer is a worked solution ending in `#### <number>`. The final number of a text
is the first number after its last `####`; a text without `####` (a model that answers "The answer
is: 18", as MetaMathQA-trained models do) gives its last number. Numbers are compared after
normalisation: thousands commas, a leading `$` or `+` and a trailing `%` go, and trailing decimal
zeros are dropped (`1,000.00` -> `1000`, `$18.50` -> `18.5`, `-0` -> `0`). A text with no number
never matches.
"""

from __future__ import annotations

import re

ANSWER_MARK = "####"
NUMBER = re.compile(r"(?:(?<![\d)])[-+])?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")  # "7-2" is 7 and 2, not 7 and -2


def normalize_number(text: str) -> str:
    number = text.replace(",", "").replace("$", "").lstrip("+")
    negative = number.startswith("-")
    number = number.lstrip("-")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    number = number.lstrip("0") or "0"
    if number.startswith("."):
        number = "0" + number
    return "-" + number if negative and number != "0" else number


def final_number(text: str) -> str | None:
    """The normalised final number of a solution or model output, or None."""
    if ANSWER_MARK in text:
        found = NUMBER.search(text.rsplit(ANSWER_MARK, 1)[1])
    else:
        numbers = NUMBER.findall(text)
        found = numbers[-1] if numbers else None
    if found is None:
        return None
    return normalize_number(found if isinstance(found, str) else found.group())


def exact_match(prediction: str, reference: str) -> bool:
    predicted = final_number(prediction)
    return predicted is not None and predicted == final_number(reference)


def gsm8k_accuracy(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions whose final number equals the reference's."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references to score")
    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(references)


def gsm8k_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """What every evaluation reports: `accuracy`, the final-number exact match."""
    return {"accuracy": gsm8k_accuracy(predictions, references)}
