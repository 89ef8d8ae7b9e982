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
