import pytest

from pathfm.config import Config, ConfigError, from_dict, load_config, to_dict, to_yaml
import yaml


def test_defaults_yaml_overrides_merge_in_order(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  base_lr: 1e-3\n  batch_size: 8\nmodel:\n  arch: vit_base\n")
    cfg = load_config(p, ["optim.base_lr=2e-4", "train.steps=7", "data.mpps=[0.5, 1]"])
    assert cfg.optim.base_lr == 2e-4  # override beats YAML
    assert cfg.optim.batch_size == 8  # YAML beats default
    assert cfg.model.arch == "vit_base"
    assert cfg.train.steps == 7
    assert cfg.data.mpps == [0.5, 1.0] and all(isinstance(v, float) for v in cfg.data.mpps)
    assert cfg.optim.weight_decay == Config().optim.weight_decay  # untouched default


def test_unknown_key_names_dotted_key_and_closest():
    with pytest.raises(ConfigError, match=r"'optim.base_lrr'.*'optim.base_lr'"):
        load_config(None, ["optim.base_lrr=1e-3"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("crops:\n  n_locals: 4\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*'crops.n_locals'.*'crops.n_local'"):
        load_config(p)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("optim.batch_size=abc", r"'optim.batch_size' expects int, got str 'abc'"),
        ("train.steps=1.5", r"'train.steps' expects int, got float 1.5"),
        ("dist.compile=1", r"'dist.compile' expects bool"),
        ("data.mpps=0.5", r"'data.mpps' expects a list of float"),
        ("ssl.objective=dino3", r"'ssl.objective' is 'dino3'; expected one of dino, dinov2"),
    ],
)
def test_wrong_type_or_value_is_named(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["optim.base_lr"])


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config("smoke", ["optim.base_lr=3e-4"])
    again = from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)


def test_bare_name_resolves_to_configs_folder():
    assert load_config("vitg14.yaml").model.arch == "vit_giant2"
    assert load_config("smoke").train.steps > 0


def test_every_shipped_config_loads():
    from pathfm.config import resolve_config_path

    folder = resolve_config_path("smoke").parent
    names = sorted(p.name for p in folder.glob("*.yaml"))
    assert {"smoke.yaml", "vits16.yaml", "vits8.yaml", "vitb16.yaml", "vitb8.yaml", "vitl14.yaml", "vitg14.yaml"} <= set(names)
    for n in names:
        load_config(folder / n)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["model.patch_size=14", "crops.local_size=96", "model.img_size=224"],
         r"'crops.local_size' is 96, not a multiple of model.patch_size=14.*12 px.*use 84 or 98"),
        (["model.patch_size=14", "crops.local_size=98", "crops.global_size=400", "model.img_size=224"],
         r"'crops.global_size' is 400.*use 392 or 406"),
        (["model.patch_size=14", "crops.local_size=98", "model.img_size=230"], r"'model.img_size' is 230.*use 224 or 238"),
        (["model.patch_size=16", "crops.local_size=8"], r"'crops.local_size' is 8.*use 16$"),
    ],
)
def test_crop_sizes_must_be_whole_patches(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_patch14_configs_use_dinov2_local_crops():
    for name in ("vitl14", "vitg14"):
        assert load_config(name).crops.local_size == 98, name


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.keep_last=0", r"'train.keep_last' is 0; keep at least 1"),
        ("train.log_every=0", r"'train.log_every' must be positive, got 0"),
        ("train.ckpt_every=0", r"'train.ckpt_every' must be positive, got 0"),
        ("model.drop_path_schedule=cosine", r"'model.drop_path_schedule' is 'cosine'; expected one of uniform, linear"),
        ("optim.clip_grad_mode=layer", r"'optim.clip_grad_mode' is 'layer'; expected one of per_module, global"),
    ],
)
def test_settings_that_would_crash_or_lose_work_are_refused(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("smoke", [override])


def test_a_manifest_is_never_silently_ignored(tmp_path):
    with pytest.raises(ConfigError, match=r"'data.manifest' is set .*data.source is 'synthetic'.*data.source=manifest"):
        load_config("smoke", [f"data.manifest={tmp_path / 'slides.csv'}"])
    cfg = load_config("smoke", ["data.source=manifest", f"data.manifest={tmp_path / 'slides.csv'}"])
    assert cfg.data.source == "manifest"


def test_recipe_defaults_drop_path_and_token_decay():
    # DINOv2: uniform drop-path rate, tokens decayed; DINO v1 configs keep the linear ramp
    assert load_config("vitg14").model.drop_path_schedule == "uniform"
    assert load_config("vitl14").model.drop_path_schedule == "uniform"
    assert load_config("vits16").model.drop_path_schedule == "linear"
    assert Config().optim.decay_tokens and Config().optim.clip_grad_mode == "per_module"
