"""The release folder: what a model hub holds for a timm model, written into the export beside model.pth.

    export/config.json         timm's model config: architecture, num_classes 0, num_features, model_args
                               (img_size, init_values, reg_tokens, no_embed_class, dynamic_img_size, ...) and
                               pretrained_cfg (mean, std, input_size, interpolation)
    export/model.safetensors   the same tensors as model.pth, without pickle
    export/README.md           the model card, generated from the run folder (data, compute, probes)
    export/heads.safetensors   the DINO / iBOT heads, when the export wrote them (pathfm.export.save_heads)

    timm.create_model("local-dir:runs/<run>/export", pretrained=True)     # no pathfm import needed
    huggingface-cli upload ORG/NAME runs/<run>/export --exclude "model.pth" "model.json"

Memory: the tensors are written from the model's own storage (safetensors >= 0.6 serialises from pointers),
so an export holds the weights once, plus a resampled pos_embed when the training size differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

INTERPOLATION = "bicubic"  # the training crops' resize (antialiased bicubic, pathfm.data.augment)


def timm_config(name: str, kwargs: dict, model, mean, std) -> dict:
    """config.json for `timm.create_model("local-dir:...")`: every architecture choice explicit in model_args.

    The MLP layer is carried by the architecture name (timm's *_dinov2 giant registers SwiGLUPacked and SiLU):
    timm 1.0 passes model_args to the constructor as they are, and a class name given as a string there would
    fail to build. pathfm's own loader (eval/backbone.py) resolves such strings in other people's configs.
    """
    a = model.args
    size = kwargs["img_size"]
    model_args = {"img_size": size, "patch_size": a.patch_size, "embed_dim": model.embed_dim, "depth": model.depth,
                  "num_classes": 0, "global_pool": "token", "class_token": True,
                  "reg_tokens": a.num_registers, "no_embed_class": bool(model.no_embed_class),
                  "init_values": a.layerscale if a.layerscale > 0 else None, "dynamic_img_size": True}
    model_args.update({k: v for k, v in kwargs.items() if k not in model_args})
    return {
        "architecture": name,
        "num_classes": 0,
        "num_features": model.embed_dim,
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {
            "mean": list(mean), "std": list(std), "input_size": [3, size, size], "interpolation": INTERPOLATION,
            "crop_pct": 1.0, "fixed_input_size": False, "num_classes": 0, "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "pathfm": {"vit_args": {**vars(a), "img_size": size},
                   "mlp": "SwiGLU (timm SwiGLUPacked, SiLU)" if a.ffn == "swiglu" else "MLP (timm Mlp, GELU)"},
    }


def save_safetensors(sd: dict, path: Path, metadata: dict | None = None) -> None:
    """Written to a temporary name and renamed; tensors made contiguous only when they are not already."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v if v.is_contiguous() else v.contiguous() for k, v in sd.items()}, str(tmp),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.rename(path)


def write_release(folder: Path, name: str, kwargs: dict, sd: dict, model, mean, std, run_dir: Path | None = None,
                  step: int | None = None) -> None:
    """config.json, model.safetensors and README.md into `folder` (model.pth / model.json are written by the caller)."""
    config = timm_config(name, kwargs, model, mean, std)
    if step is not None:
        config["pathfm"]["step"] = step
    save_safetensors(sd, folder / "model.safetensors", {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    n_params = sum(v.numel() for v in sd.values())
    (folder / "README.md").write_text(model_card(config, n_params, run_dir, step))


# ---------------------------------------------------------------------------------------------
# the model card


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a kill
                continue
    return [r for r in rows if "loss/total" in r]


def _compute_hours(rows: list[dict], world_size: int) -> float:
    """Device-hours of training steps: each logged step's time (data + forward + backward + optimizer), held for
    the steps until the next log, times the number of ranks. Start-up, checkpoints and probes not counted."""
    total, prev = 0.0, 0
    for r in sorted(rows, key=lambda r: r["step"]):
        per_step = sum(v for k, v in r.items() if k.startswith("time/") and k.endswith("_s"))
        total += per_step * (r["step"] - prev)
        prev = r["step"]
    return total * world_size / 3600


def _mpp_mix(rows: list[dict]) -> dict:
    """The realised magnification mix: data/mpp_share/* averaged over the logs, weighted by the steps each covers."""
    mix, prev, weight = {}, 0, 0
    for r in sorted(rows, key=lambda r: r["step"]):
        shares = {k.rsplit("/", 1)[1]: v for k, v in r.items() if k.startswith("data/mpp_share/")}
        if shares:
            w = r["step"] - prev
            weight += w
            for m, v in shares.items():
                mix[m] = mix.get(m, 0.0) + v * w
        prev = r["step"]
    return {m: v / weight for m, v in sorted(mix.items(), key=lambda kv: float(kv[0]))} if weight else {}


def _groups(cfg: dict) -> str:
    data = cfg.get("data", {})
    if data.get("source") != "manifest":
        return f"{data.get('source', '?')} data (no manifest)"
    path = Path(data.get("manifest", ""))
    if not path.is_file():
        return f"manifest {path} (not readable here)"
    import csv

    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    groups = {r.get("group") for r in rows if r.get("group")}
    return f"manifest {path.name}: {len(rows)} slides" + (f" in {len(groups)} groups" if groups else ", no group column")


def _probes(run_dir: Path) -> list[str]:
    lines = []
    for f in sorted((run_dir / "eval").rglob("results.json")) if (run_dir / "eval").is_dir() else []:
        try:
            r = json.loads(f.read_text())
            h = r["headline"]
        except (ValueError, KeyError):
            continue
        label = f.relative_to(run_dir / "eval").parts[0]
        lines.append(f"| {r.get('task', '?')} | {r.get('protocol', '?')} | {r.get('embedding') or r.get('model', {}).get('embedding', 'cls')} "
                     f"| {label} | {h['metric']} | {h['mean']:.4f} ± {h.get('stdev', 0.0):.4f} |")
    return lines


def model_card(config: dict, n_params: int, run_dir: Path | None, step: int | None) -> str:
    a = config["pathfm"]["vit_args"]
    args, pcfg = config["model_args"], config["pretrained_cfg"]
    cfg, env, rows = {}, {}, []
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        env = json.loads((run_dir / "env.json").read_text()) if (run_dir / "env.json").is_file() else {}
        rows = _metrics(run_dir)
    name = run_dir.name if run_dir is not None else config["architecture"]
    ssl, optim, train, data, crops = (cfg.get(k, {}) for k in ("ssl", "optim", "train", "data", "crops"))
    world = env.get("world_size", 1)
    out = [f"---\nlibrary_name: timm\ntags: [pathology, self-supervised, vision-transformer, pathfm]\n---\n",
           f"# {name}\n",
           f"A vision transformer trained with self-supervision on histopathology tiles by pathfm "
           f"(step {step if step is not None else '?'}). It gives one embedding per tile; it has no classifier.\n",
           "## Use\n",
           "```python\nimport timm, torch\n"
           f'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True).eval()   # or "hf-hub:ORG/NAME"\n'
           "cfg = timm.data.resolve_data_config({}, model=model)\n"
           "transform = timm.data.create_transform(**cfg)        # mean / std / size from config.json\n"
           "with torch.no_grad():\n"
           "    cls = model(transform(image)[None])                # (1, %d): the class token after the final norm\n```\n" % config["num_features"],
           "Files: `config.json` + `model.safetensors` (what timm reads); `heads.safetensors`, when present, the "
           "DINO / iBOT projection heads for continued pretraining or distillation (timm ignores it); `model.pth` + "
           "`model.json`, pathfm's own copy and sidecar, need not be published.\n",
           f"Inputs: RGB tiles normalised with mean {pcfg['mean']} and std {pcfg['std']}; "
           f"trained at {args['img_size']} px, any multiple of {a['patch_size']} px per side works (dynamic_img_size). "
           "`model.forward_features(x)` gives all tokens: the class token, "
           f"{a['num_registers']} register token(s), then the patch tokens.\n",
           "## Model\n",
           f"- architecture: timm `{config['architecture']}` ({a['arch']}, patch {a['patch_size']}, "
           f"{a['num_registers']} registers, {config['pathfm']['mlp']}, LayerScale {a['layerscale']})",
           f"- parameters: {n_params / 1e6:.1f} M; embedding size {config['num_features']}",
           ]
    if cfg:
        out += [f"- recipe: {ssl.get('objective', '?')} ({ssl.get('prototypes')} prototypes, teacher targets by "
                f"{ssl.get('centering')}, KoLeo weight {ssl.get('koleo_weight')}, KDE weight {ssl.get('kde_weight')}), "
                f"{step} of {train.get('steps')} steps, {optim.get('batch_size')} tiles per rank x {world} rank(s) "
                f"per step, base lr {optim.get('base_lr')}",
                f"- crops: {crops.get('global_size')} px global, {crops.get('n_local')} x {crops.get('local_size')} px local"]
    out.append("\n## Training data, as the run saw it\n")
    if cfg:
        slides = [r["data/usable_slides"] for r in rows if "data/usable_slides" in r]
        mix = _mpp_mix(rows)
        tiles = (step or 0) * (optim.get("batch_size") or 0) * world
        out += [f"- source: {_groups(cfg)}",
                f"- usable slides: {slides[-1] if slides else '?'}"
                + (f"; unusable {rows[-1].get('data/unusable_slides', 0)}, dropped {rows[-1].get('data/dropped_slides', 0)}"
                   if slides else ""),
                f"- magnifications asked for: {data.get('mpps')} µm/px; realised mix (rank 0's tiles): "
                + (", ".join(f"{m} µm/px {v:.0%}" for m, v in mix.items()) if mix else "not logged"),
                f"- tiles seen: {tiles:,} ({step} steps x {optim.get('batch_size')} x {world} rank(s)), each "
                f"giving 2 global and {crops.get('n_local')} local crops"]
    else:
        out.append("- not recorded: exported without its run folder")
    out.append("\n## Compute\n")
    if rows:
        kind = f"rank 0's host: {len(env['gpus'])} x {env['gpus'][0]}" if env.get("gpus") else "CPU processes"
        unit = "GPU-hours" if env.get("gpus") else "CPU-process-hours"
        out.append(f"- {_compute_hours(rows, world):.3g} {unit} of training steps ({world} rank(s), {kind}); "
                   "from the step times in metrics.jsonl, without start-up, checkpoints and probes")
    else:
        out.append("- not recorded")
    probes = _probes(run_dir) if run_dir is not None else []
    out.append("\n## Probe results\n")
    if probes:
        out += ["Frozen-backbone probes run by pathfm's eval/ on the checkpoints of this run:\n",
                "| task | protocol | embedding | checkpoint | metric | mean ± stdev |", "|---|---|---|---|---|---:|", *probes]
    else:
        out.append("None recorded in this run folder (run eval/knn.py or eval/linear.py, then export again).")
    out += ["\n## Intended use and limits\n",
            "- For research: tile embeddings for linear / kNN probes, retrieval, and as the feature extractor of "
            "slide-level models. Not a medical device; not validated for diagnosis.",
            "- It knows only the slides above: other stains, scanners, organs or magnifications than those seen may "
            "embed poorly. Probe it on your own labelled tiles before relying on it.",
            f"- Embeddings are exact at {args['img_size']} px; other sizes resample the position embeddings.",
            ]
    if step is not None and train.get("steps") and step < train["steps"]:
        out.append(f"- Exported at step {step} of a planned {train['steps']}: an intermediate model.")
    return "\n".join(out) + "\n"
