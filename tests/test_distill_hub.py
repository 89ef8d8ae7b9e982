"""Teachers as the field publishes them: hub folders written by timm's own save_for_hf (registers; SwiGLU with
no_embed_class; a pathfm release), built by timm with their own layers, fed their own normalisation, their
position embeddings resampled once at load; state-dict teachers that record no normalisation are warned about."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_distill import config, single_env
from test_release import _hf_cache, _timm_folders

from pathfm.flops import count_flops, step_flops
from pathfm.distill import TeacherInput, check_teacher, inspect_teacher, load_teacher


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return _timm_folders(tmp_path_factory.mktemp("hub"))


def student_norm(rgb: np.ndarray, cfg) -> torch.Tensor:
    """An RGB crop (H, W, 3) uint8 as the student's views hold it: (1, 3, H, W), (x / 255 - mean) / std."""
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255).unsqueeze(0)
    return (x - torch.tensor(cfg.crops.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.crops.std).view(1, 3, 1, 1)


# teacher folder -> (student overrides that make the teacher see the crop at its own input size, prefix tokens)
CASES = {"vits-reg": (["model.patch_size=14", "model.img_size=56", "crops.global_size=56", "crops.local_size=28"], 5),  # class + 4 registers
         "swiglu": (["crops.global_size=48"], 1),  # no_embed_class: the class token has no position embedding
         "pathfm-release": (["crops.global_size=48"], 1)}


def test_hub_folders_teach_with_their_own_layers_prefix_tokens_and_normalisation(folders, tmp_path, monkeypatch):
    from timm.data import create_transform, resolve_data_config

    rng = np.random.default_rng(0)
    for name, (overrides, prefix) in CASES.items():
        folder, src = folders[name]
        cfg = config(tmp_path, "s", "model.arch=vit_tiny_d6", f"distill.teacher=local-dir:{folder}", *overrides)
        spec = inspect_teacher(cfg.distill.teacher)
        pcfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
        assert spec.kind == "hub" and spec.mean == list(pcfg["mean"]) and spec.std == list(pcfg["std"]), name
        teacher = load_teacher(cfg, single_env())
        assert teacher.mode == "features" and set(teacher) == {"backbone"}, name  # a hub folder holds no heads
        backbone = teacher.backbone
        assert isinstance(backbone, timm.models.VisionTransformer) and backbone.num_prefix_tokens == prefix, name
        if name == "swiglu":
            assert type(backbone.blocks[0].mlp).__name__ == "GluMlp" and backbone.no_embed_class
        # the teacher's input is what timm's own data config and transform make of the same RGB crop
        size = cfg.crops.global_size
        rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        ours = TeacherInput(cfg, spec)(student_norm(rgb, cfg))
        data_cfg = resolve_data_config({"crop_pct": 1.0}, model=backbone)  # a tile is its own field of view: no centre crop
        assert data_cfg["input_size"][-1] == size and tuple(data_cfg["mean"]) == tuple(pcfg["mean"]), name
        theirs = create_transform(**data_cfg)(Image.fromarray(rgb)).unsqueeze(0)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=name)
        # its tokens: CLS first, then registers, then the patch grid, as the published model computes them
        with torch.no_grad():
            tokens = backbone.forward_features(ours)
            torch.testing.assert_close(tokens, src.eval().forward_features(ours), msg=name)
        assert tokens.shape[1] == prefix + (size // spec.patch_size) ** 2, name
        # and the FLOP counter counts this model at this size (on the meta device, where sdpa's FLOPs are counted; on
        # CPU its kernel is not, hence the 1.5%)
        B = cfg.optim.batch_size
        counted = count_flops(backbone.forward_features, torch.empty(2 * B, 3, size, size))
        assert counted <= step_flops(cfg)["teacher_forward"] < 1.015 * counted, name

    # hf-hub:ORG/NAME from the local cache (a snapshot as huggingface_hub lays it out), never downloaded
    snap = _hf_cache(tmp_path / "hf", "someorg/swiglu", folders["swiglu"][0], monkeypatch)
    cfg = config(tmp_path, "s", "model.arch=vit_tiny_d6", "distill.teacher=hf-hub:someorg/swiglu", *CASES["swiglu"][0])
    assert inspect_teacher(cfg.distill.teacher).source == snap
    with pytest.raises(SystemExit, match="distill.teacher': hf-hub:someorg/absent: not in the local Hugging Face cache"):
        check_teacher(config(tmp_path, "s", "distill.teacher=hf-hub:someorg/absent"))


def count_interpolations(monkeypatch) -> list:
    calls, interpolate = [], torch.nn.functional.interpolate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("size"))
        return interpolate(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", counting)
    return calls


def test_teachers_resample_their_position_embeddings_once_at_load(folders, tmp_path, monkeypatch):
    """A /16 student at 32 px has a 2 x 2 grid, so a /14 teacher sees 28 px: its 4 x 4 embeddings are resampled to
    2 x 2 once, antialiased (timm's resample_abs_pos_embed, as DINOv2's register models), and no forward resamples."""
    from timm.layers import resample_abs_pos_embed

    from pathfm.vit import ViTArgs, build_vit

    torch.manual_seed(0)
    pathfm_vit = build_vit(ViTArgs(arch="vit_tiny", patch_size=14, img_size=56, num_registers=4))
    torch.save(pathfm_vit.state_dict(), tmp_path / "reg4.pth")
    reg = folders["vits-reg"][1]
    small = ["crops.global_size=32", "crops.local_size=16", "distill.teacher_mean=[0.5,0.5,0.5]",
             "distill.teacher_std=[0.5,0.5,0.5]"]
    for path, native in ((f"local-dir:{folders['vits-reg'][0]}", reg.pos_embed), (tmp_path / "reg4.pth", pathfm_vit.pos_embed)):
        teacher = load_teacher(config(tmp_path, "s", "model.arch=vit_tiny_d6", f"distill.teacher={path}", *small), single_env())
        want = resample_abs_pos_embed(native.detach(), (2, 2), num_prefix_tokens=0, antialias=True)  # no_embed_class
        torch.testing.assert_close(teacher.backbone.pos_embed, want, rtol=0, atol=1e-6, msg=str(path))
        calls = count_interpolations(monkeypatch)
        with torch.no_grad():
            tokens = teacher.backbone.forward_features(torch.randn(2, 3, 28, 28))
        monkeypatch.undo()
        assert tokens.shape[1] == 5 + 4 and calls == [], (path, calls)


def test_a_teacher_without_recorded_normalisation_is_warned_about_and_overridable(tmp_path, capsys):
    from pathfm.vit import ViTArgs, build_vit

    torch.save(build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=64)).state_dict(), tmp_path / "plain.pth")
    cfg = config(tmp_path, "s", "model.arch=vit_tiny_d6", f"distill.teacher={tmp_path / 'plain.pth'}")
    teacher = load_teacher(cfg, single_env())
    warning = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and "distill.teacher_mean" in warning[0] and "distill.teacher_std" in warning[0], warning
    assert TeacherInput(cfg, teacher.spec).identity  # the student's normalisation, as the warning says
    cfg = config(tmp_path, "s", "model.arch=vit_tiny_d6", f"distill.teacher={tmp_path / 'plain.pth'}",
                 "distill.teacher_mean=[0.485,0.456,0.406]", "distill.teacher_std=[0.229,0.224,0.225]")
    load_teacher(cfg, single_env())
    assert "WARNING" not in capsys.readouterr().err
    x = torch.zeros(1, 3, 64, 64)  # mid-grey for the student (0.5): (0.5 - mean) / std for the teacher
    torch.testing.assert_close(TeacherInput(cfg, teacher.spec)(x)[0, :, 0, 0],
                               (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
