"""`python -m hldx.cache`: build or verify the teacher cache (the format is hldx.store's).

    python -m hldx.cache build <hydra overrides>    # this worker's share: cache.task of cache.tasks
    python -m hldx.cache verify dir=DIR             # exit 1 naming every bad shard

`build` composes the same config as `python -m hldx.run` (every override works), checks it whole, then
builds the shards of the worker's share that are missing, with the teacher of the config (pre-trained first
when it is the on-demand one), for the rows that job reads (cache.rows, cache.hidden_rows: auto) or those
given. On SLURM, an array job's tasks split the shards between them, and a task's ranks split its share.
"""
from __future__ import annotations

import sys
from pathlib import Path

from hldx import cli, config, data, job
from hldx.device import device_of, join, world
from hldx.errors import UserError
from hldx.store import task_shards, verify
from hldx.teacher import build_cache, cache_dir, cache_spec

def build(overrides: list[str]) -> int:
    """Build this worker's share of the cache of the composed config: the shards of cache.task of cache.tasks
    (SLURM array tasks), split again over the job's ranks when it has several."""
    cfg = config.compose(overrides)
    plan = job.check(cfg)
    job.ensure_teacher(cfg)  # before the ranks join: one process pre-trains it, the others wait for its lock
    join(cfg, alone=False)
    rank, size = world()
    tokenizer = data.tokenizer_for(cfg)
    rows = data.training_rows(cfg, data.prepare(cfg, "train", tokenizer))
    spec = cache_spec(cfg, tokenizer, rows, plan)
    shards = task_shards(spec, cfg.cache.task * size + rank, cfg.cache.tasks * size)
    complete = build_cache(cfg, spec, rows, device_of(cfg), shards)
    print(f"{'complete' if complete else 'partial'} (shards {shards.start}..{shards.stop - 1} of this worker "
          f"built): {cache_dir(cfg, spec)}, top-k for rows [0, {spec.rows}), hidden states for [0, {spec.hidden_rows})")
    return 0


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if args and args[0] == "build":
        return build(args[1:])
    if len(args) != 2 or args[0] != "verify" or not args[1].startswith("dir="):
        raise UserError(f"expected `build <hydra overrides>` or `verify dir=DIR`, got "
                               f"{' '.join(args) or 'nothing'!r} (python -m hldx.cache --help)")
    root = args[1].removeprefix("dir=")
    if not Path(root).is_dir():
        raise UserError(f"dir={root} is invalid: expected the directory of a teacher cache")
    problems = verify(root)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"ok: {root}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
