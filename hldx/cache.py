"""`python -m hldx.cache`: build or verify the teacher cache (the format is hldx.store's).

    python -m hldx.cache build <hydra overrides>    # this worker's share: cache.task of cache.tasks
    python -m hldx.cache verify dir=DIR             # exit 1 naming every bad shard

`build` composes the same config as `python -m hldx.run` (every override works), checks it whole, then
builds the shards of the worker's share that are missing, with the teacher of the config (pre-trained
first when it is the on-demand one). On SLURM, an array job's tasks split the shards between them.
"""
from __future__ import annotations

import sys
from pathlib import Path

from hldx import cli, config, data, job
from hldx.device import device_of
from hldx.errors import UserError
from hldx.store import task_rows, verify
from hldx.teacher import build_cache, cache_spec

def build(overrides: list[str]) -> int:
    """Build this worker's share (cache.task of cache.tasks) of the cache of the composed config."""
    cfg = config.compose(overrides)
    job.check(cfg)
    tokenizer = data.tokenizer_for(cfg)
    stream = data.prepare(cfg, "train", tokenizer)
    job.ensure_teacher(cfg)
    spec = cache_spec(cfg, tokenizer, stream)
    root = build_cache(cfg, spec, stream, device_of(cfg), task_rows(spec, cfg.cache.task, cfg.cache.tasks))
    print(f"{'complete' if (root / 'manifest.json').exists() else 'partial'}: {root}")
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
