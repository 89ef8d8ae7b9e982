"""Distillation from a frozen teacher, teacher files, pairings, head warm-up, heads in exports, pos-embed resampling.

One tiny teacher (smoke's ViT-Ti at 64 px, 1 step, random pixels) is trained once for the module; its
checkpoint, its export (with heads.safetensors) and files derived from them are the teacher files.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pathfm import checkpoint as ckpt
from pathfm.config import load_config
from pathfm.weights import load_ema_backbone

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.source=random", "data.num_workers=0", "train.log_every=1", "train.rankme_every=0", "model.drop_path=0",
        "optim.batch_size=4", "crops.n_local=1", "ssl.prototypes=64", "ssl.ibot_prototypes=64", "ssl.head_hidden=32",
        "ssl.head_bottleneck=16", "optim.warmup_steps=0", "optim.base_lr=0.02", "train.ckpt_every=1", "train.steps=2"]


def config(out: Path, name: str, *overrides):
    return load_config("smoke", [f"train.output_dir={out}", f"train.name={name}", *TINY, *overrides])


def single_env():
    from pathfm.dist import DistEnv

    return DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), source="single")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A trained run folder (checkpoint + export with heads) to distil from."""
    from pathfm.train import main

    out = tmp_path_factory.mktemp("teacher")
    main(config(out, "t", "train.steps=1"))
    return out / "t"


def state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict, b: dict, prefix=""):
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys), [k for k in keys if not torch.equal(a[k], b[k])][:5]


def dinov2_names(vit) -> dict:
    """A registers ViT's state dict as DINOv2 writes it: register_tokens, a class-token slot in pos_embed."""
    sd = {k: v.clone() for k, v in vit.state_dict().items() if k != "mask_token"}
    sd["register_tokens"] = sd.pop("reg_token")
    sd["pos_embed"] = torch.cat([torch.zeros_like(sd["pos_embed"][:, :1]), sd["pos_embed"]], dim=1)
    return sd


def test_each_teacher_format_loads_as_a_frozen_teacher(teacher, tmp_path):
    from pathfm.distill import load_teacher
    from pathfm.vit import ViTArgs, build_vit

    ref, _ = load_ema_backbone(teacher)
    headless = tmp_path / "headless"
    shutil.copytree(teacher / "export", headless)
    (headless / "heads.safetensors").unlink()
    shutil.copy(teacher / "export" / "model.pth", tmp_path / "timm.pth")
    torch.manual_seed(1)  # a registers ViT (DINOv2's layout differs most from timm's there)
    reg = build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=64, num_registers=4)).eval()
    torch.save(dinov2_names(reg), tmp_path / "dinov2_reg4.pth")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cases = [(teacher / "checkpoints" / "last", "heads", ref), (teacher / "export", "heads", ref),
             (headless, "features", ref), (tmp_path / "timm.pth", "features", ref), (tmp_path / "dinov2_reg4.pth", "features", reg)]
    loaded = []
    for path, mode, want in cases:
        model = load_teacher(config(tmp_path, "s", "model.arch=vit_tiny_d6", f"distill.teacher={path}"), single_env())
        loaded.append(model)
        assert model.mode == mode, path
        assert ("dino_head" in model) == (mode == "heads") and ("ibot_head" in model) is False
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        with torch.no_grad():
            torch.testing.assert_close(model.backbone.forward_features(x), want.forward_features(x), rtol=0, atol=0)
    assert_same(state(loaded[1]), state(loaded[0]))  # the export's heads are the checkpoint's EMA heads


def test_refused_teachers_and_pairings_are_one_line_and_leave_no_run_folder(teacher, tmp_path):
    from pathfm.train import main
    from pathfm.vit import ViTArgs, build_vit

    (tmp_path / "notes.pth").write_text("not weights")
    torch.save(build_vit(ViTArgs(arch="vit_tiny", patch_size=14, img_size=56)).state_dict(), tmp_path / "p14.pth")
    torch.save({"patch_embed.proj.weight": torch.zeros(100, 3, 16, 16), "blocks.0.norm1.weight": torch.zeros(100)},
               tmp_path / "w100.pth")
    cases = [([f"distill.teacher={tmp_path / 'missing'}"], "does not exist"),
             ([f"distill.teacher={tmp_path / 'notes.pth'}"], "not a PyTorch state dict"),
             ([f"distill.teacher={tmp_path / 'w100.pth'}"], "100 wide and 1 deep"),
             ([f"distill.teacher={tmp_path / 'p14.pth'}", "distill.loss=heads"], "without heads"),
             ([f"distill.teacher={teacher}", "ssl.prototypes=32"], "ssl.prototypes 32 vs the teacher's 64"),
             ([f"distill.teacher={teacher}", "ssl.ibot_separate_head=true"], "ssl.ibot_separate_head True"),
             ([f"distill.teacher={tmp_path / 'p14.pth'}", "distill.teacher_input=same"], "4x4 token grid"),
             ([f"model.init_weights={teacher / 'export'}", "model.arch=vit_tiny", "ssl.prototypes=32"],
              "ssl.prototypes 32 vs the file's 64")]
    for overrides, said in cases:
        with pytest.raises(SystemExit) as e:
            main(config(tmp_path, "refused", "model.arch=vit_tiny_d6", *overrides))
        msg = str(e.value)
        assert said in msg and "\n" not in msg, msg
        if "teacher's" in said or "grid" in said or "heads" in said:  # a refused pairing names both models
            assert "student vit_tiny_d6/16" in msg and "teacher vit_tiny/" in msg, msg
        assert not (tmp_path / "refused").exists(), overrides
    # a /14 teacher with a /16 student: its input is resized to the student's grid (4 x 14 = 56 px), not refused
    from pathfm.distill import TeacherInput, check_pairing, inspect_teacher

    cfg = config(tmp_path, "s", f"distill.teacher={tmp_path / 'p14.pth'}")
    spec = inspect_teacher(cfg.distill.teacher)
    assert check_pairing(cfg, spec) == "features" and TeacherInput(cfg, spec)(torch.zeros(2, 3, 64, 64)).shape[-1] == 56


def test_distillation_keeps_the_teacher_resumes_bit_exact_and_exports_for_timm(teacher, tmp_path, monkeypatch):
    import timm

    import pathfm.train as train

    frozen = {}

    def recording(cfg, env):
        model = load(cfg, env)
        frozen["model"], frozen["before"] = model, state(model)
        return model

    load = train.load_teacher
    monkeypatch.setattr(train, "load_teacher", recording)
    common = ["model.arch=vit_tiny_d6", f"distill.teacher={teacher}"]
    straight = train.main(config(tmp_path, "straight", *common))
    assert_same(state(frozen["model"]), frozen["before"])  # bit-identical after 2 steps of training
    train.main(config(tmp_path, "split", *common, "train.stop_after=1"))
    split = train.main(config(tmp_path, "split", *common))
    assert split["step"] == 2

    def rows(run):
        return [r for r in map(json.loads, (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()) if "loss/total" in r]

    assert [r["loss/total"] for r in rows(straight)] == [r["loss/total"] for r in rows(split)][-2:]
    assert {"loss/dino", "loss/ibot"} <= set(rows(straight)[-1])
    from pathfm.weights import load_ema
    from pathfm.train import build_student

    a, b = build_student(config(tmp_path, "x", *common)), build_student(config(tmp_path, "x", *common))
    load_ema(Path(straight["run_dir"]), a)
    load_ema(Path(split["run_dir"]), b)
    assert_same(state(a), state(b))  # the EMA, heads included, bit-exact after a resume
    export = Path(straight["run_dir"]) / "export"
    side = json.loads((export / "model.json").read_text())
    assert side["heads"]["file"] == "heads.safetensors" and side["timm_kwargs"]["depth"] == 6
    model = timm.create_model(side["timm_name"], pretrained=False, num_classes=0, **side["timm_kwargs"]).eval()
    model.load_state_dict(torch.load(export / "model.pth", weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), a.backbone.eval()(x), rtol=1e-5, atol=1e-5)


def test_head_warmup_leaves_the_backbone_and_its_ema_bit_identical(teacher, tmp_path):
    from pathfm.weights import load_ema, read_state_dict
    from pathfm.train import build_student, head_warmup_steps, main

    export = teacher / "export"
    cfg = config(tmp_path, "cont", f"model.init_weights={export}", "model.init_heads=false", "train.steps=20",
                 "train.stop_after=2")
    assert head_warmup_steps(cfg) == 2  # auto: train.steps // 10 when the heads start fresh
    assert head_warmup_steps(config(tmp_path, "x", f"model.init_weights={export}", "train.steps=20")) == 0  # heads loaded
    start = state(build_student(cfg))
    main(cfg)
    import torch.distributed.checkpoint as dcp

    step = ckpt.latest_checkpoint(tmp_path / "cont" / "checkpoints")
    ema = build_student(cfg)
    load_ema(step, ema)
    ema = state(ema)
    student = {"student": state(build_student(cfg))}
    with ckpt.quiet_dcp():
        dcp.load(student, checkpoint_id=str(step), no_dist=True)
    weights = read_state_dict(export / "model.pth")
    for k, v in weights.items():
        assert torch.equal(ema[f"backbone.{k}"], v), k
    for trained in (ema, student["student"]):
        assert_same(start, trained, "backbone.")
        assert not torch.equal(start["dino_head.mlp.0.weight"], trained["dino_head.mlp.0.weight"])  # the heads learnt


def test_heads_round_trip_through_an_export(teacher, tmp_path):
    from pathfm.export import save_export, save_heads
    from pathfm.weights import checkpoint_heads, load_heads
    from pathfm.train import build_student

    heads, args = checkpoint_heads(teacher)
    assert args["prototypes"] == 64 and args["in_dim"] == 192 and set(k.split(".")[0] for k in heads) == {"dino_head"}
    vit, _ = load_ema_backbone(teacher)
    save_export(vit, tmp_path / "exp")
    save_heads(tmp_path / "exp", heads, args)
    back, back_args = load_heads(tmp_path / "exp")
    assert back_args == args and all(torch.equal(back[k], heads[k]) for k in heads)
    student = state(build_student(config(tmp_path, "s", f"model.init_weights={tmp_path / 'exp'}")))
    assert_same(student, {**{f"backbone.{k}": v for k, v in vit.state_dict().items()}, **heads}, "dino_head.")
    assert_same(student, {f"backbone.{k}": v for k, v in vit.state_dict().items() if k != "mask_token"}, "backbone.blocks.")
    fresh = state(build_student(config(tmp_path, "s", f"model.init_weights={tmp_path / 'exp'}", "model.init_heads=false")))
    assert not torch.equal(fresh["dino_head.mlp.0.weight"], heads["dino_head.mlp.0.weight"])


def test_step_flops_count_the_frozen_teacher(teacher, tmp_path):
    from pathfm.flops import distill_teacher_flops, step_flops

    own = step_flops(config(tmp_path, "s", "model.arch=vit_tiny_d6"))  # the EMA: 6 blocks
    distilled = step_flops(config(tmp_path, "s", "model.arch=vit_tiny_d6", f"distill.teacher={teacher}"))  # 12 blocks
    assert distilled["student_forward"] == own["student_forward"]
    assert 1.8 < distilled["teacher_forward"] / own["teacher_forward"] < 2.1
    # the teacher's own heads only: no EMA-sized iBOT head on top of them
    cfg = config(tmp_path, "s", "model.arch=vit_tiny_d6", f"distill.teacher={teacher}")
    s, B, grid = cfg.ssl, cfg.optim.batch_size, cfg.crops.global_size // cfg.model.patch_size
    masked = round(2 * B * s.mask_probability * (s.mask_ratio_min + s.mask_ratio_max) / 2 * grid**2)
    assert distilled["teacher_forward"] == distill_teacher_flops(cfg, B, masked)


def test_pos_embed_resampling_is_antialiased_bicubic_as_dinov2_reg4_and_timm():
    """DINOv2's register models (interpolate_antialias=True, offset 0) and timm's resample_abs_pos_embed resize a
    518 px ViT/14 grid (37 x 37) with antialiased bicubic; PIL's bicubic resize of each channel is that filter
    (Keys' cubic, a = -0.5, stretched over the source footprint of each output cell when shrinking)."""
    from PIL import Image

    from pathfm.weights import load_backbone
    from pathfm.vit import ViTArgs, build_vit, resample_pos_grid

    pos = torch.randn(1, 37 * 37, 3, generator=torch.Generator().manual_seed(0))
    pil = np.stack([np.asarray(Image.fromarray(pos[0, :, c].reshape(37, 37).numpy(), mode="F").resize((16, 16), Image.BICUBIC))
                    for c in range(3)], -1)
    torch.testing.assert_close(resample_pos_grid(pos, (16, 16)), torch.from_numpy(pil).reshape(1, 256, 3), rtol=0, atol=1e-5)
    # loading a 518 px DINOv2 reg4 file into a 224 px model goes through it
    small = build_vit(ViTArgs(arch="vit_tiny", patch_size=14, img_size=224, num_registers=4))
    big = build_vit(ViTArgs(arch="vit_tiny", patch_size=14, img_size=518, num_registers=4))
    path = Path(__import__("tempfile").mkdtemp()) / "reg4_518.pth"
    torch.save(dinov2_names(big), path)
    load_backbone(small, path)
    torch.testing.assert_close(small.pos_embed.detach(), resample_pos_grid(big.pos_embed.detach(), (16, 16)), rtol=0, atol=0)
    shutil.rmtree(path.parent)


def test_two_fsdp_ranks_distil_with_the_losses_of_one_process(teacher, tmp_path):
    from test_fsdp import assert_same_losses, train

    over = ["model.arch=vit_tiny_d6", f"distill.teacher={teacher / 'export'}", "ssl.prototypes=64", "ssl.ibot_prototypes=64",
            "train.steps=3", "train.ckpt_every=3"]
    one, two = train(tmp_path / "one", 1, *over), train(tmp_path / "two", 2, *over)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert_same_losses(two, one, [1, 2, 3])
    assert abs(one[3]["loss/total"] - one[1]["loss/total"]) > 1e-3  # the student moved


def test_only_heads_a_loss_trains_are_built_and_exported(teacher, tmp_path):
    """A student distilled on features trains no head: none is built, its export has no heads.safetensors, continuing
    from it gets the automatic head warm-up, and distilling from it uses its features, never random prototypes."""
    from pathfm.distill import check_pairing, inspect_teacher
    from pathfm.student import build_student
    from pathfm.train import head_warmup_steps, main

    headless = tmp_path / "headless"
    shutil.copytree(teacher / "export", headless)
    (headless / "heads.safetensors").unlink()
    feat = config(tmp_path, "feat", "model.arch=vit_tiny_d6", f"distill.teacher={headless}", "train.steps=1")
    assert set(build_student(feat)) == {"backbone", "cls_proj", "patch_proj"}
    export = Path(main(feat)["run_dir"]) / "export"
    assert (export / "model.pth").is_file() and not (export / "heads.safetensors").exists()
    assert "heads" not in json.loads((export / "model.json").read_text())
    assert head_warmup_steps(config(tmp_path, "c", "model.arch=vit_tiny_d6", f"model.init_weights={export}",
                                    "train.steps=20")) == 2  # fresh heads: warmed up first
    again = config(tmp_path, "d", f"distill.teacher={export}")
    assert check_pairing(again, inspect_teacher(again.distill.teacher)) == "features"
    # heads targets without patch targets: the DINO head trains, an iBOT head of its own would not, so it is not built
    cls_only = config(tmp_path, "x", "model.arch=vit_tiny_d6", f"distill.teacher={teacher}", "distill.patch_targets=false",
                      "ssl.ibot_separate_head=true")
    assert set(build_student(cls_only)) == {"backbone", "dino_head"}


def test_after_a_head_warmup_the_backbone_lr_ramps_up_and_a_resume_inside_the_warmup_is_exact(tmp_path):
    from pathfm.optim import backbone_lr_scale
    from pathfm.student import build_student
    from pathfm.train import main
    from pathfm.weights import load_ema

    assert [backbone_lr_scale(s, 2, 2) for s in range(5)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert [backbone_lr_scale(s, 0, 3) for s in range(2)] == [1.0, 1.0]  # no warm-up: no ramp
    common = ["model.arch=vit_tiny_d6", "train.head_warmup_steps=2", "train.steps=5", "optim.warmup_steps=0"]
    straight = main(config(tmp_path, "straight", *common))
    main(config(tmp_path, "split", *common, "train.stop_after=1"))  # stops inside the warm-up
    split = main(config(tmp_path, "split", *common))

    def rows(run):
        return {r["step"]: r for r in map(json.loads, (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines())
                if "loss/total" in r}

    a, b = rows(straight), rows(split)
    assert [a[s]["lr_backbone_scale"] for s in range(1, 6)] == [0.0, 0.0, 0.5, 1.0, 1.0]  # the default ramp: 2 steps
    assert [a[s]["loss/total"] for s in range(2, 6)] == [b[s]["loss/total"] for s in range(2, 6)]
    cfg = config(tmp_path, "x", *common)
    ema_a, ema_b = build_student(cfg), build_student(cfg)
    load_ema(Path(straight["run_dir"]), ema_a)
    load_ema(Path(split["run_dir"]), ema_b)
    assert_same(state(ema_a), state(ema_b))  # bit-exact after a resume inside the warm-up


def test_in_distillation_the_collapse_warning_watches_the_student_ema(teacher, tmp_path, capsys):
    """The frozen teacher cannot collapse; a student pushed by a huge lr can, and its EMA (what is exported) with it.
    The student starts spread out (a patch embedding x1000 makes each random image's CLS token its own)."""
    from pathfm.train import main
    from pathfm.vit import ViTArgs, build_vit

    torch.manual_seed(0)
    start = build_vit(ViTArgs(arch="vit_tiny_d6", patch_size=16, img_size=64, layerscale=0))
    with torch.no_grad():
        start.patch_embed.proj.weight.mul_(1000)
    torch.save(start.state_dict(), tmp_path / "spread.pth")
    run = main(config(tmp_path, "boom", "model.arch=vit_tiny_d6", "model.layerscale=0", f"model.init_weights={tmp_path / 'spread.pth'}",
                      "train.head_warmup_steps=0", f"distill.teacher={teacher}", "distill.loss=features", "train.steps=4",
                      "optim.base_lr=50",
                      "optim.lr_ref_batch=4", "ssl.momentum_teacher=0", "ssl.momentum_teacher_final=0", "optim.clip_grad=0"))
    rows = [r for r in map(json.loads, (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()) if "loss/total" in r]
    assert "diag/ema_spread" in rows[0] and "diag/teacher_spread" not in rows[0]
    spreads = [r["diag/ema_spread"] for r in rows]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line and "collapsed" in line]
    assert spreads[0] > 1e-3 and min(spreads) < 1e-3, spreads
    assert len(warnings) == 1 and "the student EMA's CLS embeddings" in warnings[0], warnings
