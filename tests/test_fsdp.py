"""FSDP2 on 2 gloo ranks against 1 process: same losses, checkpoints across world sizes, EMA on shards.

Every run uses data.source=random, whose step s holds one global batch drawn from (seed, s); rank r
takes images [r*B, (r+1)*B). With optim.batch_size = 8 / world size, 1 and 2 ranks see the same 8
images per step, so their losses (logged as the mean over ranks) must agree.
  - ssl.koleo_weight=0: KoLeo finds nearest neighbours within each rank's batch, so its value depends on
    how the batch is split; it is not world-size invariant. DINO, iBOT, centering and Sinkhorn-Knopp are.
  - model.drop_path=0: stochastic depth draws from each rank's RNG.
  - optim.warmup_steps=0 and a large lr: the weights move a lot in 4 steps, so a wrong gradient
    reduction, a misaligned EMA or a half-loaded checkpoint changes the later losses visibly.
"""

import copy
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ranks import run_ranks, train_ranks
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8
SMOKE = ["data.source=random", "ssl.koleo_weight=0", "model.drop_path=0", "train.steps=4", "train.log_every=1",
         "train.ckpt_every=2", "train.keep_last=3", "train.rankme_every=0", "data.num_workers=0",
         "optim.warmup_steps=0", "optim.base_lr=0.02"]
# Tolerance for 1 vs 2 ranks, fp32: the two runs differ only in summation order (a gradient is the mean
# of two half-batch gradients reduce-scattered by gloo instead of one full-batch sum). Measured: 2e-7
# relative on every loss over 4 steps; 1e-4 leaves room for other CPUs' kernels while a real error
# (a rank with other weights, a lost gradient half, a step of lr missing) moves the loss by > 1e-2.
RTOL = 1e-4
LOSSES = ("loss/total", "loss/dino", "loss/ibot")


def clean_env() -> dict:
    """Subprocess environment: no launcher variables from the caller (tests may run inside SLURM), one thread
    per process on these shared cores."""
    drop = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in drop}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train(run_dir: Path, nproc: int, *overrides: str) -> dict[int, dict]:
    """pathfm.train.main on nproc gloo ranks forked from this process (tests/ranks.py: no torch import per rank)
    into run_dir; {step: logged metrics}. The command line and torchrun are exercised by test_rank_faults.py's
    launcher run and test_launch.py."""
    return train_ranks(run_dir, nproc, [*SMOKE, f"optim.batch_size={GLOBAL_BATCH // nproc}", *overrides])


def train_torchrun(run_dir: Path, nproc: int, *overrides: str) -> dict[int, dict]:
    """Run pathfm.train on nproc ranks under torchrun into run_dir; {step: logged metrics}."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "pathfm.train", "--config", "configs/smoke.yaml", *SMOKE, f"optim.batch_size={GLOBAL_BATCH // nproc}",
           f"train.output_dir={run_dir.parent}", f"train.name={run_dir.name}", *overrides]
    r = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in rows if "loss/total" in m}


def assert_same_losses(got: dict, want: dict, steps):
    for step in steps:
        for k in LOSSES:
            assert got[step][k] == pytest.approx(want[step][k], rel=RTOL), f"step {step} {k}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference run on 1 process and the same run on 2 FSDP ranks, both checkpointing at steps 2 and 4."""
    base = tmp_path_factory.mktemp("runs")
    return {"one": (base / "one", train(base / "one", 1)), "two": (base / "two", train(base / "two", 2))}


def test_two_fsdp_ranks_compute_the_losses_of_one_process(runs):
    one, two = runs["one"][1], runs["two"][1]
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert_same_losses(two, one, [1, 2, 3, 4])
    for step in one:  # the gradient norm sees the full (reduce-scattered) gradient, not a rank's half
        assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=RTOL)
    assert abs(one[4]["loss/total"] - one[1]["loss/total"]) > 0.1  # the weights did move
    assert json.loads((runs["two"][0] / "checkpoints" / "step_0000004" / "meta.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("saved_on, resumed_on", [("two", 1), ("one", 2)])
def test_checkpoint_resumes_on_another_number_of_ranks(runs, tmp_path, saved_on, resumed_on):
    # the step-2 checkpoint alone in a fresh run folder: resume must pick it up and continue to step 4
    run_dir = tmp_path / "resumed"
    src = runs[saved_on][0] / "checkpoints" / "step_0000002"
    shutil.copytree(src, run_dir / "checkpoints" / src.name)
    # the 2-rank resume also recomputes every block in backward: activation checkpointing under FSDP2
    # changes no number (and no parameter name), so it rides along here instead of costing its own run
    resumed = train(run_dir, resumed_on, *(["dist.activation_checkpointing=full"] if resumed_on > 1 else []))
    assert sorted(resumed) == [3, 4]  # started at step 2 (the first resumed step is always logged)
    assert_same_losses(resumed, runs["one"][1], [3, 4])


def test_export_command_on_a_two_rank_checkpoint(runs, tmp_path):
    import timm

    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "pathfm.export", str(runs["two"][0] / "checkpoints" / "last"), "-o", str(out)],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    side = json.loads((out / "model.json").read_text())
    assert side["step"] == 4 and side["timm_name"] == "vit_tiny_patch16_224"
    model = timm.create_model(side["timm_name"], pretrained=False, num_classes=0, **side["timm_kwargs"]).eval()
    model.load_state_dict(torch.load(out / "model.pth", weights_only=True), strict=True)

    # reference: the teacher of the 1-process run, exported by train.py from memory (no FSDP, no DCP)
    ref = timm.create_model(side["timm_name"], pretrained=False, num_classes=0, **side["timm_kwargs"]).eval()
    ref.load_state_dict(torch.load(runs["one"][0] / "export" / "model.pth", weights_only=True), strict=True)
    x = torch.randn(4, 3, side["img_size"], side["img_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_two_rank_run_writes_a_plain_timm_export(runs):
    # train.py exports on rank 0 alone from the final checkpoint (a DCP read with no collective), not
    # from the in-memory teacher, whose tensors are DTensor shards under FSDP
    sd = torch.load(runs["two"][0] / "export" / "model.pth", weights_only=True)  # plain tensors load with weights_only
    ref = torch.load(runs["one"][0] / "export" / "model.pth", weights_only=True)
    assert sd.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k], rtol=1e-4, atol=1e-5)


# --- EMA on local shards, in 2 processes started here ------------------------------------------------


def _ema_worker(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor

    from pathfm.dist import init_distributed, teardown, wrap_model
    from pathfm.heads import DINOHead
    from pathfm.train import update_ema
    from pathfm.vit import ViTArgs, build_vit

    env = init_distributed(device="cpu")
    # reshard_after_forward=False leaves the teacher's parameters unsharded after its forward (the case that
    # crashed the EMA with mixed Tensor and DTensor): the trainer's update_ema must handle both
    for reshard_after_forward in (True, False):
        torch.manual_seed(rank)  # ranks build different weights on purpose: wrap_model must make them rank 0's
        vit = build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=32, layerscale=1e-5))
        student = nn.ModuleDict({"backbone": vit, "dino_head": DINOHead(192, 32, 64, 16)})
        rank0_init = {n: p.detach().clone() for n, p in student.named_parameters()}
        teacher = copy.deepcopy(student).requires_grad_(False)
        wrap_model(student, env, reshard_after_forward=reshard_after_forward)
        wrap_model(teacher, env, reshard_after_forward=reshard_after_forward)

        def full(m):  # every parameter gathered to a full tensor; a collective, so every rank calls it
            return {n: p.full_tensor() for n, p in m.named_parameters()}

        qkv = student.backbone.blocks[0].attn.qkv.weight
        assert isinstance(qkv, DTensor) and qkv.to_local().shape[0] == qkv.shape[0] // world  # sharded on dim 0
        assert [n for n, _ in teacher.named_parameters()] == [n for n, _ in student.named_parameters()]  # zip aligns
        start = full(student)  # every rank gathers (collective); rank 0 knows what it should be
        if rank == 0:
            for n, t in start.items():
                assert torch.equal(t, rank0_init[n]), n

        # one optimizer step, so student and teacher differ everywhere
        opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
        x = torch.randn(4, 3, 32, 32)
        student.dino_head(student.backbone.forward_features(x)[:, 0]).logsumexp(-1).mean().backward()
        opt.step()
        t0, s = full(teacher), full(student)

        m = 0.9
        with torch.no_grad():  # a teacher forward first, as in the training step
            teacher.dino_head(teacher.backbone.forward_features(x)[:, 0])
        update_ema(teacher, student, m)  # the trainer's own EMA
        t1 = full(teacher)
        for n in t1:
            torch.testing.assert_close(t1[n], m * t0[n] + (1 - m) * s[n], rtol=1e-6, atol=1e-7,
                                       msg=lambda e, n=n: f"reshard_after_forward={reshard_after_forward} {n}: {e}")
        assert any((s[n] - t0[n]).abs().max() > 1e-3 for n in s)  # the check above was not trivially t = s
    teardown()


def test_teacher_ema_on_shards_equals_the_full_tensor_formula():
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ema_worker, args=(2, port), nprocs=2, join=True)


# --- CUDA ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 mixed precision needs CUDA (wrap_model refuses it on CPU)")
def test_bf16_losses_close_to_fp32(tmp_path):
    # 2 GPUs: bf16 through FSDP2's MixedPrecisionPolicy (bf16 parameters, fp32 reductions);
    # 1 GPU: the same loop in one process (autocast only). bf16 keeps about 3 significant digits and
    # the error grows over steps, so 2e-2 relative on a loss of about 8 is loose but catches a wrong dtype
    # in a reduction or a loss computed in bf16 (the losses cast to fp32 on purpose).
    nproc = 2 if torch.cuda.device_count() >= 2 else 1
    fp32 = train_torchrun(tmp_path / "fp32", nproc)  # fresh processes: CUDA does not survive a fork
    bf16 = train_torchrun(tmp_path / "bf16", nproc, "train.precision=bf16")
    for step in fp32:
        assert bf16[step]["loss/total"] == pytest.approx(fp32[step]["loss/total"], rel=2e-2), step


# --- gradient norms, stochastic depth and bf16 on 2 ranks forked from this process (tests/ranks.py) -----------


def _tiny_student(seed: int = 0) -> nn.ModuleDict:
    from pathfm.heads import DINOHead
    from pathfm.vit import ViTArgs, build_vit

    torch.manual_seed(seed)
    return nn.ModuleDict({"backbone": build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=32, layerscale=1e-5)),
                          "dino_head": DINOHead(192, 32, 64, 16)})


def _tiny_loss(student: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    return student.dino_head(student.backbone.forward_features(x)[:, 0]).logsumexp(-1).mean()


def _grad_norm_worker(rank: int, world: int) -> dict:
    from pathfm.dist import init_distributed, teardown, wrap_model
    from pathfm.train import clip_gradients

    env = init_distributed(device="cpu")
    student = _tiny_student()
    ref = copy.deepcopy(student)  # one process's view: the whole model, the whole gradient
    wrap_model(student, env)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # the same images on both ranks
    _tiny_loss(ref, x).backward()  # FSDP averages the ranks' gradients: equal inputs give ref's gradient
    _tiny_loss(student, x).backward()
    out = {"want": {name: float(torch.nn.utils.get_total_norm([p.grad for p in m.parameters() if p.grad is not None]))
                    for name, m in ref.items()} if hasattr(torch.nn.utils, "get_total_norm") else
                   {name: float(torch.stack([p.grad.norm() for p in m.parameters() if p.grad is not None]).norm()) for name, m in ref.items()}}
    out["per_module"] = clip_gradients(student, 0.0, per_module=True)  # max_norm 0: measure only
    out["global"] = clip_gradients(student, 0.0, per_module=False)
    clip_gradients(student, 1.0, per_module=False)  # global mode clips the norm over every module and rank to 1
    out["after_clip"] = float(torch.stack([p.grad.full_tensor().norm() for p in student.parameters() if p.grad is not None]).norm())
    qkv = student.backbone.blocks[0].attn.qkv.weight
    if rank == 1:  # an inf in rank 1's shard only
        qkv.grad.to_local()[0, 0] = float("inf")
    out["inf"] = clip_gradients(student, 3.0, per_module=True)
    teardown()
    return out


def test_gradient_norm_is_the_full_norm_on_every_rank():
    # torch 2.6-2.9: clip_grad_norm_ on DTensor gradients returns a partial DTensor whose float() is this rank's
    # shard; ranks then skip a non-finite step (or not) on their own and the job hangs or trains a poisoned model
    r0, r1 = run_ranks(_grad_norm_worker, 2)
    for r in (r0, r1):
        assert r["per_module"] == pytest.approx(r["want"], rel=1e-5)
        want_all = math.sqrt(sum(v * v for v in r["want"].values()))
        assert r["global"]["all"] == pytest.approx(want_all, rel=1e-5)
        assert r["after_clip"] == pytest.approx(1.0, rel=1e-4)
        assert math.isinf(r["inf"]["backbone"]) and math.isfinite(r["inf"]["dino_head"])  # on both ranks
    assert r0["per_module"] == r1["per_module"] and r0["global"] == r1["global"]  # the same numbers, bit for bit


def _drop_path_worker(rank: int, world: int) -> dict:
    from pathfm.config import load_config
    from pathfm.dist import init_distributed, teardown
    from pathfm.train import build_models

    env = init_distributed(device="cpu")
    cfg = load_config(str(ROOT / "configs" / "smoke.yaml"), ["model.drop_path=0.5", "model.img_size=32"])
    student, teacher, _ = build_models(cfg, env)  # equal weights on every rank, then a per-rank seed
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # the same images on both ranks
    with torch.no_grad():
        out = {"student": student.backbone.forward_features(x)[:, 0], "teacher": teacher.backbone.forward_features(x)[:, 0]}
    gathered = {k: [torch.empty_like(v) for _ in range(world)] for k, v in out.items()}
    for k, v in out.items():
        torch.distributed.all_gather(gathered[k], v)
    teardown()
    return gathered


def test_stochastic_depth_draws_differ_between_ranks():
    # build_models reseeds with seed + rank after the models are built: were the seed shared, every rank would
    # drop the same blocks for its images, i.e. the same subset of the global batch's images
    s, t = run_ranks(_drop_path_worker, 2)[0].values()
    assert not torch.allclose(s[0], s[1])  # the students (drop_path 0.5, training mode) dropped other blocks
    torch.testing.assert_close(t[0], t[1])  # the teachers have no stochastic depth: the same weights, the same output


def _bf16_worker(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from pathfm.dist import init_distributed, mixed_precision, teardown

    init_distributed(device="cpu")
    student = _tiny_student()
    ref = copy.deepcopy(student)
    # the layout of wrap_model (which refuses bf16 on CPU for users: slow there), with the policy it uses
    for blk in student.backbone.blocks:
        fully_shard(blk, mp_policy=mixed_precision("bf16"))
    for root in student.values():
        fully_shard(root, mp_policy=mixed_precision("bf16"))
    register_fsdp_forward_method(student.backbone, "forward_features")
    seen = []
    student.backbone.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append((m.weight.dtype, o.dtype)))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as train.py does with train.precision=bf16
            loss = _tiny_loss(student, x)
        loss.float().backward()
    except AttributeError as e:  # torch < 2.9 on CPU: "'Stream' object has no attribute 'record_event'"
        teardown()
        return {"unsupported": str(e)}
    _tiny_loss(ref, x).backward()
    qkv = student.backbone.blocks[0].attn.qkv.weight
    out = {"compute": seen[0], "param": qkv.dtype, "grad": qkv.grad.dtype,
           "grad_close": torch.allclose(qkv.grad.full_tensor(), ref.backbone.blocks[0].attn.qkv.weight.grad, rtol=5e-2, atol=1e-3)}
    teardown()
    return out


def test_bf16_mixed_precision_policy_on_two_cpu_ranks():
    # train.precision=bf16 (the GPU recipes): blocks compute in bf16, parameters and reduced gradients stay fp32
    r = run_ranks(_bf16_worker, 2)[0]
    if "unsupported" in r:
        pytest.skip(f"FSDP2 mixed precision does not run on CPU with torch {torch.__version__}: {r['unsupported']}")
    assert r["compute"] == (torch.bfloat16, torch.bfloat16)
    assert r["param"] == r["grad"] == torch.float32
    assert r["grad_close"]  # the fp32 gradient of a bf16 forward, to bf16's precision


def _nonfinite_rank(rank: int, world: int, run_dir: str) -> dict:
    import pathfm.train as train_module
    from pathfm.config import load_config

    clip, calls = train_module.clip_gradients, []

    def clip_with_an_inf(student, max_norm, per_module):  # step 2: an inf in rank 1's shard of one gradient
        calls.append(1)
        if len(calls) == 2 and rank == 1:
            student.backbone.blocks[0].attn.qkv.weight.grad.to_local()[0, 0] = float("inf")
        return clip(student, max_norm, per_module)

    train_module.clip_gradients = clip_with_an_inf
    cfg = load_config(str(ROOT / "configs" / "smoke.yaml"), [*SMOKE, "train.steps=3", "optim.batch_size=2",
                      f"train.output_dir={Path(run_dir).parent}", f"train.name={Path(run_dir).name}"])
    return train_module.main(cfg)


def test_every_rank_skips_a_step_whose_gradient_is_not_finite_on_one_rank(tmp_path):
    # before (torch 2.6-2.9): rank 1 read inf and skipped, rank 0 read its finite shard and stepped; the ranks then
    # met different collectives (a hang) or trained different models
    results = run_ranks(_nonfinite_rank, 2, str(tmp_path / "run"), timeout=180)
    assert [r["status"] for r in results] == ["finished", "finished"] and results[0]["step"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows if m.get("nonfinite_steps") == 1 and "loss/total" not in m] == [1]  # 0-based
    assert sorted(m["step"] for m in rows if "loss/total" in m) == [1, 3]
