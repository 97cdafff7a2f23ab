"""Generated grade-school arithmetic problems in GSM8K's format, so the CLM smoke run needs no downloads.

Each row has GSM8K's `question` and `answer` columns; the answer is a one-step worked solution with
a `<<a+b=c>>` calculator annotation and the final `#### c` line, as in GSM8K.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ann", "Ben", "Carla", "Dev", "Emma", "Femi", "Gus", "Hana", "Ivo", "Jia"]
ITEMS = ["apples", "books", "coins", "pencils", "stickers", "marbles", "cookies", "cards"]


def _problem(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.choice(("add", "sub", "mul"))
    if kind == "add":
        question = f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?"
        step, result = f"{a}+{b}", a + b
        text = f"{name} has {a} + {b} = <<{step}={result}>>{result} {item} now."
    elif kind == "sub":
        a += b
        question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        step, result = f"{a}-{b}", a - b
        text = f"{name} has {a} - {b} = <<{step}={result}>>{result} {item} left."
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        question = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} does {name} buy?"
        step, result = f"{a}*{b}", a * b
        text = f"{name} buys {a} * {b} = <<{step}={result}>>{result} {item}."
    return {"question": question, "answer": f"{text}\n#### {result}"}


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [_problem(rng) for _ in range(n)]


def write_arithmetic_gsm8k(data_dir: str | Path, n_train: int = 512, n_test: int = 64, seed: int = 0) -> Path:
    """DATA_DIR/gsm8k/{train,test}.jsonl, the layout `run_clm.py --data_dir` reads."""
    folder = Path(data_dir, "gsm8k")
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, split_seed in (("train", n_train, seed), ("test", n_test, seed + 1)):
        rows = arithmetic_rows(n, split_seed)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder
