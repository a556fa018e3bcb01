//! The feedback part of `serve --metrics`: reported-loss counters, the selection state and the
//! newest epoch's mean loss per augmentation bucket and per class, read at scrape time from the
//! pipeline's evaluation (the same JSON `ringfeed stat` shows). [`FeedbackCollector`] sits in
//! the same registry as [`super::metrics::RingCollector`].

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use ringfeed::ring::Producer;
use serde_json::Value;

/// Reads the producer's evaluation at scrape time.
#[derive(Debug)]
pub(crate) struct FeedbackCollector {
    name: String,
    producer: Arc<Producer>,
}

impl FeedbackCollector {
    /// A collector of `producer`'s evaluation.
    pub(crate) fn new(producer: Arc<Producer>) -> FeedbackCollector {
        FeedbackCollector {
            name: producer.layout().name.clone(),
            producer,
        }
    }
}

impl Collector for FeedbackCollector {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        encode(&self.name, &self.producer.evaluation(), encoder)
    }
}

/// Encodes `evaluation` (the producer's `evaluation` reply) of ring `name`.
fn encode(
    name: &str,
    evaluation: &Value,
    mut encoder: DescriptorEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    let int = |v: &Value| v.as_u64().unwrap_or(0);
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    let rep = &evaluation["reports"];
    let ring = [("ring", name.to_owned())];
    let mut family = encoder.encode_descriptor(
        "feedback_losses",
        "Valid per-sample losses reported by trainers.",
        None,
        MetricType::Counter,
    )?;
    ConstCounter::new(int(&rep["losses"])).encode(family.encode_family(&ring)?)?;
    let mut family = encoder.encode_descriptor(
        "feedback_ignored",
        "Reported losses ignored: NaN/inf/negative values (bad_loss), ids outside the dataset (unknown_id).",
        None,
        MetricType::Counter,
    )?;
    for (reason, key) in [
        ("bad_loss", "ignored_bad_loss"),
        ("unknown_id", "refused_ids"),
    ] {
        let labels = [("ring", name.to_owned()), ("reason", reason.to_owned())];
        ConstCounter::new(int(&rep[key])).encode(family.encode_family(&labels)?)?;
    }
    let mut family = encoder.encode_descriptor(
        "selection_epoch_pruned",
        "Samples left out of lane 0's current epoch, all ranks (0 without selection).",
        None,
        MetricType::Gauge,
    )?;
    let pruned = i64::try_from(int(&evaluation["selection"]["epoch_pruned"])).unwrap_or(i64::MAX);
    ConstGauge::new(pruned).encode(family.encode_family(&ring)?)?;

    let Some(epoch) = evaluation["epochs"].as_array().and_then(|e| e.last()) else {
        return Ok(());
    };
    let e = int(&epoch["epoch"]).to_string();
    let mut family = encoder.encode_descriptor(
        "loss_by_augmentation",
        "Mean reported loss of the newest epoch per bucket of each augmentation parameter.",
        None,
        MetricType::Gauge,
    )?;
    if let Some(by) = epoch["loss_by"].as_object() {
        for (param, p) in by {
            for b in p["buckets"].as_array().into_iter().flatten() {
                let labels = [
                    ("ring", name.to_owned()),
                    ("epoch", e.clone()),
                    ("parameter", param.clone()),
                    ("bucket", b["bucket"].as_str().unwrap_or("?").to_owned()),
                ];
                ConstGauge::new(num(&b["mean_loss"])).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    let mut family = encoder.encode_descriptor(
        "loss_by_class",
        "Mean reported loss of the newest epoch per class.",
        None,
        MetricType::Gauge,
    )?;
    for c in epoch["loss_by_class"].as_array().into_iter().flatten() {
        let labels = [
            ("ring", name.to_owned()),
            ("epoch", e.clone()),
            ("class", c["class"].to_string()),
        ];
        ConstGauge::new(num(&c["mean_loss"])).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[derive(Debug)]
    struct Fixed(Value);

    impl Collector for Fixed {
        fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
            encode("r", &self.0, encoder)
        }
    }

    #[test]
    fn buckets_and_classes_become_labelled_gauges() {
        let v = serde_json::json!({
            "reports": {"losses": 5, "ignored_bad_loss": 1, "refused_ids": 2},
            "selection": {"epoch_pruned": 24},
            "epochs": [{"epoch": 3, "loss_by": {"flip": {"buckets": [
                {"bucket": "horizontal", "mean_loss": 0.5}]}},
                "loss_by_class": [{"class": 7, "mean_loss": 1.25}]}]
        });
        let mut registry = Registry::with_prefix("ringfeed");
        registry.register_collector(Box::new(Fixed(v)));
        let text = super::super::metrics::render(&registry);
        assert!(
            text.contains("ringfeed_feedback_losses_total{ring=\"r\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("ringfeed_feedback_ignored_total{ring=\"r\",reason=\"unknown_id\"} 2\n")
        );
        assert!(text.contains("ringfeed_selection_epoch_pruned{ring=\"r\"} 24\n"));
        assert!(text.contains(
            "ringfeed_loss_by_augmentation{ring=\"r\",epoch=\"3\",parameter=\"flip\",bucket=\"horizontal\"} 0.5\n"
        ));
        assert!(text.contains("ringfeed_loss_by_class{ring=\"r\",epoch=\"3\",class=\"7\"} 1.25\n"));
    }
}
