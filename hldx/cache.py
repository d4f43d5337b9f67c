"""`python -m hldx.cache`: build or verify the teacher cache (the format is hldx.store's).

    python -m hldx.cache build <hydra overrides>    # this worker's share: cache.task of cache.tasks
    python -m hldx.cache verify dir=DIR             # exit 1 naming every bad shard
    python -m hldx.cache gc dir=DIR                 # remove what no run reads: redundant shards, dead writes

`build` composes the same config as `python -m hldx.run` (every override works), checks it whole, then
builds the shards of the worker's share that are missing, with the teacher of the config (pre-trained first
when it is the on-demand one), for the rows that job reads (cache.rows, cache.hidden_rows: auto) or those
given. On SLURM, an array job's tasks split the shards between them, and a task's ranks split its share.
`gc` is safe while jobs read and build: it removes only shards whose every row another shard serves (left by
builders that raced, or by a format-2 cache grown in place) and the temporary files of writers that are gone.
"""
from __future__ import annotations

import sys
from pathlib import Path

from hldx import cli, config, job
from hldx.errors import UserError
from hldx.store import gc, verify

def build(overrides: list[str]) -> int:
    """Build this worker's share of the cache of the composed config (hldx.job.build_cache_share)."""
    print(job.build_cache_share(config.compose(overrides)))
    return 0


@cli.command
def main(argv: list[str] | None = None) -> int:
    if (args := cli.command_args(argv, __doc__)) is None:
        return 0
    if args and args[0] == "build":
        return build(args[1:])
    if len(args) != 2 or args[0] not in ("verify", "gc") or not args[1].startswith("dir="):
        raise UserError(f"expected `build <hydra overrides>`, `verify dir=DIR` or `gc dir=DIR`, got "
                        f"{' '.join(args) or 'nothing'!r} (python -m hldx.cache --help)")
    root = args[1].removeprefix("dir=")
    if not Path(root).is_dir():
        raise UserError(f"dir={root} is invalid: expected the directory of a teacher cache")
    if args[0] == "gc":
        removed = gc(Path(root))
        for path in removed:
            print(f"removed {path}")
        print(f"gc: {len(removed)} file(s) removed from {root}")
        return 0
    problems = verify(root)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"ok: {root}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
