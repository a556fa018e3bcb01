#!/usr/bin/env python3
"""Soak test: the ImageNet-train preset served for many epochs to a consumer that takes and
releases batches at a random pace (holding several at times), with per-epoch figures.

For every epoch it reports the daemon's images/s: the samples it produced while the epoch was
being consumed (the ring's `samples_ok` counter), so the consumer's pace and prefilled slots do
not blur it, with the share of the epoch it spent waiting for a free slot beside it. It also
reports the daemon's CPU time per image, its resident memory (VmRSS, and RssAnon: RSS without
the ring's shared pages), the machine's steal time (CPU the hypervisor gave to other guests),
and checks from the sample ids that no sample of the epoch was lost or served twice.

Every epoch is served in segments of about two seconds (`--baseline-every`). Between two
segments the consumer stops taking batches, the daemon fills its ring and idles, and one
`ringfeed bench --stages-only` per core times the same work at once (decode + augment + write of
300 of the photos, a fraction of a second), their rates summed: the baseline, this machine's own
speed for the daemon's work right then. The daemon's rate counts only what it made during the
segments. On a shared VM the baseline can move by 10-25 % within a minute (other guests' load),
and the daemon's rate moves with it; the baseline's spread says whether a run could judge ±10 %
at all.

At the end it prints PASS/FAIL/INCONCLUSIVE against:

* memory flat: RSS at most 5 % above its value after epoch 2, and RssAnon growing less than
  1 MiB over the second half of the run (a leak grows steadily; allocator warm-up does not);
* throughput flat: the daemon's images/s in every epoch from the 3rd within ±10 % of those
  epochs' median. When it is not, and the epochs' baselines spread by more than ±10 % too, the
  run is INCONCLUSIVE rather than FAIL (the machine moved too), unless the daemon moved by more
  than the machine's spread plus 10 points, which is a FAIL whatever the machine did. The trend,
  CPU time per image, and the daemon's rate relative to its baseline are printed beside it;
* zero lost and zero duplicated samples in every epoch; the daemon exits 0 and leaves in its
  runtime directory only the finished run's marker (`<name>.finished`, ring format §7).

The shards are linked `--repeat` times under distinct names (the sample ids stay distinct), so
that an epoch of the 600 photos lasts about 15 s rather than a third of a second.

Usage (release build first; the photos are ../shared/data/photos-dev, else data/sample):

    cargo build --release
    python3 benches/soak/soak.py --epochs 20

`--smoke` (CI) runs 3 short epochs of data/sample and judges all but the throughput; `--bin`
picks the binary. Exit status 0 when every target is met, 1 when one is missed, 2 when the run
was inconclusive.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "clients" / "python" / "src"))

import ringfeed  # the repository's client, not an installed one

PHOTOS = ROOT.parent / "shared" / "data" / "photos-dev" / "shards"
SAMPLE = ROOT / "data" / "sample"
RING = "soak"
TOLERANCE_PCT = 10.0  # the throughput target: every epoch within ±10 % of the median
INCONCLUSIVE = "INCONCLUSIVE"


def default_shards() -> tuple[list[str], str]:
    """The photos-dev shards if present, else the bundled sample."""
    for folder, what in ((PHOTOS, "photos-dev (600 photos)"), (SAMPLE, "data/sample (96 photos)")):
        shards = sorted(str(p) for p in folder.glob("*.tar"))
        if shards:
            return shards, what
    sys.exit(f"no shards in {PHOTOS} or {SAMPLE}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def steal_and_total_ticks() -> tuple[int, int]:
    """(steal, all) CPU ticks of the machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return ticks[7], sum(ticks[:8])


def baseline(binary: str, shards: list[str], samples: int, batch_size: int) -> float:
    """The machine's current capacity for the daemon's own work: the summed decode + augment +
    write rates (images/s) of one `ringfeed bench --stages-only` per core, run at once on the
    first `samples` photos (so other jobs taking a core show up, as they do for the daemon)."""
    command = [
        binary, "bench", "--config", str(ROOT / "configs" / "imagenet-train.toml"), "--shards", *shards,
        "--samples", str(samples), "--repeats", "1", "--workers", "1", "--stages-only",
        "--batch-size", str(batch_size),
    ]  # fmt: skip
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(os.cpu_count() or 1)]
    total = 0.0
    for run in runs:
        out, _ = run.communicate()
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited with {run.returncode}")
        row = next(line for line in out.splitlines() if line.startswith("| decode + augment + write"))
        total += float(row.split("|")[2])
    return total


def wait_idle(pid: int, timeout_s: float = 5.0) -> None:
    """Waits until the daemon uses (almost) no CPU: its ring is full and it waits for slots."""
    deadline = time.perf_counter() + timeout_s
    last = cpu_seconds(pid)
    while time.perf_counter() < deadline:
        time.sleep(0.1)
        now = cpu_seconds(pid)
        if now - last < 0.005:
            return
        last = now


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a process, in KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["RssAnon"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="samples per batch (default 100: divides the 600 photos, so every sample is served each epoch)",
    )
    ap.add_argument("--workers", type=int, default=0, help="daemon worker threads (0 = one per core)")
    ap.add_argument("--slots", type=int, default=4, help="slots per lane")
    ap.add_argument("--pace-ms", type=float, default=5.0, help="mean pause of the consumer per batch")
    ap.add_argument("--seed", type=int, default=0, help="seed of the consumer's random pace")
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "ringfeed"))
    ap.add_argument("--shards", nargs="*", help="tar shards (default: photos-dev, else data/sample)")
    ap.add_argument("--repeat", type=int, default=40, help="serve each shard this many times per epoch")
    ap.add_argument("--baseline-samples", type=int, default=300, help="photos timed by each baseline run")
    ap.add_argument(
        "--baseline-every",
        type=float,
        default=2.0,
        help="seconds of an epoch between two baseline pauses (0: one pause before each epoch only)",
    )
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CI smoke: 3 short epochs of data/sample, throughput reported but not judged",
    )
    args = ap.parse_args()
    if args.smoke:
        args.epochs, args.repeat, args.batch_size, args.baseline_samples = 3, 1, 16, 16
        args.shards = sorted(str(p) for p in SAMPLE.glob("*.tar"))
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"{args.bin} not found: run `cargo build --release` first")
    shards, data_name = (args.shards, f"{len(args.shards)} given shards") if args.shards else default_shards()
    photos = list(shards)
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="ringfeed-soak-"))
    runtime = work / "run"
    (work / "shards").mkdir()
    linked = []
    for r in range(args.repeat):
        for shard in shards:
            link = work / "shards" / f"r{r}-{Path(shard).name}"
            link.symlink_to(Path(shard).resolve())
            linked.append(str(link))
    shards = linked
    env = dict(os.environ, RINGFEED_RUNTIME_DIR=str(runtime))
    log_path = runtime.parent / "serve.log"
    cmd = [
        args.bin, "serve", "--config", str(ROOT / "configs" / "imagenet-train.toml"),
        "--name", RING, "--shards", *shards, "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--slots-per-lane", str(args.slots),
        "--workers", str(args.workers), "--status-interval", "5", "--exit-when-done",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    try:
        loader = ringfeed.Loader(
            RING, 0, release_previous=False, max_held=args.slots - 1,
            wait_for_producer=300, timeout=120, runtime_dir=runtime,
        )  # fmt: skip
        layout = loader._ring.layout  # figures for the report only
        per_epoch_batches = len(loader)
        expected = per_epoch_batches * args.batch_size
        print(
            f"soak: {data_name}, {layout.samples_per_epoch} samples, batch {args.batch_size}, "
            f"{per_epoch_batches} batches ({expected} samples) per epoch, {args.epochs} epochs, "
            f"{args.slots} slots, consumer pace ~{args.pace_ms} ms/batch (seed {args.seed})"
        )
        rows = []
        def snapshot() -> dict[str, float]:
            counters = loader._ring.counters()
            steal, ticks = steal_and_total_ticks()
            return {
                "time": time.perf_counter(), "cpu": cpu_seconds(daemon.pid), "steal": steal, "ticks": ticks,
                "made": counters["samples_ok"], "blocked": counters["producer_wait_ns"] / 1e9,
            }  # fmt: skip

        def add_since(total: dict[str, float], since: dict[str, float]) -> None:
            """Adds to `total` how far each figure moved since the snapshot `since`."""
            now = snapshot()
            for k in total:
                total[k] += now[k] - since[k]

        speeds: list[list[float]] = []  # per epoch: the baselines taken in its pauses

        def pause(into: list[float]) -> None:
            """Stops taking batches until the daemon has filled its ring and idles, then runs
            the baseline while it does; what the daemon made meanwhile is left out of its rate."""
            wait_idle(daemon.pid)
            into.append(baseline(args.bin, photos, args.baseline_samples, args.batch_size))

        for epoch in range(args.epochs):
            speeds.append([])
            pause(speeds[-1])
            active = dict.fromkeys(("time", "cpu", "steal", "ticks", "made", "blocked"), 0.0)
            last = snapshot()

            ids: list[int] = []
            held: list = []
            batches = redelivered = 0
            for batch in loader:
                batches += 1
                redelivered += int(batch.redelivered)
                ids.extend(int(i) for i in batch.sample_ids)
                held.append(batch)
                # Release a random choice of the held batches, keeping 0..max_held-1 of them.
                keep = rng.randint(0, args.slots - 2)
                while len(held) > keep:
                    held.pop(rng.randrange(len(held))).release()
                pause_ms = rng.expovariate(1.0 / args.pace_ms) if args.pace_ms > 0 else 0.0
                if rng.random() < 0.03:
                    pause_ms += rng.uniform(20, 100)  # now and then a long step
                time.sleep(pause_ms / 1000)
                if args.baseline_every > 0 and time.perf_counter() - last["time"] >= args.baseline_every:
                    add_since(active, last)
                    pause(speeds[-1])
                    last = snapshot()
            for b in held:
                b.release()
            add_since(active, last)
            made, seconds = active["made"], active["time"]
            rss, anon = memory_kib(daemon.pid)
            distinct = len(set(ids))
            row = {
                "epoch": epoch + 1,
                "batches": batches,
                "daemon_images_per_s": made / seconds,
                "unblocked_images_per_s": made / max(seconds - active["blocked"], 1e-9),
                "blocked_pct": 100 * active["blocked"] / seconds,
                "baselines_in_epoch": len(speeds[-1]),
                "steal_pct": 100 * active["steal"] / max(active["ticks"], 1),
                "cpu_ms_per_image": active["cpu"] * 1000 / max(made, 1),
                "load_1min": os.getloadavg()[0],
                "rss_mib": rss / 1024,
                "rss_anon_mib": anon / 1024,
                "lost": expected - distinct,
                "duplicated": len(ids) - distinct,
                "out_of_range": sum(1 for i in ids if not 0 <= i < layout.samples_per_epoch),
                "redelivered": redelivered,
            }
            rows.append(row)
            print(
                f"epoch {row['epoch']:3d}: daemon {row['daemon_images_per_s']:6.0f} img/s  "
                f"unblocked {row['unblocked_images_per_s']:6.0f} img/s (blocked {row['blocked_pct']:4.1f} %)  "
                f"baselines {row['baselines_in_epoch']:2d}  steal {row['steal_pct']:4.1f} %  "
                f"{row['cpu_ms_per_image']:5.2f} CPU-ms/img  RSS {row['rss_mib']:6.1f} MiB "
                f"(anon {row['rss_anon_mib']:5.1f})  load {row['load_1min']:4.1f}  "
                f"batches {batches}  lost {row['lost']}  duplicated {row['duplicated']}",
                flush=True,
            )
        extra = sum(1 for _ in loader)  # the stream must be over
        loader.close()
        wait_idle(daemon.pid)
        speeds.append([baseline(args.bin, photos, args.baseline_samples, args.batch_size)])
        # Each epoch's baseline: the mean of the runs in its pauses and the one just after it.
        for r, during, after in zip(rows, speeds, speeds[1:]):
            r["baseline_images_per_s"] = statistics.fmean([*during, after[0]])
            r["relative_speed"] = r["daemon_images_per_s"] / r["baseline_images_per_s"]
        code = daemon.wait(timeout=120)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    # A finished run leaves exactly its marker (ring format §7): no socket, no lock file.
    marker = runtime / f"{RING}.finished"
    leftovers = sorted(p.name for p in runtime.iterdir() if p != marker) if runtime.exists() else []

    checks = []
    base = rows[1] if len(rows) >= 2 else rows[0]
    later = rows[1:] or rows
    top = max(r["rss_mib"] for r in later)
    growth = (top / base["rss_mib"] - 1) * 100
    checks.append((f"RSS growth after epoch 2: {growth:+.1f} % (max {top:.1f} MiB vs {base['rss_mib']:.1f})", growth < 5))
    half = rows[len(rows) // 2 :]
    anon_growth = max(r["rss_anon_mib"] for r in half) - half[0]["rss_anon_mib"]
    checks.append(
        ((f"RssAnon over the second half: {half[0]['rss_anon_mib']:.1f} → max "
          f"{max(r['rss_anon_mib'] for r in half):.1f} MiB ({anon_growth:+.2f} MiB)"), anon_growth < 1)
    )  # fmt: skip
    steady_rows = rows[2:] or rows
    worst = {}
    for key, unit, what in (
        ("daemon_images_per_s", "img/s", "daemon throughput"),
        ("relative_speed", "x", "daemon throughput / the baseline around it"),
        ("unblocked_images_per_s", "img/s", "daemon throughput while not waiting for a free slot"),
        ("cpu_ms_per_image", "CPU-ms/img", "daemon CPU per image"),
        ("baseline_images_per_s", "img/s", "the machine's own speed for the same work (baseline)"),
    ):
        steady = [r[key] for r in steady_rows]
        median = statistics.median(steady)
        worst[key] = max(abs(v / median - 1) * 100 for v in steady)
        text = (f"{what} from epoch 3: median {median:.2f} {unit}, min {min(steady):.2f}, "
                f"max {max(steady):.2f}, worst deviation {worst[key]:.1f} %")  # fmt: skip
        checks.append((text, None))
    # The judged line: the daemon's own spread. When the machine's speed for the same work moved
    # more than the tolerance too, this run cannot tell either way, unless the daemon moved by
    # more than the machine did plus the tolerance.
    daemon_worst, machine_worst = worst["daemon_images_per_s"], worst["baseline_images_per_s"]
    if args.smoke:
        verdict = None  # three epochs of a third of a second: too short to judge
    elif daemon_worst <= TOLERANCE_PCT:
        verdict = True
    elif TOLERANCE_PCT < machine_worst and daemon_worst <= machine_worst + TOLERANCE_PCT:
        verdict = INCONCLUSIVE
    else:
        verdict = False
    checks.append(
        ((f"throughput flat: the daemon's images/s within ±{TOLERANCE_PCT:.0f} % of the median in every epoch "
          f"from the 3rd: worst {daemon_worst:.1f} % (the machine's own speed for the same work: worst "
          f"{machine_worst:.1f} %)"), verdict),
    )  # fmt: skip
    rates = [r["daemon_images_per_s"] for r in steady_rows]
    if len(rates) >= 4:
        epochs = [r["epoch"] for r in steady_rows]
        slope = statistics.linear_regression(epochs, rates).slope / statistics.median(rates) * 100
        half = len(rates) // 2
        halves = statistics.median(rates[half:]) / statistics.median(rates[:half]) * 100 - 100
        with_baseline = statistics.correlation(rates, [r["baseline_images_per_s"] for r in steady_rows])
        with_cpu = statistics.correlation(rates, [1 / r["cpu_ms_per_image"] for r in steady_rows])
        checks.append(
            ((f"trend of the daemon's images/s from epoch 3: {slope:+.2f} % per epoch, second half's median "
              f"{halves:+.1f} % against the first's; correlation with the baseline {with_baseline:+.2f}, "
              f"with 1 / CPU time per image {with_cpu:+.2f}"), None)
        )  # fmt: skip
    steal = [r["steal_pct"] for r in steady_rows]
    checks.append((f"steal time from epoch 3: {min(steal):.1f}–{max(steal):.1f} % of the machine's CPU", None))
    lost = sum(r["lost"] for r in rows)
    dup = sum(r["duplicated"] for r in rows)
    bad = sum(r["out_of_range"] + r["redelivered"] for r in rows)
    full = all(r["batches"] == per_epoch_batches for r in rows)
    checks.append((f"samples: {lost} lost, {dup} duplicated, {bad} out of range/redelivered, every epoch complete: {full}",
                   lost == 0 and dup == 0 and bad == 0 and full))  # fmt: skip
    checks.append((f"daemon exit {code}, batches after the last epoch {extra}, runtime dir left: {leftovers}, finished marker: {marker.exists()}",
                   code == 0 and extra == 0 and not leftovers and marker.exists()))  # fmt: skip
    labels = {None: "INFO", True: "PASS", False: "FAIL", INCONCLUSIVE: INCONCLUSIVE}
    for text, ok in checks:
        print(f"{labels[ok]}  {text}")
    outcome = (
        "FAIL" if any(ok is False for _, ok in checks)
        else INCONCLUSIVE if any(ok == INCONCLUSIVE for _, ok in checks)
        else "PASS"
    )  # fmt: skip
    if outcome == INCONCLUSIVE:
        outcome += (f" (the machine's own speed for the same work moved {machine_worst:.1f} %, more than the "
                    f"±{TOLERANCE_PCT:.0f} % the daemon is held to: rerun when it is steadier)")  # fmt: skip
    print("soak:", outcome, f"(daemon log: {log_path})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "checks": checks, "outcome": outcome}, indent=1))
    return {"P": 0, "F": 1}.get(outcome[0], 2)

if __name__ == "__main__":
    sys.exit(main())
