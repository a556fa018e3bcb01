//! `ringfeed stat`: a running ring's state and counters, read straight from its shared memory
//! through a read-only [`Observer`], plus what the daemon learnt from reported losses (one
//! `evaluation` request per refresh; absent when the daemon cannot be asked).
//!
//! # Brief overview
//!
//! A loop takes a [`RingSnapshot`] each second into a 60 s history; [`report`] turns the
//! history into a [`StatReport`] (a plain function, tested without a ring), which is printed
//! as text ([`render_text`]) or one JSON object per refresh.

use std::collections::VecDeque;
use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use ringfeed::ring::{
    mono_ns, query_evaluation, query_info, Layout, Observer, ProducerState, RingSnapshot,
    RuntimeDir,
};
use serde::Serialize;

use super::status::{share, stalls, verdict};

/// Flags of `ringfeed stat`.
#[derive(Debug, Args)]
pub(crate) struct StatArgs {
    /// Ring name; without one, lists the rings running in the runtime directory.
    name: Option<String>,
    /// Print one report (the counters are sampled twice, 1 s apart, for the rates) and exit.
    #[arg(long)]
    once: bool,
    /// Print JSON: one object per refresh, one per line.
    #[arg(long)]
    json: bool,
}

/// How long the history (and the long rate window) reaches back.
const LONG_WINDOW: Duration = Duration::from_secs(60);
/// The short rate window, and the refresh interval.
const SHORT_WINDOW: Duration = Duration::from_secs(1);

/// Opens the ring and prints reports until interrupted or the producer goes away.
pub(crate) fn run(args: StatArgs) -> anyhow::Result<ExitCode> {
    let dir = RuntimeDir::from_env()?;
    let Some(name) = args.name.clone() else {
        return list_rings(&dir, args.json);
    };
    let args = NamedStat {
        name,
        once: args.once,
        json: args.json,
    };
    let observer = Observer::open(&dir, &args.name)?;
    let stop = Arc::new(AtomicBool::new(false));
    if !args.once {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .context("cannot install the SIGINT/SIGTERM handler")?;
    }
    let clear = !args.json && !args.once && std::io::stdout().is_terminal();
    let mut history: VecDeque<RingSnapshot> = VecDeque::new();
    history.push_back(observer.snapshot());
    loop {
        std::thread::sleep(SHORT_WINDOW);
        let snap = observer.snapshot();
        while history.front().is_some_and(|s| {
            snap.taken_mono_ns.saturating_sub(s.taken_mono_ns)
                > (LONG_WINDOW + SHORT_WINDOW).as_nanos() as u64
        }) {
            history.pop_front();
        }
        history.push_back(snap);
        let mut rep = report(
            observer.layout(),
            observer.producer_pid(),
            history.make_contiguous(),
            unix_now_ns(),
        );
        // Per-stream counts live in the producer, not the ring: ask it (best effort).
        if let Ok(info) = query_info(&dir, &args.name, SHORT_WINDOW) {
            rep.streams = streams_of(&info);
            rep.daemon_rings = info
                .get("daemon_rings")
                .cloned()
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default();
        }
        rep.feedback = query_evaluation(&dir, &args.name).ok().map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("ok");
            }
            v
        });
        let text = if args.json {
            serde_json::to_string(&rep)?
        } else {
            render_text(&rep)
        };
        let mut out = std::io::stdout().lock();
        if clear {
            // Home and clear the screen: refresh in place.
            write!(out, "\x1b[H\x1b[J")?;
        }
        writeln!(out, "{text}")?;
        out.flush()?;
        drop(out);
        if args.once || stop.load(Ordering::Relaxed) {
            return Ok(ExitCode::SUCCESS);
        }
        if !observer.producer_alive() {
            eprintln!("ringfeed: the producer of ring '{}' has gone", args.name);
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// `stat` of one named ring.
struct NamedStat {
    name: String,
    once: bool,
    json: bool,
}

/// `ringfeed stat` without a name: the running rings, one per line (`--json`: one array).
fn list_rings(dir: &RuntimeDir, json: bool) -> anyhow::Result<ExitCode> {
    let rings: Vec<serde_json::Value> = dir
        .running_rings()
        .into_iter()
        .map(|(name, pid)| {
            let info = query_info(dir, &name, SHORT_WINDOW).ok();
            let num = |key: &str| {
                info.as_ref()
                    .and_then(|i| i.get(key))
                    .and_then(|v| v.as_u64())
            };
            serde_json::json!({"name": name, "producer_pid": pid,
                "lanes": num("lane_count"), "world_size": num("world_size"),
                "first_rank": num("first_rank")})
        })
        .collect();
    if json {
        println!("{}", serde_json::Value::Array(rings));
        return Ok(ExitCode::SUCCESS);
    }
    if rings.is_empty() {
        println!(
            "no ring is running in {} (start one with `ringfeed serve --name NAME`)",
            dir.path().display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("rings running in {}:", dir.path().display());
    for r in &rings {
        let lanes = r["lanes"]
            .as_u64()
            .map_or("?".to_owned(), |n| n.to_string());
        let world = match r["world_size"].as_u64() {
            Some(w) if w > 0 => format!(", world size {w}"),
            _ => String::new(),
        };
        println!(
            "  {}  (producer pid {}, {lanes} lane(s){world})  → ringfeed stat {}",
            r["name"].as_str().unwrap_or(""),
            r["producer_pid"],
            r["name"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Throughput over one window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Rate {
    /// Seconds actually covered (the history may be shorter than the window asked for).
    pub(crate) span_s: f64,
    /// Samples written per second.
    pub(crate) images_per_s: f64,
    /// Batches published per second (all lanes).
    pub(crate) batches_per_s: f64,
}

/// Throughput over the short and the long window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Rates {
    /// Over about the last second.
    #[serde(rename = "1s")]
    pub(crate) short: Option<Rate>,
    /// Over up to the last minute.
    #[serde(rename = "60s")]
    pub(crate) long: Option<Rate>,
}

/// One lane's line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct LaneReport {
    /// Lane number.
    pub(crate) lane: u32,
    /// Global rank the lane serves (`null`: a producer before format 1.3 does not say).
    pub(crate) rank: Option<u32>,
    /// Epoch of the last published batch (`null` before the first).
    pub(crate) epoch: Option<u64>,
    /// Index of the last published batch within its epoch.
    pub(crate) index: Option<u64>,
    /// Share of the epoch published, 0–1 (`null` when batches_per_epoch is unknown).
    pub(crate) epoch_progress: Option<f64>,
    /// Slots `READY` and not held.
    pub(crate) ready: u32,
    /// Slots held by the consumer (`READY`, taken, not released).
    pub(crate) held: u32,
    /// Slots `FREE`.
    pub(crate) free: u32,
    /// Slots `WRITING`.
    pub(crate) writing: u32,
    /// (ready + held) / slots: how full the lane is.
    pub(crate) occupancy: f64,
    /// Attached consumer, 0 if none.
    pub(crate) consumer_pid: u32,
    /// Percent of the last second its consumer waited for data.
    pub(crate) consumer_wait_pct: Option<f64>,
    /// Percent of the last second the producer waited for a free slot of this lane.
    pub(crate) producer_wait_pct: Option<f64>,
    /// Batches published.
    pub(crate) published: u64,
    /// Batches released.
    pub(crate) released: u64,
    /// Seeks applied.
    pub(crate) stream: u32,
    /// Seconds the consumer of this full lane has neither taken nor released a batch, once
    /// that is past the stall threshold (`null`: not stalled). See docs/failure-modes.md.
    pub(crate) stalled_s: Option<f64>,
}

/// One attached consumer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ConsumerReport {
    /// Its pid.
    pub(crate) pid: u32,
    /// Its lane.
    pub(crate) lane: u32,
    /// Seconds since it attached.
    pub(crate) attached_s: f64,
    /// Seconds since its last `next`/`release` (a stalled trainer shows here).
    pub(crate) heartbeat_age_s: f64,
    /// Batches taken since attach.
    pub(crate) taken: u64,
}

/// Everything `stat` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct StatReport {
    /// Ring name.
    pub(crate) name: String,
    /// Producer generation.
    pub(crate) generation: u64,
    /// Producer pid.
    pub(crate) producer_pid: u32,
    /// Producer state (`starting`, `serving`, `finished`, `stopped`, `failed`, `unknown`).
    pub(crate) state: &'static str,
    /// Seconds since the producer started.
    pub(crate) uptime_s: f64,
    /// Age of the producer's heartbeat in seconds (above 3 s: frozen).
    pub(crate) heartbeat_age_s: f64,
    /// Lanes.
    pub(crate) lanes: u32,
    /// Ranks in the whole job (`null`: a producer before format 1.3 does not say).
    pub(crate) world_size: Option<u32>,
    /// Slots per lane.
    pub(crate) slots_per_lane: u32,
    /// Samples per batch.
    pub(crate) batch_size: u32,
    /// Batches per epoch per lane (0 = unknown).
    pub(crate) batches_per_epoch: u64,
    /// Epochs to serve (0 = unbounded).
    pub(crate) epochs: u64,
    /// Dataset size.
    pub(crate) samples_per_epoch: u64,
    /// Samples written.
    pub(crate) samples_ok: u64,
    /// Samples skipped.
    pub(crate) samples_skipped: u64,
    /// Batches published, all lanes.
    pub(crate) batches_published: u64,
    /// The last skip or failure reason.
    pub(crate) last_error: String,
    /// Throughput.
    pub(crate) rates: Rates,
    /// Percent of the last second the producer waited for free slots.
    pub(crate) producer_wait_pct: Option<f64>,
    /// Who waits for whom.
    pub(crate) verdict: String,
    /// Per lane.
    pub(crate) lane_stats: Vec<LaneReport>,
    /// Attached consumers.
    pub(crate) consumers: Vec<ConsumerReport>,
    /// What the daemon learnt from reported losses (its `evaluation` reply; `null` when it
    /// could not be asked).
    pub(crate) feedback: Option<serde_json::Value>,
    /// The streams of a mixture (`[[source.streams]]`), from the producer's info reply.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) streams: Vec<StreamReport>,
    /// An on-demand (evaluation) ring: lanes produce passes when their consumer asks.
    pub(crate) on_demand: bool,
    /// Every ring of the producer's daemon when it serves several (`serve --config a --config
    /// b`), from its info reply; empty for a daemon of one ring.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) daemon_rings: Vec<String>,
}

/// One stream of a mixture, as the producer reports it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub(crate) struct StreamReport {
    /// The stream's name.
    pub(crate) name: String,
    /// Its relative weight.
    pub(crate) weight: f64,
    /// Samples it contributes to each epoch.
    pub(crate) samples_per_epoch: u64,
    /// Samples served from it since the producer started.
    pub(crate) served: u64,
}

/// The streams in a producer's info reply (empty when it has none or does not answer).
fn streams_of(info: &serde_json::Value) -> Vec<StreamReport> {
    info.get("streams")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

fn state_name(state: Option<ProducerState>) -> &'static str {
    match state {
        Some(ProducerState::Starting) => "starting",
        Some(ProducerState::Serving) => "serving",
        Some(ProducerState::Finished) => "finished",
        Some(ProducerState::Stopped) => "stopped",
        Some(ProducerState::Failed) => "failed",
        None => "unknown",
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The oldest snapshot no further back than `window` (with a quarter second of slack for the
/// sampling jitter) before the newest, if it is not the newest itself.
fn window_start(history: &[RingSnapshot], window: Duration) -> Option<&RingSnapshot> {
    let last = history.last()?;
    let reach = (window + Duration::from_millis(250)).as_nanos() as u64;
    history[..history.len() - 1]
        .iter()
        .find(|s| last.taken_mono_ns.saturating_sub(s.taken_mono_ns) <= reach)
}

fn rate(history: &[RingSnapshot], window: Duration) -> Option<Rate> {
    let last = history.last()?;
    let first = window_start(history, window)?;
    let span = secs(last.taken_mono_ns.saturating_sub(first.taken_mono_ns)).max(1e-9);
    Some(Rate {
        span_s: span,
        images_per_s: last.stats.samples_ok.saturating_sub(first.stats.samples_ok) as f64 / span,
        batches_per_s: last
            .stats
            .batches_published
            .saturating_sub(first.stats.batches_published) as f64
            / span,
    })
}

/// Builds the report from a history of snapshots, oldest first (at least one).
pub(crate) fn report(
    layout: &Layout,
    producer_pid: u32,
    history: &[RingSnapshot],
    unix_now_ns: u64,
) -> StatReport {
    let last = history.last().expect("report needs at least one snapshot");
    let prev = window_start(history, SHORT_WINDOW);
    let elapsed = prev.map(|p| Duration::from_nanos(last.taken_mono_ns - p.taken_mono_ns));
    let pct = |before: u64, after: u64| elapsed.map(|e| share(after.saturating_sub(before), e));
    let producer_wait_pct =
        prev.and_then(|p| pct(p.stats.producer_wait_ns, last.stats.producer_wait_ns));
    let slots = layout.slots_per_lane.max(1);
    let stalls = stalls(last);
    let mut trainer_waits = Vec::new();
    let lane_stats: Vec<LaneReport> = last
        .stats
        .lanes
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let before = prev.and_then(|p| p.stats.lanes.get(i));
            let consumer_wait_pct =
                before.and_then(|b| pct(b.consumer_wait_ns, l.consumer_wait_ns));
            let producer_wait_pct =
                before.and_then(|b| pct(b.producer_wait_ns, l.producer_wait_ns));
            if l.consumer_pid != 0 {
                trainer_waits.extend(consumer_wait_pct);
            }
            let pos = last.positions.get(i).copied().flatten();
            LaneReport {
                lane: l.lane,
                rank: layout.lane_rank(l.lane),
                epoch: pos.map(|p| p.epoch),
                index: pos.map(|p| p.index),
                epoch_progress: pos
                    .filter(|_| layout.batches_per_epoch > 0)
                    .map(|p| (p.index + 1) as f64 / layout.batches_per_epoch as f64),
                ready: l.ready,
                held: l.held,
                free: l.free,
                writing: l.writing,
                occupancy: f64::from(l.ready + l.held) / f64::from(slots),
                consumer_pid: l.consumer_pid,
                consumer_wait_pct,
                producer_wait_pct,
                published: l.published,
                released: l.released,
                stream: l.stream,
                stalled_s: stalls
                    .iter()
                    .find(|s| s.lane == l.lane)
                    .map(|s| s.silent.as_secs_f64()),
            }
        })
        .collect();
    let verdict = match (producer_wait_pct, last.stats.state) {
        (_, Some(ProducerState::Finished)) => "every epoch produced".to_owned(),
        (Some(w), _) => verdict(&trainer_waits, w),
        (None, _) => "measuring".to_owned(),
    };
    StatReport {
        name: layout.name.clone(),
        generation: layout.generation,
        producer_pid,
        state: state_name(last.stats.state),
        uptime_s: secs(unix_now_ns.saturating_sub(last.producer_start_unix_ns)),
        heartbeat_age_s: secs(last.taken_mono_ns.saturating_sub(last.heartbeat_mono_ns)),
        lanes: layout.lane_count,
        world_size: (layout.world_size > 0).then_some(layout.world_size),
        slots_per_lane: layout.slots_per_lane,
        batch_size: layout.batch_size,
        batches_per_epoch: layout.batches_per_epoch,
        epochs: layout.epochs,
        samples_per_epoch: layout.samples_per_epoch,
        samples_ok: last.stats.samples_ok,
        samples_skipped: last.stats.samples_skipped,
        batches_published: last.stats.batches_published,
        last_error: last.last_error.clone(),
        rates: Rates {
            short: rate(history, SHORT_WINDOW),
            long: rate(history, LONG_WINDOW),
        },
        producer_wait_pct,
        verdict,
        lane_stats,
        consumers: last
            .consumers
            .iter()
            .map(|c| ConsumerReport {
                pid: c.pid,
                lane: c.lane,
                attached_s: secs(unix_now_ns.saturating_sub(c.attach_unix_ns)),
                heartbeat_age_s: secs(mono_ns().saturating_sub(c.heartbeat_mono_ns)),
                taken: c.taken,
            })
            .collect(),
        feedback: None,
        streams: Vec::new(),
        on_demand: layout.on_demand(),
        daemon_rings: Vec::new(),
    }
}

fn opt_pct(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.0} %"))
}

fn rate_text(r: &Option<Rate>) -> String {
    match r {
        Some(r) => format!(
            "{:.0} img/s, {:.1} batches/s (over {:.0} s)",
            r.images_per_s, r.batches_per_s, r.span_s
        ),
        None => "–".to_owned(),
    }
}

/// The human-readable report.
pub(crate) fn render_text(r: &StatReport) -> String {
    let mut out = String::new();
    let epochs = if r.epochs == 0 {
        "unbounded".to_owned()
    } else {
        r.epochs.to_string()
    };
    out += &format!(
        "ring '{}'  generation {:016x}  producer pid {}  {}  up {:.0} s  heartbeat {:.1} s ago\n",
        r.name, r.generation, r.producer_pid, r.state, r.uptime_s, r.heartbeat_age_s
    );
    let ranks = match (r.world_size, r.lane_stats.first().and_then(|l| l.rank)) {
        (Some(w), Some(first)) => format!(
            "ranks {} of world size {w}",
            super::serve::rank_range(first, r.lanes)
        ),
        _ => "ranks unknown (producer before format 1.3)".to_owned(),
    };
    if r.on_demand {
        out += &format!(
            "{} lane(s) × {} slots × {} samples; {ranks}; on-demand: {} batches per pass per lane, produced when a consumer asks; {} samples\n",
            r.lanes, r.slots_per_lane, r.batch_size, r.batches_per_epoch, r.samples_per_epoch
        );
    } else {
        out += &format!(
            "{} lane(s) × {} slots × {} samples; {ranks}; {} batches per epoch per lane; epochs {epochs}; {} samples\n",
            r.lanes, r.slots_per_lane, r.batch_size, r.batches_per_epoch, r.samples_per_epoch
        );
    }
    if !r.daemon_rings.is_empty() {
        out += &format!(
            "daemon serves rings: {} (one worker pool)\n",
            r.daemon_rings.join(", ")
        );
    }
    // The long window's rate only once it covers most of the window: `--once` has seen 1 s.
    let long = match &r.rates.long {
        Some(l) if l.span_s < LONG_WINDOW.as_secs_f64() / 2.0 => {
            format!("– (only {:.0} s observed so far)", l.span_s)
        }
        other => rate_text(other),
    };
    out += &format!(
        "throughput  1 s: {}\n            60 s: {long}\n",
        rate_text(&r.rates.short),
    );
    out += &format!(
        "samples ok {}  skipped {}  batches {}  loader waited {}\n",
        r.samples_ok,
        r.samples_skipped,
        r.batches_published,
        opt_pct(r.producer_wait_pct)
    );
    if !r.last_error.is_empty() {
        out += &format!("last error: {}\n", r.last_error);
    }
    for l in &r.lane_stats {
        let pos = match (l.epoch, l.index) {
            (Some(e), Some(i)) if r.batches_per_epoch > 0 => {
                format!("epoch {e} batch {}/{}", i + 1, r.batches_per_epoch)
            }
            (Some(e), Some(i)) => format!("epoch {e} batch {}", i + 1),
            _ => "nothing published yet".to_owned(),
        };
        let consumer = if l.consumer_pid == 0 {
            "no consumer".to_owned()
        } else {
            format!(
                "pid {} waited {}",
                l.consumer_pid,
                opt_pct(l.consumer_wait_pct)
            )
        };
        let consumer = match l.stalled_s {
            Some(s) => format!("{consumer} | STALLED: no take or release for {s:.0} s"),
            None => consumer,
        };
        let rank = l.rank.map_or(String::new(), |k| format!(" (rank {k})"));
        out += &format!(
            "lane {}{rank}: {pos} | {} ready {} held {} writing {} free ({:.0} % full) | {consumer} | loader waited {}\n",
            l.lane,
            l.ready,
            l.held,
            l.writing,
            l.free,
            l.occupancy * 100.0,
            opt_pct(l.producer_wait_pct)
        );
    }
    for c in &r.consumers {
        out += &format!(
            "consumer pid {} lane {}: attached {:.0} s ago, {} batches taken, heartbeat {:.1} s ago\n",
            c.pid, c.lane, c.attached_s, c.taken, c.heartbeat_age_s
        );
    }
    if !r.streams.is_empty() {
        let each: Vec<String> = r
            .streams
            .iter()
            .map(|s| {
                format!(
                    "{} (weight {}, {} per epoch) served {}",
                    s.name, s.weight, s.samples_per_epoch, s.served
                )
            })
            .collect();
        out += &format!("streams: {}\n", each.join(" | "));
    }
    if let Some(f) = &r.feedback {
        out += &render_feedback(f);
    }
    out += &format!("verdict: {}", r.verdict);
    out
}

/// Classes listed in the text report (the JSON has them all), highest mean loss first.
const CLASSES_SHOWN: usize = 20;

/// The feedback part of the text report: report counters, scores, the selection state and,
/// for the newest epoch with losses, the mean loss per bucket of each augmentation parameter
/// and per class. Empty while nothing was reported.
pub(crate) fn render_feedback(f: &serde_json::Value) -> String {
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let int = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let rep = &f["reports"];
    let losses = int(&rep["losses"]);
    let (bad_loss, bad_id) = (int(&rep["ignored_bad_loss"]), int(&rep["refused_ids"]));
    let mut out = String::new();
    let sel = &f["selection"];
    if sel["mode"] == "infobatch" {
        out += &format!(
            "selection: infobatch, epoch {}: {} batches per lane, {} samples pruned\n",
            int(&sel["epoch"]),
            int(&sel["epoch_batches"]),
            int(&sel["epoch_pruned"])
        );
    }
    if losses + bad_loss + bad_id == 0 {
        return out;
    }
    out += &format!(
        "reported losses {losses} ({} not attributable here), ignored: {bad_loss} NaN/inf/negative, {bad_id} unknown ids; scores for {} of {} samples, mean {:.4}\n",
        int(&rep["unattributed"]),
        int(&f["scores"]["seen"]),
        int(&f["scores"]["samples"]),
        num(&f["scores"]["mean"])
    );
    let Some(epoch) = f["epochs"].as_array().and_then(|e| e.last()) else {
        return out;
    };
    out += &format!(
        "epoch {} so far: {} losses, mean {:.4}\n",
        int(&epoch["epoch"]),
        int(&epoch["samples"]),
        num(&epoch["mean_loss"])
    );
    if let Some(by) = epoch["loss_by"].as_object() {
        for param in by.values() {
            let buckets: Vec<String> = param["buckets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    format!(
                        "{}: {:.3} (n={})",
                        b["bucket"].as_str().unwrap_or("?"),
                        num(&b["mean_loss"]),
                        int(&b["samples"])
                    )
                })
                .collect();
            out += &format!(
                "  loss by {}: {}\n",
                param["title"].as_str().unwrap_or("?"),
                buckets.join(", ")
            );
        }
    }
    let streams: Vec<String> = epoch["loss_by_stream"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "{}: {:.3} (n={})",
                int(&s["stream"]),
                num(&s["mean_loss"]),
                int(&s["samples"])
            )
        })
        .collect();
    if !streams.is_empty() {
        out += &format!(
            "  loss by stream (index of the source tensor): {}\n",
            streams.join(", ")
        );
    }
    let mut classes: Vec<&serde_json::Value> = epoch["loss_by_class"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    if !classes.is_empty() {
        classes.sort_by(|a, b| num(&b["mean_loss"]).total_cmp(&num(&a["mean_loss"])));
        let shown: Vec<String> = classes
            .iter()
            .take(CLASSES_SHOWN)
            .map(|c| format!("{}: {:.3}", c["class"], num(&c["mean_loss"])))
            .collect();
        let more = classes.len().saturating_sub(CLASSES_SHOWN);
        out += &format!(
            "  loss by class (highest first): {}{}\n",
            shown.join(", "),
            if more > 0 {
                format!(" … and {more} more")
            } else {
                String::new()
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringfeed::ring::{plan, DType, LanePosition, LaneStats, RingSpec, RingStats, TensorSpec};

    fn layout() -> Layout {
        let spec = RingSpec {
            drop_last: true,
            batches_per_epoch: 10,
            seed: 1,
            samples_per_epoch: 40,
            ..RingSpec::new(
                "t",
                2,
                4,
                2,
                vec![TensorSpec {
                    name: "labels".into(),
                    dtype: DType::I64,
                    shape: vec![2],
                }],
            )
        };
        plan(&spec, 42).unwrap()
    }

    fn snap(t_s: f64, ok: u64, consumer_wait_ns: u64, producer_wait_ns: u64) -> RingSnapshot {
        let lane = |lane, pid| LaneStats {
            lane,
            ready: 2,
            held: 1,
            free: 1,
            consumer_pid: pid,
            consumer_wait_ns,
            ..LaneStats::default()
        };
        RingSnapshot {
            taken_mono_ns: (t_s * 1e9) as u64,
            stats: RingStats {
                generation: 42,
                state: Some(ProducerState::Serving),
                samples_ok: ok,
                samples_skipped: 0,
                producer_wait_ns,
                batches_published: ok / 2,
                lanes: vec![lane(0, 77), lane(1, 0)],
            },
            producer_start_unix_ns: 0,
            heartbeat_mono_ns: (t_s * 1e9) as u64,
            last_error: String::new(),
            positions: vec![Some(LanePosition { epoch: 3, index: 4 }), None],
            consumers: Vec::new(),
        }
    }

    #[test]
    fn rates_and_shares_come_from_deltas() {
        let h = [
            snap(100.0, 0, 0, 0),
            snap(159.0, 5900, 0, 0),
            snap(160.0, 6000, 500_000_000, 0),
        ];
        let r = report(&layout(), 9, &h, 0);
        let short = r.rates.short.as_ref().unwrap();
        assert!((short.images_per_s - 100.0).abs() < 1e-6);
        assert!((short.batches_per_s - 50.0).abs() < 1e-6);
        let long = r.rates.long.as_ref().unwrap();
        assert!((long.span_s - 60.0).abs() < 1e-6);
        assert!((long.images_per_s - 100.0).abs() < 1e-6);
        assert_eq!(r.lane_stats[0].consumer_wait_pct, Some(50.0));
        assert!(r.verdict.contains("loader is the bottleneck"));
        assert_eq!(r.lane_stats[0].occupancy, 0.75);
        assert_eq!(r.lane_stats[0].epoch_progress, Some(0.5));
        assert_eq!(r.lane_stats[1].epoch, None);
        assert_eq!((r.batches_per_epoch, r.lanes, r.state), (10, 2, "serving"));
        let text = render_text(&r);
        assert!(text.contains("lane 0: epoch 3 batch 5/10"), "{text}");
        assert!(text.contains("lane 1: nothing published yet"), "{text}");
    }

    #[test]
    fn a_single_snapshot_has_no_rates() {
        let r = report(&layout(), 9, &[snap(1.0, 10, 0, 0)], 0);
        assert_eq!(r.rates.short, None);
        assert_eq!(r.rates.long, None);
        assert_eq!(r.verdict, "measuring");
    }

    #[test]
    fn a_full_ring_with_a_waiting_loader_blames_the_trainer() {
        let h = [snap(0.0, 0, 0, 0), snap(1.0, 0, 0, 900_000_000)];
        let r = report(&layout(), 9, &h, 0);
        assert!(
            r.verdict.contains("trainer is the bottleneck"),
            "{}",
            r.verdict
        );
    }

    #[test]
    fn feedback_text_names_buckets_and_classes() {
        let f = serde_json::json!({
            "reports": {"losses": 10, "unattributed": 1, "ignored_bad_loss": 2, "refused_ids": 0},
            "scores": {"samples": 96, "seen": 9, "mean": 1.5},
            "selection": {"mode": "infobatch", "epoch": 2, "epoch_batches": 9, "epoch_pruned": 24},
            "epochs": [{"epoch": 2, "samples": 9, "mean_loss": 1.5,
                "loss_by": {"crop_area": {"title": "crop area", "buckets": [
                    {"bucket": "0–0.2", "mean_loss": 2.31, "samples": 4},
                    {"bucket": "0.5–0.75", "mean_loss": 1.52, "samples": 5}]}},
                "loss_by_class": [{"class": 0, "mean_loss": 0.5, "samples": 3},
                                  {"class": 1, "mean_loss": 2.5, "samples": 6}]}]
        });
        let text = render_feedback(&f);
        assert!(
            text.contains("selection: infobatch, epoch 2: 9 batches per lane, 24 samples pruned")
        );
        assert!(text.contains("loss by crop area: 0–0.2: 2.310 (n=4), 0.5–0.75: 1.520 (n=5)"));
        assert!(text.contains("loss by class (highest first): 1: 2.500, 0: 0.500"));
        assert!(text.contains("2 NaN/inf/negative"));
        let quiet = serde_json::json!({"reports": {"losses": 0}, "selection": {"mode": "none"}});
        assert_eq!(render_feedback(&quiet), "");
    }
}
