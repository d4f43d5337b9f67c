"""`python -m hldx.evaluate`: the paper's seven numbers for a saved checkpoint (hldx.evaluation is the suite).

    python -m hldx.evaluate ckpt=DIR                      # quick: a few hundred examples per task
    python -m hldx.evaluate ckpt=DIR eval=full eval.json=results.json eval.run_id=ID

Prints the table; eval.json=PATH also writes {task: {metric: value}}; eval.run_id=ID logs the metrics into
that MLflow run (at tracking.uri) and drops its skip tags of the tasks now evaluated. A task whose data
cannot be read is skipped with the override that fixes it (eval.local_dir=DIR reads local JSONL files).
"""
from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from hldx import config as C
from hldx import cli, data, evaluation, job, tracking


@hydra.main(config_path="../conf", config_name="config", version_base=None)
@cli.task
def main(cfg: DictConfig) -> None:
    C.check(cfg)
    data.check(cfg)
    evaluation.check(cfg)
    job.check_inputs(cfg)
    out = cli.output_file("eval.json", cfg.eval.json) if cfg.eval.json else None
    result = evaluation.evaluate_checkpoint(cfg)
    print(result.table())
    if out:
        out.write_text(json.dumps(result.results, indent=2) + "\n")
    if cfg.eval.run_id:
        tracking.log_evaluation(cfg, cfg.eval.run_id, result.metrics, result.tags(), list(result.results))


if __name__ == "__main__":
    cli.run(main)
