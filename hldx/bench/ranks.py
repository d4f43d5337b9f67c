"""One rank at B against two ranks at B/2, under DDP and under FSDP2, side by side: the NLL step of the
configured student on the CPU's cores (one process with every thread, or two processes with half of them
each), rounds taking turns as everywhere in the bench."""
from __future__ import annotations

import os
import socket
import statistics
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from hldx import order
from hldx.bench.steps import method_phases
from hldx.device import join
from hldx.loader import Loader
from hldx.models import build_model
from hldx.train import Trainer, _optimizer

MODES = ("ddp", "fsdp")


def _stepper(cfg: DictConfig, rows: order.Rows, rank: int, world: int, rounds: int):
    """A function of the round that runs one NLL step of this rank (its share B/world of the batch)."""
    batches = order.Batches(rows, cfg.train.batch_size, rank, world)
    trainer = Trainer(cfg, None, batches, None, Path("."), None, None)  # only its step() is called
    engine = trainer.engine(method_phases(cfg)["nll"], build_model(cfg.student, cfg.seed).train(), None)
    optimizer = _optimizer(cfg, engine.params, engine.extra, trainer.device)
    loader = Loader(batches, None, (), range(rounds), trainer.device)
    return lambda r: trainer.step(method_phases(cfg)["nll"], engine, optimizer, loader.get(r))


def _worker(rank: int, world: int, port: int, cfg_yaml: str, rows: tuple, rounds: int, conn: Connection) -> None:
    os.environ |= {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    cfg = OmegaConf.create(cfg_yaml)
    join(cfg)
    step = _stepper(cfg, order.Rows(*rows), rank, world, rounds)
    while (r := conn.recv()) is not None:
        torch.distributed.barrier()
        start = time.perf_counter()
        step(r)
        torch.distributed.barrier()
        conn.send(time.perf_counter() - start)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ranks_bench(cfg: DictConfig, rows: order.Rows) -> dict:
    """tokens/s of the NLL step on one rank (train.parallel=none) and on two ranks under each engine; ratios
    ratio.<mode>_single = two ranks' tokens/s over one rank's."""
    b, t = cfg.bench, cfg.train
    rounds = b.warmup + b.steps
    ctx = mp.get_context("spawn")
    groups = {}
    for mode in MODES:
        yaml = OmegaConf.to_yaml(OmegaConf.merge(cfg, {"train": {"parallel": mode, "device": "cpu"}}), resolve=True)
        pipes = [ctx.Pipe() for _ in range(2)]
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, 2, port, yaml, (rows.tokens_RxL, rows.digest, rows.path),
                                                   rounds, pipes[r][1]), daemon=True) for r in range(2)]
        for p in procs:
            p.start()
        groups[mode] = (procs, [p[0] for p in pipes])
    single = _stepper(OmegaConf.merge(cfg, {"train": {"parallel": "none", "device": "cpu"}}), rows, 0, 1, rounds)

    def run_group(mode: str, r: int) -> float:
        for conn in groups[mode][1]:
            conn.send(r)
        return max(conn.recv() for conn in groups[mode][1])

    def run_single(r: int) -> float:
        start = time.perf_counter()
        single(r)
        return time.perf_counter() - start

    runs = {"single": run_single} | {mode: (lambda r, m=mode: run_group(m, r)) for mode in MODES}
    names, seconds = list(runs), {name: [] for name in runs}
    try:
        for r in range(rounds):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                seconds[name].append(runs[name](r))
    finally:
        for procs, conns in groups.values():
            for conn in conns:
                conn.send(None)
            for p in procs:
                p.join(timeout=60)
    tokens = t.batch_size * t.seq_len
    tps = {name: tokens / statistics.median(s[b.warmup:]) for name, s in seconds.items()}
    return {"tokens_per_s": {f"ranks_{k}": v for k, v in tps.items()},
            "ratio": {f"{mode}_single": tps[mode] / tps["single"] for mode in MODES},
            "ranks_s_all": seconds}
