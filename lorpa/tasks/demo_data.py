"""Synthetic sentiment data in the GLUE/SST-2 schema for the offline demo (and summarization articles).

The demo has to fine-tune a real model without network access and without
shipping third-party corpus text, so the reviews are generated here from
templates and hand-written word lists. The grammar is chosen so that the label
is a fixed rule of the sentence but not of its keywords: negation flips the
polarity of a sentiment word (also without the token "not": "far from good"), in
contrast sentences ("X but Y", "although X, Y", "Y, even though X") only the main
clause decides while the other clause carries the opposite sentiment, and a quoted
expectation or opinion ("I expected it to be great, but it wasn't") is confirmed or
refused. A keyword counter therefore does clearly worse than a model that reads
structure, yet the data stays small enough to fine-tune on a CPU.

The same grammar writes short review articles in the XSum schema (document, summary, id) for the
summarization smoke test: the one-sentence summary names the item and whether the review as a
whole is positive, which the article says only through its clauses.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# Word lists are public so tests (and a keyword baseline) can use them.
POSITIVE_ADJECTIVES = (
    "good", "great", "excellent", "wonderful", "fantastic", "superb", "pleasant",
    "enjoyable", "impressive", "delightful", "solid", "lovely", "brilliant",
    "outstanding", "terrific",
)
NEGATIVE_ADJECTIVES = (
    "bad", "terrible", "awful", "poor", "disappointing", "dreadful", "mediocre",
    "horrible", "dull", "lousy", "unpleasant", "weak", "annoying", "miserable",
    "sloppy",
)
# (past tense, base form) so negated clauses read naturally: "didn't enjoy".
POSITIVE_VERBS = (("loved", "love"), ("enjoyed", "enjoy"), ("liked", "like"), ("adored", "adore"))
NEGATIVE_VERBS = (("hated", "hate"), ("disliked", "dislike"), ("loathed", "loathe"), ("despised", "despise"))
RECOMMEND_WORD = "recommend"  # positive
AVOID_WORD = "avoid"  # negative
N_TRAIN, N_VALIDATION = 2000, 400
N_SUMMARY_TRAIN, N_SUMMARY_VALIDATION = 800, 200

INTENSIFIERS = ("", "", "", "very ", "really ", "truly ", "extremely ", "incredibly ", "quite ", "pretty ")
# Softeners that still read naturally after a negation ("was not particularly good").
NEGATED_INTENSIFIERS = ("", "", "very ", "really ", "particularly ", "especially ")

# Each domain: reviewed items, aspects (nouns with aspect-specific adjectives), neutral filler.
DOMAINS = {
    "movie": {
        "items": ("movie", "film", "sequel", "documentary", "thriller", "comedy"),
        "aspects": (
            (("plot", "story", "script", "ending", "pacing", "dialogue"),
             ("gripping", "clever", "moving"), ("boring", "predictable", "tedious")),
            (("acting", "lead actor", "soundtrack", "cinematography", "villain", "cast"),
             ("convincing", "memorable"), ("wooden", "forgettable")),
        ),
        "filler": (
            "We watched it on a Saturday night.", "I saw it with my brother.",
            "It runs about two hours.", "The trailer came out last spring.",
            "I streamed it at home.", "We caught the late showing.",
            "It is based on a novel.", "The theater was half full.",
        ),
    },
    "product": {
        "items": ("blender", "backpack", "kettle", "desk lamp", "charger", "phone case", "keyboard", "tent"),
        "aspects": (
            (("build quality", "design", "handle", "zipper", "finish", "material"),
             ("sturdy", "durable", "elegant"), ("flimsy", "fragile", "clumsy")),
            (("battery", "motor", "switch", "cable", "setup", "manual"),
             ("reliable", "efficient"), ("faulty", "unreliable")),
        ),
        "filler": (
            "It arrived on a Tuesday.", "I bought it last month.", "It comes in three colors.",
            "I ordered it online.", "It was a gift for my sister.", "The box was blue.",
            "I have used it for a few weeks.", "It replaced my old one.",
        ),
    },
    "restaurant": {
        "items": ("restaurant", "place", "bistro", "cafe", "diner", "bakery"),
        "aspects": (
            (("food", "soup", "pasta", "pizza", "dessert", "steak", "salad", "bread"),
             ("delicious", "tasty", "fresh", "flavorful"), ("bland", "stale", "greasy", "soggy")),
            (("service", "staff", "waiter", "atmosphere", "decor", "music"),
             ("friendly", "attentive"), ("rude", "slow")),
        ),
        "filler": (
            "We went there for lunch.", "We had a table by the window.", "I ordered the special.",
            "We came on a Friday evening.", "It is near the train station.",
            "We were a group of four.", "I went with two coworkers.", "We paid by card.",
        ),
    },
}

POSITIVE_WORDS = frozenset(
    POSITIVE_ADJECTIVES
    + tuple(w for forms in POSITIVE_VERBS for w in forms)
    + tuple(a for d in DOMAINS.values() for _, pos, _ in d["aspects"] for a in pos)
    + (RECOMMEND_WORD,)
)
NEGATIVE_WORDS = frozenset(
    NEGATIVE_ADJECTIVES
    + tuple(w for forms in NEGATIVE_VERBS for w in forms)
    + tuple(a for d in DOMAINS.values() for _, _, neg in d["aspects"] for a in neg)
    + (AVOID_WORD,)
)

# Mostly empty so that about a third of the reviews get a neutral opener.
OPENERS = ("",) * 9 + ("Honestly, ", "Overall, ", "In my opinion, ", "To be honest, ", "All in all, ", "Frankly, ")


def _adjective(rng: random.Random, aspect_positive: tuple, aspect_negative: tuple, positive: bool) -> str:
    """An aspect-specific or generic sentiment adjective of the given polarity."""
    if positive:
        return rng.choice(aspect_positive + POSITIVE_ADJECTIVES)
    return rng.choice(aspect_negative + NEGATIVE_ADJECTIVES)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _clause(
    rng: random.Random, aspects: tuple, item: str, positive: bool, negated: bool, *, aspect_only: bool = False
) -> str:
    """One sentiment clause whose meaning is `positive`; with `negated` the sentiment
    word has the opposite polarity and a negation flips it back."""
    word_positive = positive != negated
    kind = "aspect" if aspect_only else rng.choice(("aspect", "aspect", "aspect", "item", "verb", "recommend"))
    if kind == "recommend" and negated and not word_positive:
        kind = "aspect"  # "I wouldn't avoid it" is not natural English; use another form.
    if kind == "aspect":
        nouns, pos, neg = rng.choice(aspects)
        noun, adjective = rng.choice(nouns), _adjective(rng, pos, neg, word_positive)
        if negated and rng.random() < 0.25:
            # Negators without "not", so a model cannot just look for that token.
            negator = rng.choice(("far from", "anything but", "hardly", "nowhere near"))
            return f"the {noun} was {negator} {adjective}"
        if negated:
            verb = rng.choice(
                ("was not", "wasn't", "was never", "is not", "isn't", "didn't seem", "did not feel", "never felt")
            )
            return f"the {noun} {verb} {rng.choice(NEGATED_INTENSIFIERS)}{adjective}"
        verb = rng.choice(("was", "was", "is", "seemed", "felt"))
        return f"the {noun} {verb} {rng.choice(INTENSIFIERS)}{adjective}"
    if kind == "item":
        adjective = rng.choice(POSITIVE_ADJECTIVES if word_positive else NEGATIVE_ADJECTIVES)
        modifier = rng.choice(NEGATED_INTENSIFIERS if negated else INTENSIFIERS) + adjective
        verb = rng.choice(("was not", "wasn't", "is not", "isn't")) if negated else rng.choice(("was", "is"))
        return f"it {verb} {_article(modifier)} {modifier} {item}"
    if kind == "verb":
        past, base = rng.choice(POSITIVE_VERBS if word_positive else NEGATIVE_VERBS)
        target = rng.choice((f"the {item}", f"this {item}", f"the {rng.choice(rng.choice(aspects)[0])}"))
        if negated:
            negation = rng.choice(("didn't", "did not", "don't", "do not"))
            return rng.choice((f"I {negation} {base} {target}", f"I never {past} {target}"))
        return f"I {rng.choice(('', 'really ', 'truly ', 'honestly '))}{past} {target}"
    if word_positive:
        if negated:
            modal = rng.choice(("would not", "wouldn't", "would never", "can't", "cannot"))
        else:
            modal = rng.choice(("would", "would happily", "can"))
        return f"I {modal} {RECOMMEND_WORD} this {item}"
    return f"I would {rng.choice(('', 'definitely ', 'strongly suggest you '))}{AVOID_WORD} this {item}"


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


def _verdict(rng: random.Random, domain: dict, positive: bool) -> str:
    """A stated expectation or second-hand opinion that the reviewer confirms or
    refuses, so the sentiment word alone says nothing about the label."""
    nouns, pos, neg = rng.choice(domain["aspects"])
    noun = rng.choice(nouns)
    word_positive = rng.random() < 0.5
    adjective = _adjective(rng, pos, neg, word_positive)
    confirmed = word_positive == positive
    if rng.random() < 0.5:
        ending = rng.choice(("and it was", "and it really was", "and it certainly was") if confirmed
                            else ("but it wasn't", "but it was not", "but it was not at all"))
        return f"I expected the {noun} to be {adjective}, {ending}."
    source = rng.choice(("my friends", "the reviews", "people online", "my neighbors", "the critics"))
    ending = rng.choice(("and they were right", "and I agree", "and I have to agree") if confirmed
                        else ("but they were wrong", "but I disagree", "but I have to disagree"))
    return f"{_capitalize(source)} said the {noun} was {adjective}, {ending}."


def _review(rng: random.Random, label: int) -> str:
    """One review whose label is decided by its main clause."""
    domain = DOMAINS[rng.choice(sorted(DOMAINS))]
    item = rng.choice(domain["items"])
    positive = bool(label)
    kind = rng.random()
    if kind < 0.55:
        main = _capitalize(_clause(rng, domain["aspects"], item, positive, rng.random() < 0.25)) + "."
    elif kind < 0.85:
        # The other clause carries the opposite sentiment, so the connective decides. It
        # talks about an aspect from another group than the main clause so the two never
        # contradict each other about the same thing.
        main_aspects, other_aspects = rng.sample(domain["aspects"], 2)
        main_clause = _clause(rng, (main_aspects,), item, positive, rng.random() < 0.2)
        other_clause = _clause(rng, (other_aspects,), item, not positive, rng.random() < 0.2, aspect_only=True)
        pattern = rng.choice((
            "{o}, but {m}.", "{o} but {m}.", "Although {o}, {m}.", "Even though {o}, {m}.",
            "{o}; however, {m}.", "{o}, yet {m}.", "{m}, even though {o}.", "{m}, although {o}.",
        ))
        main = _capitalize(pattern.format(o=other_clause, m=main_clause))
    else:
        main = _verdict(rng, domain, positive)
    opener = rng.choice(OPENERS)
    if opener and not main.startswith("I "):
        main = main[0].lower() + main[1:]
    parts = [opener + main]
    if rng.random() < 0.35:
        parts.insert(0 if rng.random() < 0.5 else 1, rng.choice(domain["filler"]))
    return " ".join(parts)


def generate_demo_glue(
    *, n_train: int = N_TRAIN, n_validation: int = N_VALIDATION, seed: int = 0
) -> dict[str, list[dict]]:
    """Rows for both splits: balanced labels, no sentence shared between splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in (("train", n_train), ("validation", n_validation)):
        labels = [i % 2 for i in range(size)]
        rng.shuffle(labels)
        rows = []
        for idx, label in enumerate(labels):
            for _ in range(1000):
                sentence = _review(rng, label)
                if sentence not in seen:
                    break
            else:
                raise ValueError(f"could not generate {size} unique {split} sentences")
            seen.add(sentence)
            rows.append({"sentence": sentence, "label": label, "idx": idx})
        splits[split] = rows
    return splits


def write_demo_glue(
    out_dir, *, n_train: int = N_TRAIN, n_validation: int = N_VALIDATION, seed: int = 0
) -> dict[str, Path]:
    """Write `train.jsonl` and `validation.jsonl` (glue/sst2 columns) and return their paths."""
    return _write(out_dir, generate_demo_glue(n_train=n_train, n_validation=n_validation, seed=seed))


def _summarized_article(rng: random.Random) -> tuple[str, str]:
    """(article, summary): two to four clauses of one polarity about one item, mixed with neutral filler."""
    domain = DOMAINS[rng.choice(sorted(DOMAINS))]
    item = rng.choice(domain["items"])
    positive = rng.random() < 0.5
    sentences = [_capitalize(_clause(rng, domain["aspects"], item, positive, rng.random() < 0.25)) + "."
                 for _ in range(rng.randint(2, 4))]
    sentences += rng.sample(domain["filler"], rng.randint(1, 2))
    rng.shuffle(sentences)
    verdict = rng.choice(("liked", "enjoyed", "recommends")) if positive else rng.choice(("disliked", "did not like"))
    who = "reviewer" if rng.random() < 0.5 else "customer" if domain is not DOMAINS["movie"] else "viewer"
    return " ".join(sentences), f"The {who} {verdict} the {item}."


def generate_demo_summaries(
    *, n_train: int = N_SUMMARY_TRAIN, n_validation: int = N_SUMMARY_VALIDATION, seed: int = 0
) -> dict[str, list[dict]]:
    """Rows for both splits in the XSum schema, no article shared between splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in (("train", n_train), ("validation", n_validation)):
        rows = []
        while len(rows) < size:
            document, summary = _summarized_article(rng)
            if document not in seen:
                seen.add(document)
                rows.append({"document": document, "summary": summary, "id": f"{split}-{len(rows)}"})
        splits[split] = rows
    return splits


def write_demo_summaries(
    out_dir, *, n_train: int = N_SUMMARY_TRAIN, n_validation: int = N_SUMMARY_VALIDATION, seed: int = 0
) -> dict[str, Path]:
    """Write `train.jsonl` and `validation.jsonl` (xsum columns) and return their paths."""
    return _write(out_dir, generate_demo_summaries(n_train=n_train, n_validation=n_validation, seed=seed))


def _write(out_dir, splits: dict[str, list[dict]]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in splits.items():
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        paths[split] = path
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lorpa.tasks.demo_data", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--kind", choices=("reviews", "summaries"), default="reviews",
                        help="reviews: SST-2 schema (sentence, label); summaries: XSum schema (document, summary)")
    parser.add_argument("--n_train", type=int, default=None,
                        help=f"default {N_TRAIN} reviews, {N_SUMMARY_TRAIN} articles")
    parser.add_argument("--n_validation", type=int, default=None,
                        help=f"default {N_VALIDATION} reviews, {N_SUMMARY_VALIDATION} articles")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.kind == "reviews":
        write, n_train, n_validation = write_demo_glue, N_TRAIN, N_VALIDATION
    else:
        write, n_train, n_validation = write_demo_summaries, N_SUMMARY_TRAIN, N_SUMMARY_VALIDATION
    paths = write(args.out_dir, n_train=args.n_train or n_train, n_validation=args.n_validation or n_validation,
                  seed=args.seed)
    for path in paths.values():
        print(path)


if __name__ == "__main__":
    main()
