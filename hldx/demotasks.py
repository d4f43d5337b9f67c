"""`python -m hldx.demotasks DIR [<overrides>]`: the demo's own evaluation tasks, offline.

Writes, for `eval.local_dir=DIR`, one JSONL file per task of hldx.evaluation in its hub dataset's schema, built
deterministically from the held-out split of `data` (the embedded corpus by default) and read by lm-eval's
own task code like the benchmarks' files. Each item comes from one held-out passage (a paragraph, stage
directions dropped, whitespace collapsed) whose first words are the context and whose next words are the true
continuation; the wrong choices are continuations taken from other passages:

  wikitext103     every held-out document as a WikiText article (" = Held-out document N = ", paragraphs)
  hellaswag       context; 4 endings              arc_easy    context as the question; 4 choices (A-D)
  piqa            context as the goal; 2 solutions
  winogrande      a word of the passage blanked (_); the true word against a word of another passage
  lambada_openai  a passage cut after a word of letters; that last word is the target

The true answer's position cycles through the choices (item i: i mod n), so a model indifferent between the
choices scores the chance rate exactly. `hldx-tasks.json` marks the folder as these tasks: the runs evaluated on
it are tagged hldx.eval_data=demo, and the report labels their columns as the demo's, not the benchmarks'.
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from omegaconf import DictConfig

from hldx import cli, config, data
from hldx.errors import UserError
from hldx.evaluation import DOWNSTREAM, MANIFEST, WIKITEXT_FILE

ITEMS = 100            # items per task (a multiple of 4: every position holds the true answer equally often)
CONTEXT_WORDS = 24     # at most this many words of context ...
CONTINUATION_WORDS = 8  # ... then this many of continuation
WORD = re.compile(r"[A-Za-z]{4,}")  # a word of letters: a blank of winogrande, a target of lambada


def passages(docs: list[str]) -> list[list[str]]:
    """The held-out paragraphs of at least 2 x CONTINUATION_WORDS words, as word lists, in corpus order."""
    out = []
    for doc in docs:
        for para in doc.split("\n\n"):
            words = re.sub(r"\[.*?\]", " ", para, flags=re.S).split()
            if len(words) >= 2 * CONTINUATION_WORDS:
                out.append(words)
    return out


def _cut(words: list[str]) -> tuple[str, str]:
    """A passage as (context, true continuation)."""
    k = min(CONTEXT_WORDS, len(words) - CONTINUATION_WORDS)
    return " ".join(words[:k]), " ".join(words[k:k + CONTINUATION_WORDS])


def _others(rng: random.Random, pool: list[list[str]], i: int, n: int) -> list[str]:
    """The continuations of n passages other than pool[i], none equal to pool[i]'s."""
    true, picked = _cut(pool[i])[1], []
    while len(picked) < n:
        j = rng.randrange(len(pool))
        if j != i and (c := _cut(pool[j])[1]) != true and c not in picked:
            picked.append(c)
    return picked


def _choices(rng: random.Random, pool: list[list[str]], i: int, n: int) -> tuple[str, list[str], int]:
    """(context, n choices, index of the true one: i mod n)."""
    context, true = _cut(pool[i])
    choices = _others(rng, pool, i, n - 1)
    choices.insert(i % n, true)
    return context, choices, i % n


def hellaswag(rng: random.Random, pool: list[list[str]]) -> list[dict]:
    rows = []
    for i in range(ITEMS):
        context, endings, label = _choices(rng, pool, i, 4)
        rows.append({"ind": i, "activity_label": "Held-out passage", "ctx_a": context, "ctx_b": "",
                     "ctx": context + " ", "endings": endings, "source_id": f"hldx-demo-{i}", "split": "val",
                     "split_type": "indomain", "label": str(label)})
    return rows


def piqa(rng: random.Random, pool: list[list[str]]) -> list[dict]:
    rows = []
    for i in range(ITEMS):
        goal, (sol1, sol2), label = _choices(rng, pool, i, 2)
        rows.append({"goal": goal, "sol1": sol1, "sol2": sol2, "label": label})
    return rows


def arc_easy(rng: random.Random, pool: list[list[str]]) -> list[dict]:
    rows = []
    for i in range(ITEMS):
        question, texts, label = _choices(rng, pool, i, 4)
        rows.append({"id": f"hldx-demo-{i}", "question": question,
                     "choices": {"text": texts, "label": list("ABCD")}, "answerKey": "ABCD"[label]})
    return rows


def winogrande(rng: random.Random, pool: list[list[str]]) -> list[dict]:
    rows = []
    for i, words in enumerate(pool):
        if len(rows) == ITEMS:
            break
        context, continuation = _cut(words)
        blanks = [b for b, w in enumerate(context.split()) if WORD.fullmatch(w) and b >= 2]
        if not blanks:
            continue
        b = blanks[-1]  # the last whole word of the context: the continuation depends on it
        true, wrong = context.split()[b], None
        while wrong is None:
            words_j = [w for w in rng.choice(pool) if WORD.fullmatch(w) and w.lower() != true.lower()]
            wrong = rng.choice(words_j) if words_j else None
        options = [true, wrong] if len(rows) % 2 == 0 else [wrong, true]
        sentence = " ".join(context.split()[:b] + ["_"] + context.split()[b + 1:]) + " " + continuation
        rows.append({"sentence": sentence, "option1": options[0], "option2": options[1],
                     "answer": "1" if len(rows) % 2 == 0 else "2"})
    return rows


def lambada(rng: random.Random, pool: list[list[str]]) -> list[dict]:
    rows = []
    for words in pool:
        if len(rows) == ITEMS:
            break
        ends = [e for e in range(2 * CONTINUATION_WORDS, min(len(words), CONTEXT_WORDS + CONTINUATION_WORDS) + 1)
                if WORD.fullmatch(words[e - 1])]
        if ends:
            rows.append({"text": " ".join(words[:ends[-1]])})
    return rows


def wikitext(docs: list[str]) -> list[dict]:
    """Each held-out document as a WikiText-103 article: a heading, then its paragraphs, as WikiText's lines."""
    lines = []
    for n, doc in enumerate(docs, 1):
        lines += [{"text": ""}, {"text": f" = Held-out document {n} = \n"}, {"text": ""}]
        for para in doc.split("\n\n"):
            if text := " ".join(para.split()):
                lines += [{"text": f" {text} \n"}, {"text": ""}]
    return lines


BUILDERS = {"hellaswag": hellaswag, "piqa": piqa, "arc_easy": arc_easy, "winogrande": winogrande,
            "lambada": lambada}


def write(cfg: DictConfig, out: Path, seed: int = 0) -> dict[str, int]:
    """Write every task's file (and the manifest) into `out`; {file stem: items}. The same cfg and seed give
    the same bytes."""
    docs = list(data.documents(cfg, "validation"))
    pool = passages(docs)
    random.Random(seed).shuffle(pool)
    if len(pool) < 2 * ITEMS:
        raise UserError(f"data={cfg.data.name}'s held-out split has {len(pool)} passages of at least "
                        f"{2 * CONTINUATION_WORDS} words: the demo tasks need {2 * ITEMS}")
    out.mkdir(parents=True, exist_ok=True)
    files = {WIKITEXT_FILE: wikitext(docs)}
    for name, build in BUILDERS.items():
        files[DOWNSTREAM[name].task] = build(random.Random(f"{seed}-{name}"), pool)
    for stem, rows in files.items():
        (out / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = {stem: len(rows) for stem, rows in files.items()}
    (out / MANIFEST).write_text(json.dumps({"label": "demo", "source": f"the held-out split of data={cfg.data.name}",
                                            "seed": seed, "items": counts}, indent=1) + "\n")
    return counts


@cli.command
def main(argv: list[str] | None = None) -> int:
    if (args := cli.command_args(argv, __doc__)) is None:
        return 0
    if not args or "=" in args[0]:
        raise UserError("expected the directory to write into first: python -m hldx.demotasks DIR [<overrides>]")
    out = Path(args[0])
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is invalid: expected a directory to write the demo tasks into")
    counts = write(config.compose(args[1:]), out)
    print(f"wrote the demo tasks to {out}: " + ", ".join(f"{k}.jsonl ({v})" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
