"""Apply plausible one-line bugs to a scratch copy of the repository and check the tests meant to catch them fail.

    python tests/mutants.py                 # every mutant; prints a table mutant -> caught / MISSED
    python tests/mutants.py --only M5 M1    # mutants whose name starts with one of these
    python tests/mutants.py --list

Each mutant replaces one exact piece of text in one file. When the text is missing (someone edited that line),
the script stops before running anything and names the mutant: update its text here, never drop it silently.
A mutant counts as caught when its tests fail (pytest exit status 1); a collection error or timeout is reported
as such. Not part of the default suite: it runs each mutant's tests in a fresh process (minutes in all).
Exit status: 0 when every mutant is caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: list


STEP = ["tests/test_step.py"]
KILL = "tests/test_train.py::test_kill_9_while_a_checkpoint_is_written_resumes_exactly"
MUTANTS = [
    # the training step (tests/test_step.py recomputes it from the math)
    Mutant("M5 teacher crop paired with its own student view", "pathfm/train.py",
           "targets.cls_probs.view(2, B, -1)", "targets.cls_probs.view(2, B, -1).flip(0)", STEP),
    Mutant("step: DINO and iBOT weights swapped", "pathfm/plan.py",
           'weights = {"dino": s.dino_weight} | ({"ibot": s.ibot_weight} if ibot else {})',
           'weights = {"dino": s.ibot_weight} | ({"ibot": s.dino_weight} if ibot else {})', STEP),
    Mutant("step: teacher given the student's (masked) crops", "pathfm/train.py",
           "tokens = model.backbone.forward_features(images)",
           "tokens = model.backbone.forward_features(images, masks if plan.mask_crops else None)", STEP),
    Mutant("distill: targets from the student's EMA, not the frozen teacher", "pathfm/train.py",
           "targets = compute_targets(plan, teacher, teacher_input(global_crops), masks, teacher_temp, loss_state)",
           "targets = compute_targets(plan, ema, teacher_input(global_crops), masks, teacher_temp, loss_state)",
           ["tests/test_step.py::test_distillation_step_from_a_frozen_teacher_file_matches_the_math"]),
    Mutant("step: KoLeo on the local crops' CLS", "pathfm/train.py",
           'losses["koleo"] = sum(koleo_loss(c) for c in s_global[:, 0].chunk(2))',
           'losses["koleo"] = sum(koleo_loss(c) for c in s_local[:, 0].chunk(2))', STEP),
    Mutant("step: EMA with 1 - momentum", "pathfm/train.py",
           "p_ema.lerp_(p_s.detach(), 1.0 - momentum)", "p_ema.lerp_(p_s.detach(), momentum)", STEP),
    Mutant("step: a non-finite step applied", "pathfm/train.py",
           "if nonfinite.skipped(step, problem, optimizer, log.logger):", 'if nonfinite.skipped(step, "", optimizer, log.logger):',
           ["tests/test_train.py::test_a_single_nonfinite_step_changes_nothing"]),
    Mutant("Sinkhorn-Knopp: each rank scales by its own row count", "pathfm/losses.py",
           "        q /= q.sum(dim=0, keepdim=True)  # (1, N): each row has mass 1 (local: rows are not shared)\n",
           "        q /= q.sum(dim=0, keepdim=True)  # (1, N): each row has mass 1 (local: rows are not shared)\n"
           "        q /= max(q.shape[1], 1)\n",
           ["tests/test_step.py::test_sinkhorn_knopp_targets_on_1_and_4_ranks_equal_the_math_on_the_whole_batch"]),
    # the step plan and its readers (tests/test_plan.py)
    Mutant("plan: crops masked although iBOT scores every patch", "pathfm/plan.py",
           'mask_crops = s.objective == "dinov2" and patch_targets and ibot_patches == "masked"',
           'mask_crops = s.objective == "dinov2" and patch_targets', ["tests/test_plan.py"]),
    Mutant("step_flops: student heads counted under feature targets", "pathfm/flops.py",
           "        if plan.features:  # the projections to the teacher's width replace the heads",
           "        if False:  # the projections to the teacher's width replace the heads", ["tests/test_plan.py"]),
    # a real kill -9 during a checkpoint write, then a relaunch (tests/test_train.py)
    Mutant("kill -9: a killed write's .tmp folder not cleared before the next save", "pathfm/checkpoint.py",
           "shutil.rmtree(stale, ignore_errors=True)", "pass", [KILL]),
    Mutant("kill -9: resume without the saved RNG state", "pathfm/checkpoint.py",
           "        _set_rng_state(torch.load(rng, weights_only=True))", "        pass", [KILL]),
    # the user-error path (tests/test_user_errors.py runs the launcher as users do)
    Mutant("user errors: a SlideError in the trainer's start is a traceback", "pathfm/train.py",
           "    except (ConfigError, SlideError) as e:", "    except ConfigError as e:",
           ["tests/test_user_errors.py::test_launcher_user_errors_are_one_line_and_leave_no_run_folder"]),
    Mutant("user errors: the fresh run folder is left behind", "pathfm/train.py",
           "            shutil.rmtree(run_dir, ignore_errors=True)\n        raise SystemExit",
           "            pass\n        raise SystemExit",
           ["tests/test_user_errors.py::test_launcher_user_errors_are_one_line_and_leave_no_run_folder"]),
    Mutant("user errors: --debug ignored", "pathfm/train.py",
           "        if debug:\n            raise\n        if fresh:", "        if fresh:",
           ["tests/test_user_errors.py::test_debug_shows_the_error_itself_and_config_errors_are_one_line"]),
    # weak assertions made strong
    Mutant("export: attention projections transposed", "pathfm/export.py",
           'sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k != "mask_token"}',
           'sd = {k: (v.T if k.endswith("attn.proj.weight") else v).detach().float().cpu().contiguous() '
           'for k, v in model.state_dict().items() if k != "mask_token"}',
           ["tests/test_export.py::test_export_loads_strictly_into_timm_and_matches"]),
    Mutant("unsupervised: alignment of mismatched views", "eval/unsupervised.py",
           'out["alignment"] = alignment(view1, view2)', 'out["alignment"] = alignment(view1, view2.flip(0))',
           ["tests/test_eval_cli.py::test_unsupervised_on_slides_and_images"]),
    Mutant("gpu_check: an unknown section only printed", "bench/gpu_check.py",
           '        raise SystemExit(f"error: unknown section(s)', '        print(f"error: unknown section(s)',
           ["tests/test_gpu_check.py::test_bad_sections_and_config_keys_fail_before_anything_runs"]),
    # probes
    Mutant("M1 kNN vote weights without the temperature", "eval/knn.py",
           "weights = (sims / temperature).exp()", "weights = sims.exp()", ["tests/test_eval_probes.py"]),
    Mutant("M2 kNN: every k votes with all k_max neighbours", "eval/knn.py",
           "votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])",
           "votes.scatter_add_(1, neighbour_labels, weights)", ["tests/test_eval_probes.py"]),
    Mutant("M3 eva probe returns its last head", "eval/linear.py",
           "    head.load_state_dict(best_state)\n", "", ["tests/test_eval_probes.py"]),
    Mutant("M4 lr grid picks the worst head", "eval/linear.py",
           "best = max(range(len(scores)), key=scores.__getitem__)",
           "best = min(range(len(scores)), key=scores.__getitem__)", ["tests/test_eval_probes.py"]),
    Mutant("M4' the same, against the nine-embedding grid test", "eval/linear.py",
           "best = max(range(len(scores)), key=scores.__getitem__)",
           "best = min(range(len(scores)), key=scores.__getitem__)",
           ["tests/test_eval_ux.py::test_grid_probe_on_nine_embeddings_takes_seconds"]),
]


def scratch_copy(dest: Path) -> None:
    skip = shutil.ignore_patterns(".git", ".venv", ".cache", "runs", "__pycache__", ".pytest_cache", "*.egg-info",
                                  "eval_results", "exports", "report")
    shutil.copytree(ROOT, dest, ignore=skip, symlinks=True)
    if (ROOT / ".cache").exists():  # the tests' shared synthetic-slide cache: read, never mutated per mutant
        (dest / ".cache").symlink_to(ROOT / ".cache")
    if (ROOT.parent / "shared").exists() and not (dest.parent / "shared").exists():  # ../shared/data: real slides, tiles
        (dest.parent / "shared").symlink_to(ROOT.parent / "shared")


def apply(m: Mutant, tree: Path) -> None:
    f = tree / m.path
    text = f.read_text()
    f.write_text(text.replace(m.old, m.new, 1))


def check_targets(mutants) -> None:
    bad = []
    for m in mutants:
        n = (ROOT / m.path).read_text().count(m.old)
        if n != 1:
            bad.append(f"{m.name}: {m.path} holds its target text {n} times (need exactly 1): {m.old!r}")
        for t in m.tests:
            if not (ROOT / t.split("::")[0]).exists():
                bad.append(f"{m.name}: test {t} does not exist")
    if bad:
        raise SystemExit("mutants.py: stale mutants, fix their text before running:\n  " + "\n  ".join(bad))


def run(m: Mutant, timeout: int) -> tuple[str, float]:
    with tempfile.TemporaryDirectory(prefix="pathfm-mutant-") as d:
        tree = Path(d) / "repo"
        scratch_copy(tree)
        apply(m, tree)
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--tb=short", *m.tests]
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "TIMEOUT", time.perf_counter() - t
        took = time.perf_counter() - t
        lines = p.stdout.strip().splitlines() or ["(no output)"]
        last = lines[-1]
        if p.returncode == 1:  # name the first failed assertion, so a table shows what caught it
            why = next((ln[1:].strip() for ln in lines if ln.startswith("E ")), "")
            return f"caught ({last}; {why[:90]})", took
        if p.returncode == 0:  # "skipped" here means the test could not run (no ../shared/data?): not caught either
            return f"MISSED ({last})", took
        return f"ERROR rc={p.returncode} ({last})", took


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=None, help="run the mutants whose name starts with one of these")
    p.add_argument("--list", action="store_true")
    p.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    a = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.only or any(m.name.startswith(o) for o in a.only)]
    check_targets(chosen)
    if a.list:
        for m in chosen:
            print(f"{m.name}: {m.path}  ->  {' '.join(m.tests)}")
        return 0
    rows = []
    for m in chosen:
        result, took = run(m, a.timeout)
        rows.append((m.name, result, took))
        print(f"{m.name:55s} {result}  [{took:.0f} s]", flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'mutant':{width}s} | result")
    print(f"{'-' * width}-|-{'-' * 40}")
    for name, result, took in rows:
        print(f"{name:{width}s} | {result} [{took:.0f} s]")
    caught = sum(r[1].startswith("caught") for r in rows)
    print(f"\n{caught}/{len(rows)} mutants caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
