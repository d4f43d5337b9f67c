"""The demo's own tasks (python -m hldx.demotasks): deterministic, read by lm-eval's own task code in each hub
schema, and scored 0 error by an oracle that knows the held-out text and the chance rate by a model indifferent
between the choices."""
from __future__ import annotations

import json
import re

import pytest
from lm_eval.api.model import LM

from hldx import data
from hldx.config import compose
from hldx.demotasks import write
from hldx.evaluation import DOWNSTREAM, MANIFEST, RANDOM_ERR, WIKITEXT_FILE, data_label, downstream, wikitext_articles


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-tasks")
    write(compose([]), out)
    return out


class Scorer(LM):
    """An lm-eval model scoring each (context, continuation) request with `score`; nothing else is asked."""

    def __init__(self, score):
        super().__init__()
        self.score = score

    def loglikelihood(self, requests):
        return [self.score(*r.args) for r in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        raise NotImplementedError


def held_out_text() -> str:
    """The held-out paragraphs as the tasks see them: stage directions ([...] within one) dropped, whitespace
    collapsed."""
    docs = data.documents(compose([]), "validation")
    return "\n".join(" ".join(re.sub(r"\[.*?\]", " ", p, flags=re.S).split()) for d in docs for p in d.split("\n\n"))


def oracle(text: str):
    """Certain of a continuation that follows the context's last three words in the held-out text (the prompt's
    own "Answer:" set aside), and of nothing else."""
    def score(context: str, continuation: str) -> tuple[float, bool]:
        words = context.split()
        words = words[:-1] if words[-1] == "Answer:" else words
        found = " ".join(words[-3:] + continuation.split()) in text
        return (0.0 if found else -100.0), found
    return score


def evaluated(tasks, lm) -> dict[str, dict[str, float]]:
    skipped = {}
    results = downstream(lm, compose([f"eval.local_dir={tasks}", "eval.limit=null"]), list(DOWNSTREAM), skipped)
    assert not skipped
    return results


def test_generated_twice_byte_identical(tasks, tmp_path):
    write(compose([]), tmp_path)
    files = sorted(p.name for p in tasks.iterdir())
    assert files == sorted([MANIFEST, f"{WIKITEXT_FILE}.jsonl", *(f"{t.task}.jsonl" for t in DOWNSTREAM.values())])
    assert all((tasks / f).read_bytes() == (tmp_path / f).read_bytes() for f in files)


def test_an_oracle_scores_no_error_and_an_indifferent_model_the_chance_rate(tasks):
    right = evaluated(tasks, Scorer(oracle(held_out_text())))
    assert {name: (r["err"], r["n"]) for name, r in right.items()} == {name: (0.0, 100.0) for name in DOWNSTREAM}
    indifferent = evaluated(tasks, Scorer(lambda context, continuation: (0.0, False)))  # lm-eval takes the first
    assert {name: r["err"] for name, r in indifferent.items()} == RANDOM_ERR


def test_wikitext_holds_each_held_out_document_as_an_article_and_the_folder_is_labelled_demo(tasks):
    lines = [json.loads(line)["text"] for line in (tasks / f"{WIKITEXT_FILE}.jsonl").read_text().splitlines()]
    docs = list(data.documents(compose([]), "validation"))
    articles = wikitext_articles(lines)
    assert len(articles) == len(docs)
    assert " ".join(articles[-1].split()[5:]) == " ".join(docs[-1].split())  # after " = Held-out document N = "
    assert data_label(compose([f"eval.local_dir={tasks}"])) == "demo"
    assert data_label(compose([f"eval.local_dir={tasks.parent}"])) == "local"
    assert data_label(compose([])) == "hub"
