"""Accuracy benchmark: the whole pipeline on a labelled photo-ID set, scored on its test answers.

It runs the numbered scripts that `make submission` runs (00 -> 04, each a subprocess with this
Python), times every stage, scores `submission.csv` against the answers with
`whaleid.metrics.map5_report`, and measures the untrained floor by the same code (stages 03 -> 04
with `embed.checkpoint=untrained` on the same crops). The table goes to
`bench/results/accuracy_{dataset}_{profile}.md`.

The answers file is read only here, after the submission is written, to score it: no stage fits
or tunes anything on it (the new_individual threshold comes from the validation fold).

    python bench/bench_accuracy.py --data ../shared/data/rightwhale --profile cpu --config configs/rightwhale.yaml
    python bench/bench_accuracy.py --data ../shared/data/rightwhale --profile cpu --config configs/rightwhale.yaml --ablation
    python bench/bench_accuracy.py --data data/demo --profile cpu --subset-ids 10 --skip-floor   # smoke test

`--subset-ids N` trains on the first N individuals (sorted ids) and keeps every test image: a
smoke test whose score is not comparable (test images of the other individuals cannot be found).
`--pseudo-rounds N` adds N pseudo-label rounds: stage 04's confident test predictions
(`pseudo_labels.csv`) become training rows (`train.pseudo_labels`) and stages 02 -> 04 run again,
each round in `pseudo_round{r}/` of the artifact folder (the run before keeps its model and
submission), with a row and a threshold line of its own in the results.
`--ablation` measures variants of the recipe on the validation fold only (see `VARIANTS`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from whaleid.config import Config, dump_config, load_config  # noqa: E402
from whaleid.errors import UserError  # noqa: E402
from whaleid.io import write_text  # noqa: E402
from whaleid.metrics import map5_report  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SCRIPTS = {
    "00_prepare": "00_prepare_data.py",
    "01_crops": "01_detect_crop.py",
    "02_train": "02_train_arcface.py",
    "03_embed": "03_embed.py",
    "04_submit": "04_knn_submit.py",
}
STAGES = list(SCRIPTS)
ANSWERS = "test_labels.csv"
METRIC_KEYS = ("map5", "map5_known", "map5_new", "acc1")


# ---------------------------------------------------------------------------------------------
# Running the stages
# ---------------------------------------------------------------------------------------------

@dataclass
class Runner:
    """How every stage is called: overlays and overrides shared by all runs, and a log file."""

    overlays: list[str]
    sets: list[str]
    log: Path
    times: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str, out: Path, data: Path, extra: list[str] = (), label: str = "") -> float:
        """Run one numbered script with `paths.data`/`paths.outputs` set; returns its wall time.

        Output goes to the log file; a failing stage stops the benchmark naming the log.
        """
        args = [sys.executable, str(ROOT / SCRIPTS[name])]
        for overlay in self.overlays:
            args += ["--config", overlay]
        for expr in [*self.sets, f"paths.data={data}", f"paths.outputs={out}", *extra]:
            args += ["--set", expr]
        label = label or name
        print(f"[{label}] {shlex.join(args[1:])}", flush=True)
        start = time.perf_counter()
        with open(self.log, "a") as fh:
            fh.write(f"\n### {label}: {shlex.join(args)}\n")
            fh.flush()
            proc = subprocess.run(args, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise UserError(f"{SCRIPTS[name]} failed (exit {proc.returncode}) for {label}: see {self.log}")
        self.times[label] = seconds
        print(f"[{label}] done in {seconds:.0f} s", flush=True)
        return seconds

    def stages(self, first: str, last: str, out: Path, data: Path, extra: list[str] = (), tag: str = "") -> None:
        """Run the stages from `first` to `last` in order into `out`."""
        for name in STAGES[STAGES.index(first): STAGES.index(last) + 1]:
            self.stage(name, out, data, extra, f"{name}{tag}")


def copy_upstream(src: Path, dst: Path, upto: str) -> None:
    """Give `dst` the artifacts of `src` up to stage `upto` without redoing them.

    Crop paths in crops.csv are absolute, so the crops themselves stay where they are and only
    the small files of the stage folders are copied.
    """
    for name in STAGES[: STAGES.index(upto) + 1]:
        target = dst / name
        target.mkdir(parents=True, exist_ok=True)
        for path in (src / name).iterdir():
            if path.is_file():
                shutil.copy2(path, target / path.name)


# ---------------------------------------------------------------------------------------------
# Data folders
# ---------------------------------------------------------------------------------------------

def data_view(data: Path, dest: Path, train_ids: int = 0, test_limit: int = 0, min_images: int = 1) -> Path:
    """A folder that looks like `data` without its answers file, so no stage can read them.

    Every entry is a symlink (nothing is copied) except `train.csv`, reduced to the first
    `train_ids` individuals (sorted ids) with at least `min_images` images when > 0, and
    `sample_submission.csv`, reduced to its first `test_limit` images when > 0 (quick runs).
    """
    dest.mkdir(parents=True, exist_ok=True)
    for entry in data.iterdir():
        link = dest / entry.name
        if entry.name in (ANSWERS, "train.csv", "sample_submission.csv") or link.exists() or link.is_symlink():
            continue
        link.symlink_to(entry.resolve())
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    if train_ids > 0:
        counts = train["individual_id"].value_counts()
        keep = sorted(counts.index[counts >= min_images])[:train_ids]
        train = train[train["individual_id"].isin(keep)]
    train.to_csv(dest / "train.csv", index=False)
    sample = pd.read_csv(data / "sample_submission.csv", dtype=str, keep_default_na=False)
    (sample.head(test_limit) if test_limit > 0 else sample).to_csv(dest / "sample_submission.csv", index=False)
    return dest


def resolve_data(data: Path, runner: Runner) -> Path:
    """`data` when it holds a train.csv; else the demo set, generated like stage 00 would."""
    if (data / "train.csv").is_file():
        return data
    cfg = load_config(runner.overlays, [*runner.sets, f"paths.data={data}"])
    demo = Path(cfg.paths.demo)
    if not demo.is_absolute():
        demo = ROOT / demo
    args = [sys.executable, "-m", "whaleid.demo_data", "--out", str(demo)]
    for overlay in runner.overlays:
        args += ["--config", overlay]
    for expr in runner.sets:
        args += ["--set", expr]
    print(f"no train.csv in {data}: using the demo set at {demo}", flush=True)
    if subprocess.run(args, cwd=ROOT).returncode != 0:
        raise UserError(f"demo generation into {demo} failed")
    return demo


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------

def score_submission(submission: Path, answers: Path) -> dict:
    """MAP@5 overall/known/new and accuracy@1 of a submission against an answers file."""
    sub = pd.read_csv(submission, dtype=str, keep_default_na=False)
    truth = pd.read_csv(answers, dtype=str, keep_default_na=False)
    for col in ("image", "individual_id"):
        if col not in truth.columns:
            raise UserError(f"answers file {answers} has no column {col!r}")
    merged = sub.merge(truth[["image", "individual_id"]], on="image", how="inner")
    if merged.empty:
        raise UserError(f"{answers} shares no image with {submission}")
    return map5_report([p.split() for p in merged["predictions"]], merged["individual_id"].tolist())


def stage04_metrics(out: Path) -> dict:
    """metrics.json of stage 04 in `out`."""
    return json.loads((out / "04_submit" / "metrics.json").read_text())


def validation_of(out: Path) -> dict:
    """The validation-fold scores stage 04 wrote (empty without a fold)."""
    return stage04_metrics(out).get("validation", {})


def models_note(name: str, out: Path) -> str:
    """Which model ranked the test images of run `name` and which one validated (stage 03's report)."""
    report = json.loads((out / "03_embed" / "report.json").read_text())
    kind = report.get("checkpoint", {}).get("kind", "?")
    if report.get("fold_checkpoint"):
        return (f"{name}: test ranked by the all-data refit model (`{kind}`), validation by the fold model "
                f"(`{report['fold_checkpoint'].get('kind', '?')}`), which calibrated the threshold.")
    return f"{name}: test and validation ranked by the `{kind}` model."


def fmt(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


# ---------------------------------------------------------------------------------------------
# Machine and report
# ---------------------------------------------------------------------------------------------

def machine() -> str:
    """CPU model and cores, and the GPU when torch sees one."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        model = names[0] if names else model
    text = f"CPU {model}, {os.cpu_count()} cores"
    import torch

    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    return text + f"; Python {platform.python_version()}, torch {torch.__version__}"


def header(title: str, args: argparse.Namespace, data: Path) -> list[str]:
    """Title, command line, machine, date and data folder."""
    return [
        f"# {title}",
        "",
        f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
        f"- machine: {machine()}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- data: `{data}`",
        f"- overlays: {', '.join(f'`{c}`' for c in overlays_of(args)) or 'none'}; "
        f"--set: {', '.join(f'`{s}`' for s in args.sets) or 'none'}",
        "",
    ]


def config_block(cfg: Config, overlays: list[str]) -> list[str]:
    """The overlay files verbatim and the full resolved config, folded."""
    lines = []
    for overlay in overlays:
        lines += [f"Overlay `{overlay}`:", "", "```yaml", Path(overlay).read_text().rstrip(), "```", ""]
    lines += ["<details><summary>resolved config</summary>", "", "```yaml", dump_config(cfg).rstrip(), "```",
              "", "</details>", ""]
    return lines


def score_row(name: str, m: dict) -> str:
    return f"| {name} | " + " | ".join(fmt(m.get(k)) for k in METRIC_KEYS) + f" | {m.get('n', 'n/a')} |"


SCORE_HEAD = ["| run | MAP@5 | known | new | acc@1 | n |", "|---|---:|---:|---:|---:|---:|"]


def overlays_of(args: argparse.Namespace) -> list[str]:
    """The profile overlay first, then the --config files (a dataset overlay wins over the profile)."""
    return [str(ROOT / "configs" / f"{args.profile}.yaml"), *args.config]


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

def pseudo_rounds(runner: Runner, out: Path, data: Path, rounds: int) -> list[tuple[str, Path]]:
    """Retrain `rounds` times with the previous round's pseudo-labels, each round in its own
    folder `out/pseudo_round{r}` (stages 00-01 copied), so the run before keeps its model and
    submission; (name, folder) each."""
    results, previous = [], out
    for r in range(1, rounds + 1):
        folder = out / f"pseudo_round{r}"
        copy_upstream(out, folder, "01_crops")
        pseudo = folder / "pseudo_labels_in.csv"
        shutil.copy2(previous / "04_submit" / "pseudo_labels.csv", pseudo)
        print(f"pseudo round {r}: {len(pd.read_csv(pseudo))} test images as extra training rows -> {folder}", flush=True)
        runner.stages("02_train", "04_submit", folder, data, [f"train.pseudo_labels={pseudo}"], f" (pseudo round {r})")
        results.append((f"trained + pseudo round {r}", folder))
        previous = folder
    return results


def bench(args: argparse.Namespace) -> str:
    """Run the pipeline, the floor and optional pseudo rounds; return the markdown report."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(overlays_of(args), list(args.sets), out / "bench.log")
    data = resolve_data(Path(args.data).resolve(), runner)
    answers = Path(args.labels).resolve() if args.labels else data / ANSWERS
    if not answers.is_file():
        raise UserError(f"answers file {answers} not found: give --labels")
    run_data = data_view(data, out / "data_subset", args.subset_ids) if args.subset_ids else data

    runner.stages("00_prepare", "04_submit", out, run_data)
    runs = [("trained", out), *pseudo_rounds(runner, out, run_data, args.pseudo_rounds)]
    if not args.skip_floor:
        floor = out / "floor"
        copy_upstream(out, floor, "01_crops")
        runner.stages("03_embed", "04_submit", floor, run_data, ["embed.checkpoint=untrained", "rerank.enabled=false"],
                       " (floor)")
        runs.append(("untrained floor", floor))
    # each run's figures from its own folder, scored after its submission.csv was written
    rows = [(name, validation_of(folder), score_submission(folder / "submission.csv", answers)) for name, folder in runs]
    thresholds = [(name, stage04_metrics(folder)["threshold"]) for name, folder in runs]

    cfg = load_config(runner.overlays, [*runner.sets, f"paths.data={run_data}", f"paths.outputs={out}"])
    lines = header(f"Accuracy: {dataset_name(args)}, profile {args.profile}", args, data)
    if args.subset_ids:
        lines += [f"**Smoke test**: trained on the first {args.subset_ids} individuals only, every test image kept; "
                  "the test score is not comparable with a full run.", ""]
    lines += ["## Test (scored on the answers file after the submission was written)", "", *SCORE_HEAD]
    lines += [score_row(name, t) for name, _, t in rows]
    lines += [""] + [models_note(name, folder) for name, folder in runs]
    lines += ["", f"Answers: `{answers}`.", "", "## Validation fold (what every choice was made on)", "", *SCORE_HEAD]
    lines += [score_row(name, v) for name, v, _ in rows]
    lines += [""] + [f"new_individual threshold of {name}: {t['value']:.4f}: {t['how']} (mode `{t['mode']}`)."
                     + (f" Test ranking (all-data refit model): {t['test_value']:.4f}." if "test_value" in t else "")
                     for name, t in thresholds[:1 + args.pseudo_rounds]]
    lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in runner.times.items()]
    lines += [f"| total | {sum(runner.times.values()):.0f} |", "",
              f"Artifacts and log: `{out}`" + (f" (pseudo rounds in `pseudo_round1`...`pseudo_round{args.pseudo_rounds}`)"
                                                if args.pseudo_rounds else "") + ".", ""]
    return "\n".join(lines + config_block(cfg, runner.overlays))


def dataset_name(args: argparse.Namespace) -> str:
    """The --data folder's name ("demo" when it holds no train.csv), marked for a subset run."""
    data = Path(args.data).resolve()
    name = data.name if (data / "train.csv").is_file() else "demo"
    return name + (f"-subset{args.subset_ids}" if args.subset_ids else "")


# ---------------------------------------------------------------------------------------------
# Ablation on the validation fold
# ---------------------------------------------------------------------------------------------

@dataclass
class Variant:
    """One change to the recipe: the first stage to redo and the overrides, given the base run."""

    name: str
    what: str
    first: str
    sets: Callable[[Config, Path], list[str]]
    applies: Callable[[Config], str] = lambda cfg: ""  # a reason when the variant is N/A


def _full_frame(cfg: Config, base: Path) -> list[str]:
    return [f"crop.box_source.{s}=full" for s in cfg.crop.sources]


def _crops_na(cfg: Config) -> str:
    if all(cfg.crop.box_source.get(s) == "full" for s in cfg.crop.sources):
        return "N/A: the data are already crops (box_source full)"
    return ""


def _k_na(k: int) -> Callable[[Config], str]:
    """N/A check for a sub-centre variant whose k the base already uses."""
    return lambda cfg: f"N/A: the base already uses k={k}" if cfg.loss.k == k else ""


def _hflip(cfg: Config, base: Path) -> list[str]:
    return [f"train.aug.hflip={0.0 if cfg.train.aug.hflip > 0 else 0.5}"]


VARIANTS = [
    Variant("full_frame", "whole frame instead of the crop", "01_crops", _full_frame, _crops_na),
    Variant("fixed_margin", "fixed ArcFace margin (no dynamic margins)", "02_train",
            lambda cfg, base: ["loss.dynamic_margin=false"]),
    Variant("subcenter_k1", "plain ArcFace (sub-centres k=1)", "02_train", lambda cfg, base: ["loss.k=1"], _k_na(1)),
    Variant("subcenter_k3", "sub-centre ArcFace k=3", "02_train", lambda cfg, base: ["loss.k=3"], _k_na(3)),
    Variant("hflip_toggled", "horizontal-flip augmentation toggled (0 <-> 0.5)", "02_train", _hflip),
    Variant("no_tta", "no flip TTA (base checkpoint)", "03_embed",
            lambda cfg, base: ["embed.flip_tta=none", f"embed.checkpoint={base / '02_train' / 'best.pt'}"],
            lambda cfg: "N/A: the base has no TTA" if cfg.embed.flip_tta == "none" else ""),
    Variant("pseudo_labels", "one pseudo-label round (base's pseudo_labels.csv)", "02_train",
            lambda cfg, base: [f"train.pseudo_labels={base / '04_submit' / 'pseudo_labels.csv'}"]),
]


def custom_variant(spec: str) -> Variant:
    """`NAME:KEY=VALUE,KEY=VALUE`: retrain (stages 02-04) with these overrides."""
    name, _, sets = spec.partition(":")
    pairs = [s for s in sets.split(",") if s]
    if not name or not pairs or any("=" not in s for s in pairs):
        raise argparse.ArgumentTypeError(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    return Variant(name, "custom", "02_train", lambda cfg, base: list(pairs))


def size_variant(size: int) -> Variant:
    return Variant(f"image_size_{size}", f"train at {size} px", "02_train",
                   lambda cfg, base: [f"train.image_size={size}"])


NO_REFIT = "train.refit=false"


def ablation_variants(args: argparse.Namespace) -> list[Variant]:
    """The variants asked for, checked before anything runs: each runs in out/NAME and is timed
    under its name, so names must be unique and not `base`."""
    variants = [v for v in VARIANTS if not args.variants or v.name in args.variants]
    variants += [size_variant(s) for s in args.sizes] + args.custom
    names = ["base", *(v.name for v in variants)]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise UserError(f"ablation variant names must be unique and not 'base': {', '.join(clash)}")
    return variants


def ablation(args: argparse.Namespace) -> str:
    """Base run plus each variant, scored on the validation fold only (the answers are hidden)."""
    variants = ablation_variants(args)
    out = (Path(args.out).resolve() / "ablation")
    out.mkdir(parents=True, exist_ok=True)
    # Only validation is scored: the all-data refit, which ranks test alone, would double each
    # training for nothing (a --set train.refit=true still comes later and wins).
    runner = Runner(overlays_of(args), [NO_REFIT, *args.sets], out / "bench.log")
    data = resolve_data(Path(args.data).resolve(), runner)
    view = data_view(data, out / "data", args.subset_ids, args.test_limit)
    base = out / "base"
    cfg = load_config(runner.overlays, [*runner.sets, f"paths.data={view}", f"paths.outputs={base}"])
    if cfg.prepare.fold < 0:
        raise UserError("the ablation scores the validation fold: set prepare.fold >= 0")
    runner.stages("00_prepare", "04_submit", base, view, tag=" (base)")

    def one(v: Variant) -> tuple:
        reason = v.applies(cfg)
        if reason:
            return (v.name, v.what, "-", {}, reason)
        target = out / v.name
        copy_upstream(base, target, STAGES[STAGES.index(v.first) - 1])
        own = Runner(runner.overlays, runner.sets, target / "bench.log")  # one log per variant
        own.stages(v.first, "04_submit", target, view, v.sets(cfg, base), f" ({v.name})")
        runner.times.update(own.times)
        change = ", ".join(f"`{s.replace(str(out) + os.sep, '')}`" for s in v.sets(cfg, base))
        return (v.name, f"{v.what}: {change}", f"{v.first[:2]}-04", validation_of(target), "")

    # Variants are independent (each its own folder): --jobs N runs N at once (one GPU has room).
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = [("base", "the profile as configured", "00-04", validation_of(base), "")] + list(pool.map(one, variants))
    return "\n".join(ablation_table(args, data, rows, runner) + config_block(cfg, runner.overlays))


def ablation_table(args: argparse.Namespace, data: Path, rows: list, runner: Runner) -> list[str]:
    """Markdown of the ablation: validation MAP@5 per variant and its change against the base."""
    lines = header(f"Ablation on the validation fold: {dataset_name(args)}, profile {args.profile}", args, data)
    lines += ["Every number is the validation-fold MAP@5 of stage 04 (`04_submit/metrics.json`); the stages ran "
              f"on a view of the data without its answers file, with `{NO_REFIT}` (the all-data refit ranks test "
              "only, so it would change no figure here) unless --set says otherwise.", "",
              "| variant | change | stages | MAP@5 | known | new | acc@1 | vs base |", "|---|---|---|---:|---:|---:|---:|---:|"]
    base = rows[0][3].get("map5")
    for name, what, stages, val, note in rows:
        delta = "" if note or name == "base" else f"{val['map5'] - base:+.4f}"
        metrics = " | ".join(fmt(val.get(k)) for k in METRIC_KEYS) if val else f"{note} | | |"
        lines.append(f"| {name} | {what} | {stages} | {metrics} | {delta} |")
    lines += ["", "| stage | seconds |", "|---|---:|"] + [f"| {k} | {v:.0f} |" for k, v in runner.times.items()]
    return lines + [""]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a Happywhale-layout folder with test_labels.csv (or none: demo)")
    p.add_argument("--labels", default="", help="answers file (image, individual_id); default DATA/test_labels.csv")
    p.add_argument("--profile", default="cpu", help="overlay configs/{profile}.yaml (cpu, gpu)")
    p.add_argument("--config", action="append", default=[], help="further overlay, after the profile (repeatable)")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE", help="override (repeatable)")
    p.add_argument("--out", default="", help="artifact folder (default outputs/bench_accuracy/{dataset}_{profile})")
    p.add_argument("--subset-ids", type=int, default=0, help="train on the first N individuals only (smoke test)")
    p.add_argument("--skip-floor", action="store_true", help="do not measure the untrained floor")
    p.add_argument("--pseudo-rounds", type=int, default=0, help="pseudo-label rounds after the first training")
    p.add_argument("--ablation", action="store_true", help="validation-fold ablation of the recipe instead")
    p.add_argument("--variants", default="", help=f"ablation variants, comma-separated (default all: "
                   f"{', '.join(v.name for v in VARIANTS)})")
    p.add_argument("--sizes", default="", help="ablation: extra train.image_size variants, e.g. 128,192")
    p.add_argument("--test-limit", type=int, default=0, help="ablation: embed only the first N test images")
    p.add_argument("--variant", action="append", default=[], dest="custom", type=custom_variant,
                   metavar="NAME:KEY=VALUE[,KEY=VALUE]", help="ablation: a further variant retrained with these overrides")
    p.add_argument("--tag", default="", help="suffix of the results file name (runs side by side)")
    p.add_argument("--jobs", type=int, default=1, help="ablation: variants run at once (GPU: several fit)")
    args = p.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - {v.name for v in VARIANTS})
    if unknown:
        p.error(f"unknown variant(s) {unknown}; valid: {[v.name for v in VARIANTS]}")
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    profile = ROOT / "configs" / f"{args.profile}.yaml"
    if not profile.is_file():
        p.error(f"no profile {profile}; valid: {sorted(f.stem for f in (ROOT / 'configs').glob('*.yaml'))}")
    args.config = [str(Path(c).resolve()) for c in args.config]
    return args


def main() -> None:
    args = parse_args()
    name = dataset_name(args)
    args.out = args.out or str(ROOT / "outputs" / "bench_accuracy" / f"{name}_{args.profile}")
    kind = "accuracy_ablation" if args.ablation else "accuracy"
    try:
        text = ablation(args) if args.ablation else bench(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    path = RESULTS / f"{kind}_{name}_{args.profile}{'_' + args.tag if args.tag else ''}.md"
    write_text(path, text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
