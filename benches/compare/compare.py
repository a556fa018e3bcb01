#!/usr/bin/env python3
"""Head-to-head: ringfeed vs PyTorch DataLoader + torchvision vs DALI (CPU) vs the decode floor.

Every system runs the ImageNet training pipeline on the same JPEGs (the ImageFolder tree for
the peers, the tar shards holding the same bytes for ringfeed), for the same number of epochs,
interleaved (A B C … A B C …) so machine drift hits all of them, each repetition from a fresh
loader whose first (warm-up) epoch is not timed. Two modes:

* throughput: the consumer only touches each batch; images/s per system, ratios to ringfeed;
* trainer: each batch is followed by a busy-wait "step" (``--simulate-step-ms``); the share of
  wall time the trainer spent waiting for data, per loader (GPU starvation).

Writes ``compare.csv`` (every run), ``summary.md`` (medians, ratios, targets),
``environment.json`` (date, CPU, cores, versions, peers not run and why) and ``compare.png``
into ``--out``; ``--replot`` redoes the last two from the first. ``--smoke`` is the CI version:
tiny data, ringfeed alone. ``--policy`` runs the DeiT-style pipeline instead (RandAugment,
random erasing, mixup/CutMix with label smoothing; ``benches/compare/policy.toml``), against
the plain pipeline's ringfeed in the same run. See benches/compare/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import report
import systems
from measure import Timing, Workload
from report import FLOOR, RINGFEED, STAGES, Row

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

Runner = Callable[[Workload], Timing]


@dataclass(frozen=True)
class Plan:
    """What one invocation runs."""

    data: systems.Dataset
    rf: systems.Ringfeed
    runners: dict[str, Runner]
    floor: bool
    reps: int
    modes: list[tuple[str, Workload]]
    cores: int


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared/data/photos-dev",
        help="folder with shards/*.tar and imagefolder/",
    )
    p.add_argument("--config", type=Path, default=ROOT / "configs/imagenet-train.toml")
    p.add_argument("--reps", type=int, default=3, help="repetitions (median reported)")
    p.add_argument("--epochs", type=int, default=4, help="timed epochs per run")
    p.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs per run")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--simulate-step-ms",
        type=float,
        default=50.0,
        help="trainer mode's busy-wait per batch; 0 skips the trainer mode",
    )
    p.add_argument(
        "--step-kind",
        choices=["busy", "sleep"],
        default="busy",
        help="trainer step: busy-wait (occupies a core) or sleep (a trainer waiting on its GPU)",
    )
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=["ringfeed", "dataloader", "dali", "floor"],
        help="systems to run",
    )
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument(
        "--replot",
        action="store_true",
        help="redo summary.md and the chart from --out's compare.csv and environment.json",
    )
    p.add_argument(
        "--policy",
        action="store_true",
        help="the DeiT-style policy pipeline (policy.toml; DataLoader: torchvision v2 "
        "RandAugment + RandomErasing, MixUp/CutMix in the loop), plus ringfeed's plain "
        "pipeline in the same run for RandAugment's cost",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CI smoke: data/sample, batch 32, ringfeed alone, one short repetition",
    )
    args = p.parse_args(argv)
    if args.policy and args.config == ROOT / "configs/imagenet-train.toml":
        args.config = HERE / "policy.toml"
    if args.smoke:
        args.data, args.batch_size, args.reps = ROOT / "data/sample", 32, 1
        args.epochs, args.simulate_step_ms, args.only = 2, 5.0, ["ringfeed"]
    if args.reps < 1 or args.epochs < 1 or args.warmup_epochs < 0:
        p.error("--reps and --epochs must be ≥ 1, --warmup-epochs ≥ 0")
    return args


def find_dataset(folder: Path, batch_size: int) -> systems.Dataset:
    """The shards under ``folder`` (``shards/*.tar`` or ``*.tar``) and its ImageFolder tree."""
    shards = sorted((folder / "shards").glob("*.tar")) or sorted(folder.glob("*.tar"))
    if not shards:
        raise SystemExit(f"compare: no tar shards under {folder}")
    tree = folder / "imagefolder"
    images = count_shard_images(shards)
    if tree.is_dir():
        in_tree = sum(1 for _ in tree.glob("*/*.jpg"))
        if in_tree != images:
            raise SystemExit(f"compare: {tree} holds {in_tree} JPEGs, the shards {images}")
    if images < batch_size:
        raise SystemExit(f"compare: {images} images do not fill one batch of {batch_size}")
    return systems.Dataset(tuple(shards), tree if tree.is_dir() else None, images, batch_size)


def count_shard_images(shards: list[Path]) -> int:
    """JPEG members in the shards."""
    import tarfile

    count = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            count += sum(1 for m in tar if m.isfile() and m.name.endswith(".jpg"))
    return count


def ringfeed_binary(smoke: bool) -> Path:
    """``$RINGFEED_BIN``, else the release build (the debug build for a smoke run without one)."""
    if "RINGFEED_BIN" in os.environ:
        return Path(os.environ["RINGFEED_BIN"]).resolve()
    release = ROOT / "target/release/ringfeed"
    if release.exists() or not smoke:
        return release
    return ROOT / "target/debug/ringfeed"


def build_plan(args: argparse.Namespace, versions: dict[str, str]) -> Plan:
    """Chooses the runners; a peer that cannot run here is left out with the reason printed."""
    cores = os.cpu_count() or 1
    data = find_dataset(args.data, args.batch_size)
    rf = systems.Ringfeed(ringfeed_binary(args.smoke), args.config.resolve(), ROOT)
    if not rf.binary.exists():
        raise SystemExit(f"compare: {rf.binary} missing: cargo build --release (or RINGFEED_BIN)")
    only = set(args.only or ["ringfeed", "dataloader", "dali", "floor"])
    runners: dict[str, Runner] = {}
    policy = args.policy
    if "ringfeed" in only:
        runners[RINGFEED] = lambda w: systems.run_ringfeed(rf, data, w, cores, policy=policy)
        if policy:
            plain = systems.Ringfeed(rf.binary, ROOT / "configs/imagenet-train.toml", ROOT)
            runners[systems.RINGFEED_PLAIN] = lambda w: systems.run_ringfeed(plain, data, w, cores)
    if "dataloader" in only and available("PyTorch", systems.torch_versions, versions):
        for workers in sorted({1, cores}):
            runners[f"dataloader, {workers} worker{'s' * (workers > 1)}"] = lambda w, n=workers: (
                systems.run_dataloader(data, w, n, seed=0, policy=policy)
            )
    if "dali" in only and available("DALI", systems.dali_version, versions):
        runners[f"DALI CPU, {cores} threads"] = lambda w: systems.run_dali(
            data, w, cores, seed=0, policy=policy
        )
    modes = [("throughput", Workload(args.warmup_epochs, args.epochs, data.batches_per_epoch))]
    if args.simulate_step_ms > 0:
        step = Workload(
            args.warmup_epochs,
            args.epochs,
            data.batches_per_epoch,
            step_s=args.simulate_step_ms / 1000,
            step_busy=args.step_kind == "busy",
        )
        modes.append(
            (f"trainer, {args.simulate_step_ms:g} ms {args.step_kind} step per batch", step)
        )
    return Plan(data, rf, runners, "floor" in only, args.reps, modes, cores)


def available(what: str, probe: Callable[[], dict[str, str]], versions: dict[str, str]) -> bool:
    """Runs ``probe`` and records the versions it returns; prints why ``what`` is skipped
    when it raises :class:`systems.UnavailableError`."""
    try:
        versions.update(probe())
    except systems.UnavailableError as why:
        print(f"compare: skipping {what}: {why}", flush=True)
        versions[what] = f"not run: {why}"
        return False
    return True


def run_all(plan: Plan) -> list[Row]:
    """Every mode, ``reps`` rounds, the systems interleaved within each round."""
    rows: list[Row] = []
    for mode, work in plan.modes:
        short = mode.split(",")[0]
        for rep in range(plan.reps):
            for system, runner in plan.runners.items():
                t = runner(work)
                rows.append(
                    Row(
                        mode,
                        rep,
                        system,
                        t.images,
                        t.seconds,
                        t.images_per_s,
                        t.wait_share,
                        t.startup_s,
                        t.cpu_ms_per_image,
                    )
                )
                print(
                    f"  {short:10} rep {rep}  {system:24} {t.images_per_s:8.0f} images/s  "
                    f"waited {t.wait_share * 100:3.0f} %  ({t.images} images in "
                    f"{t.seconds:.2f} s, {t.cpu_ms_per_image:.2f} CPU ms/image, "
                    f"start-up {t.startup_s:.2f} s)",
                    flush=True,
                )
            if plan.floor and mode == "throughput":
                rows += floor_rows(plan, rep)
    return rows


def floor_rows(plan: Plan, rep: int) -> list[Row]:
    """The decode floor (full decode on one core × cores) for the comparison, and
    ``ringfeed bench``'s per-stage figures (mode ``STAGES``) to explain where time goes."""
    stages = systems.bench_stages(plan.rf, plan.data, plan.cores)
    floor = stages[systems.FULL_DECODE] * plan.cores
    floor_cpu_ms = 1000 / stages[systems.FULL_DECODE_CPU]
    print(
        f"  {'throughput':10} rep {rep}  {FLOOR:24} {floor:8.0f} images/s  "
        f"(libjpeg-turbo full decode, one core × {plan.cores}); ringfeed bench: "
        + ", ".join(f"{name} {rate:.0f}" for name, rate in stages.items()),
        flush=True,
    )
    rows = [Row("throughput", rep, FLOOR, 0, 0.0, floor, 0.0, 0.0, floor_cpu_ms)]
    rows += [Row(STAGES, rep, name, 0, 0.0, rate, 0.0, 0.0, 0.0) for name, rate in stages.items()]
    return rows


def environment(plan: Plan, versions: dict[str, str]) -> dict[str, str]:
    """Date, machine and versions, for the summary and the chart's title."""
    import numpy

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    rf_version = subprocess.run(
        [str(plan.rf.binary), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": str(plan.cores),
        "cpu": cpu,
        "load average at the end": _read("/proc/loadavg").split(" ")[0],
        "ringfeed": f"{rf_version} ({commit})",
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        **versions,
        "images": f"{plan.data.images} JPEGs, {plan.data.batches_per_epoch} batches of "
        f"{plan.data.batch_size} per epoch",
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def check_targets(summaries: list[report.Summary], cores: int) -> list[str]:
    """The issue's targets (≥ 3× DataLoader and ≥ 2× DALI with one worker or thread per core,
    ≥ 80 % of the decode floor; with ``--policy`` also ≥ 0.75× ringfeed's plain pipeline), met
    or missed, from the throughput medians; the floor also by CPU time per image, which a
    machine shared with other jobs does not skew."""
    group = {s.system: s for s in summaries if s.mode == "throughput"}
    ours = group.get(RINGFEED)
    targets = {
        f"dataloader, {cores} worker{'s' * (cores > 1)}": 3.0,
        f"DALI CPU, {cores} threads": 2.0,
        FLOOR: 0.8,
    }
    lines = []
    plain = group.get(systems.RINGFEED_PLAIN)
    if ours is not None and plain is not None and plain.images_per_s > 0:
        got = ours.images_per_s / plain.images_per_s
        lines.append(
            f"target ringfeed policy ≥ 0.75× {systems.RINGFEED_PLAIN} (RandAugment costing "
            f"≤ 25 % of its throughput): {got:.2f}× — {_verdict(got, 0.75)}"
        )
    for name, wanted in targets.items():
        peer = group.get(name)
        if ours is None or peer is None or peer.images_per_s <= 0:
            continue
        got = ours.images_per_s / peer.images_per_s
        if name != FLOOR:
            lines.append(
                f"target ringfeed ≥ {wanted:g}× {name}: {got:.2f}× — {_verdict(got, wanted)}"
            )
            continue
        lines.append(
            f"target ringfeed ≥ {wanted:.0%} of the {name}: {got:.0%} — {_verdict(got, wanted)}"
        )
        if ours.cpu_ms_per_image > 0 and peer.cpu_ms_per_image > 0:
            by_cpu = peer.cpu_ms_per_image / ours.cpu_ms_per_image
            lines.append(
                f"  same by CPU time per image (full decode {peer.cpu_ms_per_image:.2f} ms, "
                f"ringfeed {ours.cpu_ms_per_image:.2f} ms): {by_cpu:.0%} — "
                + _verdict(by_cpu, wanted)
            )
    return lines


def _verdict(got: float, wanted: float) -> str:
    return "met" if got >= wanted else "MISSED"


def write_outputs(rows: list[Row], env: dict[str, str], out: Path) -> list[report.Summary]:
    """CSV, summary.md and the chart; prints the summary."""
    out.mkdir(parents=True, exist_ok=True)
    summaries = report.summarise(rows)
    report.write_csv(rows, out / "compare.csv")
    modes = list(dict.fromkeys(s.mode for s in summaries))
    text = [report.table(summaries), ""]
    for mode in modes:
        ratios = report.ratio_lines(summaries, mode)
        if ratios:
            text.append(f"{mode}: " + "; ".join(ratios))
    text += check_targets(summaries, int(env["cores"]))
    text += ["", "```", json.dumps(env, indent=1), "```"]
    (out / "summary.md").write_text("\n".join(text) + "\n")
    (out / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
    print("\n" + "\n".join(text), flush=True)
    title = (
        f"{env['date']}, {env['cores']} cores ({env['cpu']}, load average "
        f"{env['load average at the end']}), {env['images']}; medians of interleaved runs"
    )
    try:
        report.chart(summaries, title, out / "compare.png")
    except ImportError as err:
        print(f"compare: no chart ({err}); run setup.sh for matplotlib", flush=True)
    return summaries


def main(argv: list[str]) -> int:
    """Runs the comparison; exit status 0 when every chosen system ran."""
    args = parse_args(argv)
    if args.replot:
        env = json.loads((args.out / "environment.json").read_text())
        write_outputs(report.read_csv(args.out / "compare.csv"), env, args.out)
        return 0
    versions: dict[str, str] = {}
    plan = build_plan(args, versions)
    print(
        f"compare: {plan.data.images} images, batch {plan.data.batch_size}, "
        f"{plan.data.batches_per_epoch} full batches per epoch, {args.warmup_epochs} warm-up + "
        f"{args.epochs} timed epochs per run, {plan.reps} repetitions, {plan.cores} cores; "
        f"systems: {', '.join([*plan.runners, *([FLOOR] if plan.floor else [])])}",
        flush=True,
    )
    rows = run_all(plan)
    env = environment(plan, versions)
    out = Path(tempfile.mkdtemp(prefix="ringfeed-compare-")) if args.smoke else args.out
    write_outputs(rows, env, out)
    expected = args.epochs * plan.data.batches_per_epoch * plan.data.batch_size
    short = [r for r in rows if r.images != expected and r.system != FLOOR and r.mode != STAGES]
    if short:
        print(f"compare: runs delivered the wrong number of images: {short}", file=sys.stderr)
        return 1
    if args.smoke:
        shutil.rmtree(out)
    print(f"compare: done; results in {out}" if not args.smoke else "compare: smoke OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
