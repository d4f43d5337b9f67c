"""On a CUDA GPU (skipped without one): the trainer's bf16 step agrees with its fp32 CPU step and makes no
host-device synchronisation; the KD step of the paper's students reports its speed and peak memory, within
one 80 GB GPU and its plan; attention takes the flash or cuDNN kernel; the loader's copies overlap compute;
FSDP2 on one GPU matches one process; a DCP checkpoint with fused AdamW resumes exactly."""
from __future__ import annotations

import json
import time

import pytest
import torch
import torch.distributed as dist

from hldx import bench as B
from hldx import config as C
from hldx import data, order
from hldx.bench.steps import method_phases, random_cache, reads
from hldx.device import join
from hldx.loader import Loader
from hldx.models import build_model, forward
from hldx.train import Trainer, _optimizer
from test_gpu_path import LOSS_RTOL, TINY, UPDATE_RTOL, _flat, _one_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])  # tests/gpu_check.py selects by id
@pytest.mark.parametrize("method", ["nll", "kd", "hldc", "ht"])
def test_bf16_gpu_step_matches_fp32_cpu_step(hldx_cache, tmp_path, method, compile):
    cfg = C.compose(TINY)
    tokenizer = data.tokenizer_for(cfg)
    rows = order.training_rows(cfg, data.prepare(cfg, "train", tokenizer))
    batches = order.Batches(rows, cfg.train.batch_size)
    reader = random_cache(cfg, rows, tmp_path / "cache", data.tokenizer_digest(tokenizer))
    parts_cpu, update_cpu = _one_step(method, "cpu", False, reader, batches, tokenizer)
    parts_gpu, update_gpu = _one_step(method, "cuda", compile, reader, batches, tokenizer)
    assert parts_gpu.keys() == parts_cpu.keys()
    for k in parts_cpu:
        assert parts_gpu[k] == pytest.approx(parts_cpu[k], rel=LOSS_RTOL), k
    assert torch.isfinite(update_gpu).all()
    assert (update_gpu - update_cpu).norm() <= UPDATE_RTOL * update_cpu.norm()


@pytest.mark.parametrize("student", ["gemma3-123m", "gemma3-735m"])
def test_kd_step_of_the_paper_students_fits_80gb(hldx_cache, tmp_path, student):
    """Two micro-batches of the paper's setting (32 x 512 tokens each), KD from a cache, bf16: speed, and the
    peak memory within 80 GB and not above the plan's estimate (+15%)."""
    out = tmp_path / "bench.json"
    assert B.main([f"student={student}", "teacher=gemma3-3.4b", "train=paper", "train.batch_size=64",
                   "bench.methods=[kd]", "bench.warmup=2", "bench.steps=3", f"bench.json={out}"]) == 0
    r = json.loads(out.read_text())
    print(json.dumps(r, indent=2))
    print(f"{student} KD: peak {r['peak_mem_gib']['kd']:.2f} GiB, planned {r['plan_mem_gib']['kd']:.2f} GiB")
    assert r["precision"] == "bf16" and r["micro_batch_size"] == 32
    assert 0 < r["peak_mem_gib"]["kd"] < 80 and r["peak_mem_gib"]["kd"] <= 1.15 * r["plan_mem_gib"]["kd"]
    if "mfu" in r:
        assert 0 < r["mfu"]["kd"] < 1


@pytest.mark.parametrize("student", ["gemma3-123m", "gemma3-735m"])
def test_attention_takes_the_flash_or_cudnn_kernel(student):
    """At the paper's L = 512 = sliding_window no layer gets a mask: SDPA dispatches every layer, forward and
    backward, to the flash or cuDNN kernel (named in the output), never the memory-efficient or math one."""
    cfg = C.compose([f"student={student}"])
    model = build_model(cfg.student, 0).cuda().train()
    tokens_BxL = torch.randint(0, cfg.student.vocab_size, (2, 512), device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = forward(model, tokens_BxL)
        logits.float().mean().backward()
        torch.cuda.synchronize()
    ops = [e.name for e in prof.events() if "scaled_dot_product" in e.name or "attention" in e.name.lower()]
    print(student, sorted(set(ops)))
    fast = [n for n in ops if n in ("aten::_scaled_dot_product_flash_attention",
                                    "aten::_scaled_dot_product_cudnn_attention")]
    assert len(fast) == cfg.student.num_hidden_layers
    assert not [n for n in ops if "efficient_attention" in n or "attention_math" in n]


def test_loader_copies_on_a_side_stream_ahead_of_compute(hldx_cache, tmp_path):
    """With the compute stream busy (a ~1 s sleep kernel queued), a step's copies complete on the loader's own
    stream; the step's values on the device are the ones the CPU loader reads; its threads use the device."""
    cfg = C.compose(TINY)
    tokenizer = data.tokenizer_for(cfg)
    rows = order.training_rows(cfg, data.prepare(cfg, "train", tokenizer))
    batches = order.Batches(rows, cfg.train.batch_size)
    reader = random_cache(cfg, rows, tmp_path / "cache", data.tokenizer_digest(tokenizer))
    dev = torch.device("cuda", torch.cuda.current_device())
    parts, B = ("topk", "hidden"), cfg.train.batch_size
    with Loader(batches, reader, parts, range(3), torch.device("cpu")) as host:
        expected = [host.get(s).micro(0, B) for s in range(3)]
        expected = [(m.tokens_BxL.clone(), m.topk_val_BxLxK.clone(), m.hidden_BxLxD.clone()) for m in expected]
    with Loader(batches, reader, parts, range(3), dev, 2, 2) as loader:
        assert loader.pool.submit(torch.cuda.current_device).result() == dev.index
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # the compute stream busy for about a second
        got = [loader.get(0)]             # step 0's copies: nothing issued them before
        deadline = time.monotonic() + 0.5
        while not loader.slots[0].copied.query() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert loader.slots[0].copied.query() and not torch.cuda.current_stream().query()
        got += [loader.get(1), loader.get(2)]
        for step, (tokens, values, hidden) in zip(got, expected):
            m = step.micro(0, B)
            assert m.tokens_BxL.device == dev and torch.equal(m.tokens_BxL.cpu(), tokens)
            assert torch.equal(m.topk_val_BxLxK.cpu(), values) and torch.equal(m.hidden_BxLxD.cpu(), hidden)


@pytest.fixture
def group_of_one():
    """A process group of one on NCCL (FSDP2 on one GPU), left as it was found."""
    joined = not dist.is_initialized()
    if joined:
        join(C.compose(["train.device=cuda"]), alone=True)
    yield
    if joined:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["kd", "ht"])
def test_fsdp2_on_one_gpu_matches_one_process(hldx_cache, tmp_path, group_of_one, method):
    """FSDP2 (bf16 parameters in compute, fp32 reduction) against the plain module under autocast: loss parts
    and update within the bf16 tolerances."""
    cfg = C.compose(TINY)
    tokenizer = data.tokenizer_for(cfg)
    rows = order.training_rows(cfg, data.prepare(cfg, "train", tokenizer))
    batches = order.Batches(rows, cfg.train.batch_size)
    reader = random_cache(cfg, rows, tmp_path / "cache", data.tokenizer_digest(tokenizer))
    (parts, update), (parts_one, update_one) = (_one_step(method, "cuda", False, reader, batches, tokenizer,
                                                          parallel=p) for p in ("fsdp", "none"))
    for k in parts_one:
        assert parts[k] == pytest.approx(parts_one[k], rel=LOSS_RTOL), k
    assert (update - update_one).norm() <= UPDATE_RTOL * update_one.norm()


def test_dcp_save_and_exact_resume_with_fused_adamw_and_fsdp2(hldx_cache, tmp_path, group_of_one):
    """Two KD steps under FSDP2 with fused AdamW on the GPU, saved with torch.distributed.checkpoint; a fresh
    module and optimizer loaded from it hold the same weights and AdamW state bit for bit, and take the next
    step as the original does."""
    cfg = C.compose(TINY + ["train.device=cuda", "train.parallel=fsdp"])
    tokenizer = data.tokenizer_for(cfg)
    rows = order.training_rows(cfg, data.prepare(cfg, "train", tokenizer))
    batches = order.Batches(rows, cfg.train.batch_size)
    reader = random_cache(cfg, rows, tmp_path / "cache", data.tokenizer_digest(tokenizer))
    trainer = Trainer(cfg, None, batches, reader, tmp_path, tokenizer, None)
    phase = method_phases(cfg)["kd"]

    def fresh(seed: int):
        engine = trainer.engine(phase, build_model(cfg.student, seed).cuda().train(), None)
        optimizer = _optimizer(cfg, engine.params, engine.extra, trainer.device)
        assert optimizer.defaults["fused"]
        return engine, optimizer

    def state(engine, optimizer) -> torch.Tensor:
        moments = [v for s in optimizer.state.values() for k, v in sorted(s.items()) if k != "step"]
        return _flat(engine.params + moments)

    engine, optimizer = fresh(0)
    with Loader(batches, reader, reads(cfg, reader.spec)["kd"], range(3), trainer.device) as loader:
        for s in range(2):
            trainer.step(phase, engine, optimizer, loader.get(s))
        engine.save(tmp_path / "dcp", optimizer)
        resumed, resumed_optimizer = fresh(1)
        resumed.load(tmp_path / "dcp", resumed_optimizer)
        assert torch.equal(state(resumed, resumed_optimizer), state(engine, optimizer))
        step = loader.get(2)
        sums = trainer.step(phase, engine, optimizer, step)
        sums_resumed = trainer.step(phase, resumed, resumed_optimizer, step)
    assert {k: float(v) for k, v in sums_resumed.items()} == pytest.approx({k: float(v) for k, v in sums.items()},
                                                                            rel=1e-6)
    torch.testing.assert_close(_flat(resumed.params), _flat(engine.params), rtol=1e-5, atol=1e-7)
