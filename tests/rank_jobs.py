"""Run jobs on the ranks torchrun started, one after the other in one process group (the tests' driver):
    python -m torch.distributed.run --nproc_per_node=2 tests/rank_jobs.py JOBS.json
JOBS.json holds a list of override lists; each is composed, checked and executed as hldx.run would."""
import json
import sys

from hldx import config, job

for overrides in json.loads(open(sys.argv[1]).read()):
    job.run(config.compose(overrides))
