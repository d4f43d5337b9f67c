"""hldx.evaluation (and python -m hldx.evaluate) on a tiny Gemma3 checkpoint and the hand-written fixtures in each hub schema (offline)."""
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lm_eval
import lm_eval.tasks
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from hldx import data
from hldx.config import ConfigError, compose
from hldx.evaluation import DOWNSTREAM, RANDOM_ERR, evaluate, evaluate_checkpoint, log_perplexity, wikitext_articles

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
ROOT = Path(__file__).parent.parent
SEQ_LEN = 128


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HLDX_CACHE", str(tmp_path / "cache"))


def strings(value) -> list[str]:
    """Every string inside a JSON value."""
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [s for v in items for s in strings(v)]


def fixture_texts() -> list[str]:
    """Every string of every fixture (what the test tokenizer is trained on)."""
    return [s for file in sorted(FIXTURES.glob("*.jsonl")) for line in file.read_text().splitlines()
            for s in strings(json.loads(line))]


def tiny_model(vocab_size: int) -> Gemma3ForCausalLM:
    """A random 2-layer Gemma3 with a wide init, so that its predictions differ between choices."""
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=2 * SEQ_LEN, sliding_window=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.3)).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint as hldx saves one: the HF model directory with its byte-level BPE tokenizer beside it."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(fixture_texts(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def config(ckpt: Path, *overrides: str):
    return compose([f"++ckpt={ckpt}", f"train.seq_len={SEQ_LEN}", "train.device=cpu", "eval.batch_size=4",
                    *overrides])


def loaded(ckpt: Path):
    return Gemma3ForCausalLM.from_pretrained(ckpt), PreTrainedTokenizerFast.from_pretrained(ckpt)


# ---- log-perplexity ------------------------------------------------------------------------------------------

def test_log_perplexity_matches_a_token_by_token_computation(ckpt):
    model, _ = loaded(ckpt)
    tokens_NxL = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    nll = []  # each token scored by a forward over its prefix alone, softmax in float64
    for row in tokens_NxL:
        for t in range(1, len(row)):
            logits_V = model(input_ids=row[None, :t]).logits[0, -1].double()
            nll.append(-torch.log_softmax(logits_V, -1)[row[t]].item())
    expected = sum(nll) / len(nll)
    assert log_perplexity(model, tokens_NxL, batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert abs(expected - torch.log(torch.tensor(model.config.vocab_size)).item()) > 0.1  # not a uniform model


def test_wikitext_is_packed_articles_followed_by_eos(ckpt):
    lines = [json.loads(line)["text"] for line in (FIXTURES / "wikitext103.jsonl").read_text().splitlines()]
    articles = wikitext_articles(lines)
    assert [a.splitlines()[0] for a in articles] == [" = Harwick Lighthouse = ", " = The Golden Pear = "]
    assert "".join(articles) == "".join(lines)  # nothing lost, sections stay in their article

    model, tokenizer = loaded(ckpt)
    second = lines.index(" = The Golden Pear = \n")
    stream = []
    for article in ("".join(lines[:second]), "".join(lines[second:])):
        stream += tokenizer.encode(article, add_special_tokens=False) + [tokenizer.eos_token_id]
    rows = len(stream) // SEQ_LEN
    tokens_NxL = torch.tensor(stream[:rows * SEQ_LEN]).view(rows, SEQ_LEN)
    ev = evaluate(model, tokenizer, config(ckpt, f"eval.local_dir={FIXTURES}", "eval.tasks=[wikitext]"))
    assert ev.results["wikitext"] == {"logppl": log_perplexity(model, tokens_NxL, 4), "tokens": rows * (SEQ_LEN - 1)}


def test_val_logppl_reads_the_held_out_split_through_hldx_data(ckpt, tmp_path):
    texts = [json.loads(line)["text"] for line in (FIXTURES / "lambada_openai.jsonl").read_text().splitlines()]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, docs in (("train", texts[:4]), ("validation", texts[4:])):
        with gzip.open(corpus / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    cfg = config(ckpt, f"data.path={corpus}", "student.vocab_size=300", "eval.tasks=[val]", "eval.val_sequences=3",
                 "train.seq_len=16")
    tokenizer = data.tokenizer_for(cfg)
    model = tiny_model(len(tokenizer))
    eos = [tokenizer.eos_token_id]
    stream = [t for doc in texts[4:] for t in tokenizer.encode(doc, add_special_tokens=False) + eos]
    ev = evaluate(model, tokenizer, cfg)
    assert ev.metrics == {"eval/val_logppl": log_perplexity(model, torch.tensor(stream[:48]).view(3, 16), 4),
                          "eval/val_tokens": 45.0}


# ---- downstream tasks through lm-eval ----------------------------------------------------------------------------

def test_downstream_numbers_equal_lm_eval_simple_evaluate(ckpt):
    ev = evaluate_checkpoint(config(ckpt, f"eval.local_dir={FIXTURES}", "eval.limit=5",
                                    "eval.tasks=[hellaswag,piqa,arc_easy,winogrande,lambada]"))
    assert not ev.skipped

    # lm-eval alone: its registry of the built-in tasks, the checkpoint loaded by its HF model class, and the
    # same local files through a group that overrides each task's dataset.
    builtin = Path(lm_eval.tasks.__file__).parent
    manager = lm_eval.tasks.TaskManager(include_path=[str(builtin / Path(t.yaml).parent) for t in DOWNSTREAM.values()],
                                        include_defaults=False)
    members = [{"task": t.task, "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {t.split: str(FIXTURES / f"{t.task}.jsonl")}},
                "training_split": None, "validation_split": None, "test_split": None, f"{t.split}_split": t.split}
               for t in DOWNSTREAM.values()]
    reference = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(ckpt), "max_length": SEQ_LEN, "device": "cpu"}, batch_size=4,
        tasks=[{"group": "fixtures", "task": members}], task_manager=manager, limit=5, bootstrap_iters=0)

    err_from = {"hellaswag": "acc_norm", "piqa": "acc_norm", "arc_easy": "acc_norm", "winogrande": "acc",
                "lambada": "acc"}  # conf/eval/quick.yaml
    for name, spec in DOWNSTREAM.items():
        expected = {k.split(",")[0]: v for k, v in reference["results"][spec.task].items()
                    if k.endswith(",none") and "stderr" not in k}
        assert ev.results[name] == {**expected, "err": 1 - expected[err_from[name]], "n": 5.0}
    assert len({v for scores in ev.results.values() for v in scores.values()}) > 6  # the scores are not all alike


def test_a_missing_local_file_is_skipped_with_its_fix_and_the_rest_runs(ckpt, tmp_path):
    local = tmp_path / "local"
    shutil.copytree(FIXTURES, local)
    (local / "piqa.jsonl").unlink()
    model, tokenizer = loaded(ckpt)
    model.train()
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    ev = evaluate(model, tokenizer, config(ckpt, f"eval.local_dir={local}", "eval.tasks=[wikitext,piqa,winogrande]"))
    assert list(ev.results) == ["wikitext", "winogrande"]
    assert list(ev.skipped) == ["piqa"]
    assert str(local / "piqa.jsonl") in ev.skipped["piqa"] and "baber/piqa" in ev.skipped["piqa"]
    assert "eval.local_dir=null" in ev.skipped["piqa"]
    assert ev.tags()["hldx.eval_skipped.piqa"] == ev.skipped["piqa"]
    assert model.training and torch.equal(torch.rand(3), before)  # mode and the caller's RNG stream are kept


def test_config_errors_name_the_key(ckpt):
    model, tokenizer = loaded(ckpt)
    with pytest.raises(ConfigError, match=r"eval.err_from.winogrande=acc_norm .* expected one of acc"):
        evaluate(model, tokenizer, config(ckpt, "eval.err_from.winogrande=acc_norm"))
    with pytest.raises(ConfigError, match=r"eval.tasks has 'mmlu'"):
        evaluate(model, tokenizer, config(ckpt, "eval.tasks=[mmlu]"))
    with pytest.raises(ConfigError, match=r"ckpt=.*nowhere"):
        evaluate_checkpoint(config(ckpt.parent / "nowhere"))
    assert list(RANDOM_ERR.items()) == [("hellaswag", 0.75), ("piqa", 0.5), ("arc_easy", 0.75), ("winogrande", 0.5),
                                        ("lambada", 1.0)]  # Table 1's Random row, in its order


# ---- the command line ------------------------------------------------------------------------------------------

def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HLDX_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"), **env}
    return subprocess.run([sys.executable, "-m", "hldx.evaluate", f"train.seq_len={SEQ_LEN}", "train.device=cpu",
                           f"hydra.run.dir={tmp_path / 'hydra'}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_writes_json_and_logs_into_the_mlflow_run(ckpt, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MlflowClient(tracking_uri=uri)
    run_id = mlflow.create_run(mlflow.create_experiment("eval-test")).info.run_id
    mlflow.log_metric(run_id, "eval/piqa_err", 0.9, step=40)
    mlflow.set_tag(run_id, "hldx.eval_skipped.piqa", "an earlier failure")
    out = tmp_path / "eval.json"
    done = cli(tmp_path, f"ckpt={ckpt}", f"eval.local_dir={FIXTURES}", "eval.tasks=[wikitext,piqa,lambada]",
               f"eval.json={out}", f"eval.run_id={run_id}", f"tracking.uri={uri}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results) == ["wikitext", "piqa", "lambada"]
    assert set(results["piqa"]) == {"acc", "acc_norm", "err", "n"} and set(results["wikitext"]) == {"logppl", "tokens"}
    assert all(isinstance(v, float) for scores in results.values() for v in scores.values())
    assert "piqa" in done.stdout and "acc_norm" in done.stdout  # the printed table

    run = mlflow.get_run(run_id)
    assert run.data.metrics["eval/piqa_err"] == results["piqa"]["err"]  # latest: logged at step 40
    assert run.data.metrics["eval/wikitext_logppl"] == results["wikitext"]["logppl"]
    assert run.data.tags["hldx.eval_mode"] == "quick" and "hldx.eval_skipped.piqa" not in run.data.tags


def test_cli_offline_hub_tasks_are_skipped_with_the_override_that_fixes_them(ckpt, tmp_path):
    out = tmp_path / "eval.json"
    done = cli(tmp_path, f"ckpt={ckpt}", "eval.tasks=[wikitext,hellaswag,arc_easy]", f"eval.json={out}",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.read_text()) == {}
    table = [line for line in done.stdout.splitlines() if not line.startswith("[")]  # not the logged warnings
    skipped = {line.split()[0]: line for line in table if line.split()[1:2] == ["skipped:"]}
    assert set(skipped) == {"wikitext", "hellaswag", "arc_easy"}
    assert "Salesforce/wikitext" in skipped["wikitext"] and "wikitext103.jsonl" in skipped["wikitext"]
    assert "Rowan/hellaswag" in skipped["hellaswag"] and "hellaswag.jsonl" in skipped["hellaswag"]
    assert "allenai/ai2_arc" in skipped["arc_easy"] and "eval.local_dir=DIR" in skipped["arc_easy"]
    warned = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("[") and "skipped" in line]
    assert len(warned) == 1 and "3 task(s) skipped (wikitext, hellaswag, arc_easy)" in warned[0]  # one line
