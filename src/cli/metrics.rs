//! `serve --metrics ADDR`: what the Prometheus endpoint exports.
//!
//! # Brief overview
//!
//! [`RingCollector`] is a `prometheus-client` collector: on every scrape it reads the ring's
//! counters once ([`Producer::stats`]) and the pipeline's per-sample time histogram, and
//! encodes them as constant metrics — the values live in shared memory and atomics already,
//! so nothing is mirrored into client-side counters. [`render`] encodes a registry holding it
//! in the Prometheus text format 0.0.4; [`super::metrics_http`] serves that text over HTTP.
//!
//! Every series carries `ring="<name>"`; per-lane series add `lane="<n>"`. The names below are
//! documented in the README and must not change (add new ones instead).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use ringfeed::pipeline::{PipelineCounters, SAMPLE_TIME_BUCKETS_S};
use ringfeed::ring::{LaneStats, Producer};

/// The `Content-Type` of [`render`]'s output.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Reads one ring's counters at scrape time.
#[derive(Debug)]
pub(crate) struct RingCollector {
    /// The ring's name (the `ring` label).
    name: String,
    producer: Arc<Producer>,
    counters: Arc<PipelineCounters>,
}

impl RingCollector {
    /// A collector of `producer`'s ring and `counters`' sample times.
    pub(crate) fn new(producer: Arc<Producer>, counters: Arc<PipelineCounters>) -> RingCollector {
        RingCollector {
            name: producer.layout().name.clone(),
            producer,
            counters,
        }
    }

    /// A registry (prefix `ringfeed`) holding this collector.
    pub(crate) fn into_registry(self) -> Registry {
        let mut registry = Registry::with_prefix("ringfeed");
        let feedback = super::feedback_metrics::FeedbackCollector::new(Arc::clone(&self.producer));
        registry.register_collector(Box::new(self));
        registry.register_collector(Box::new(feedback));
        registry
    }
}

/// The registry's metrics in the Prometheus text format 0.0.4.
pub(crate) fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; a collector error would leave a partial body, which
    // the scraper rejects on its own.
    if let Err(err) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        log::warn!("encoding the metrics failed: {err}");
    }
    out
}

/// The metrics of several registries (one per ring of the daemon) as one exposition: each
/// metric family once (its `# HELP`/`# TYPE` lines from the first registry that has it), with
/// the rows of every registry, which differ by their `ring` label.
pub(crate) fn render_all(registries: &[Registry]) -> String {
    if let [one] = registries {
        return render(one);
    }
    // (family name, its header lines, its rows) in first-seen order.
    let mut families: Vec<(String, String, String)> = Vec::new();
    for registry in registries {
        let text = render(registry);
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if line == "# EOF" {
                break;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or_default().to_owned();
                let at = match families.iter().position(|(n, _, _)| *n == name) {
                    Some(at) => at,
                    None => {
                        families.push((name, format!("{line}\n"), String::new()));
                        families.len() - 1
                    }
                };
                current = Some(at);
                continue;
            }
            let Some(at) = current else { continue };
            let family = &mut families[at];
            if line.starts_with('#') {
                if !family.1.contains(line) {
                    family.1 += line;
                    family.1.push('\n');
                }
            } else {
                family.2 += line;
                family.2.push('\n');
            }
        }
    }
    let mut out = String::new();
    for (_, header, rows) in families {
        out += &header;
        out += &rows;
    }
    out += "# EOF\n";
    out
}

/// A counter's value: a count, or seconds.
#[derive(Debug, Clone, Copy)]
enum Value {
    Count(u64),
    Seconds(f64),
}

impl Value {
    fn seconds(ns: u64) -> Value {
        Value::Seconds(ns as f64 / 1e9)
    }
}

/// Encodes one counter row (`_total` is added by the encoder).
fn encode_counter(row: MetricEncoder<'_>, v: Value) -> std::fmt::Result {
    match v {
        Value::Count(v) => ConstCounter::new(v).encode(row),
        Value::Seconds(v) => ConstCounter::new(v).encode(row),
    }
}

impl Collector for RingCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = self.producer.stats();
        let ring = [("ring", self.name.as_str())];
        // The last skip or failure reason (for a skipped sample: shard, member and why) as an
        // info-style gauge of value 1; absent while there is none.
        let last_error = self.producer.last_error();
        if !last_error.is_empty() {
            let mut family = encoder.encode_descriptor(
                "last_error_info",
                "The last skip or failure reason (the message label).",
                None,
                MetricType::Gauge,
            )?;
            let labels = [
                ("ring", self.name.as_str()),
                ("message", last_error.as_str()),
            ];
            ConstGauge::new(1i64).encode(family.encode_family(&labels)?)?;
        }
        let mut ring_counter = |name: &str, help: &str, v: Value| {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            encode_counter(family.encode_family(&ring)?, v)
        };
        ring_counter(
            "samples",
            "Samples decoded and written.",
            Value::Count(s.samples_ok),
        )?;
        ring_counter(
            "samples_skipped",
            "Samples skipped (corrupt, unreadable, bad label).",
            Value::Count(s.samples_skipped),
        )?;
        ring_counter(
            "batches_published",
            "Batches published, all lanes.",
            Value::Count(s.batches_published),
        )?;
        ring_counter(
            "producer_wait_seconds",
            "Time the producer waited for a free slot.",
            Value::seconds(s.producer_wait_ns),
        )?;

        // One row per lane, labelled `ring` then `lane`.
        let lane_labels =
            |l: &LaneStats| [("ring", self.name.clone()), ("lane", l.lane.to_string())];
        let lane_counter = |encoder: &mut DescriptorEncoder<'_>,
                            name: &str,
                            help: &str,
                            f: fn(&LaneStats) -> Value| {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for l in &s.lanes {
                encode_counter(family.encode_family(&lane_labels(l))?, f(l))?;
            }
            Ok::<(), std::fmt::Error>(())
        };
        let lane_gauge = |encoder: &mut DescriptorEncoder<'_>,
                          name: &str,
                          help: &str,
                          f: fn(&LaneStats) -> i64| {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for l in &s.lanes {
                ConstGauge::new(f(l)).encode(family.encode_family(&lane_labels(l))?)?;
            }
            Ok::<(), std::fmt::Error>(())
        };
        lane_counter(
            &mut encoder,
            "lane_consumer_wait_seconds",
            "Time the lane's consumer waited for a batch.",
            |l| Value::seconds(l.consumer_wait_ns),
        )?;
        lane_gauge(
            &mut encoder,
            "lane_slots_ready",
            "Slots holding a published batch.",
            |l| i64::from(l.ready),
        )?;
        lane_gauge(
            &mut encoder,
            "lane_slots_held",
            "Slots held by the consumer.",
            |l| i64::from(l.held),
        )?;
        lane_counter(
            &mut encoder,
            "lane_published",
            "Batches published in the lane.",
            |l| Value::Count(l.published),
        )?;
        lane_gauge(
            &mut encoder,
            "lane_consumer_attached",
            "1 when a consumer is attached.",
            |l| i64::from(l.consumer_pid != 0),
        )?;

        // Samples served per stream of a mixture, labelled `ring` then `stream`.
        let streams = self.counters.stream_counts();
        if !streams.is_empty() {
            let mut family = encoder.encode_descriptor(
                "stream_samples",
                "Samples served from each stream of the mixture.",
                None,
                MetricType::Counter,
            )?;
            for (stream, served) in &streams {
                let labels = [("ring", self.name.as_str()), ("stream", stream.as_str())];
                encode_counter(family.encode_family(&labels)?, Value::Count(*served))?;
            }
        }

        // The per-sample decode + augment + write time: the pipeline keeps the bucket counts,
        // the encoder writes them cumulatively with `+Inf`, sum and count.
        let (counts, sum_ns) = self.counters.sample_times.snapshot();
        let buckets: Vec<(f64, u64)> = counts
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                (
                    SAMPLE_TIME_BUCKETS_S
                        .get(i)
                        .copied()
                        .unwrap_or(f64::INFINITY),
                    n,
                )
            })
            .collect();
        let count = counts.iter().sum();
        let mut family = encoder.encode_descriptor(
            "sample_process_seconds",
            "Time to decode, augment and write one sample.",
            None,
            MetricType::Histogram,
        )?;
        family
            .encode_family(&ring)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                sum_ns as f64 / 1e9,
                count,
                &buckets,
                None,
            )
    }
}
