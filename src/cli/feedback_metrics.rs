//! The feedback part of `serve --metrics`: reported-loss counters, the selection state and the
//! newest epoch's mean loss per augmentation bucket and per class, from the pipeline's
//! evaluation (the same JSON `ringfeed stat` shows). Kept apart from `metrics.rs`, which only
//! calls [`render`].

use serde_json::Value;

fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Prometheus text for `evaluation` (the producer's `evaluation` reply) of ring `name`.
pub(crate) fn render(name: &str, evaluation: &Value) -> String {
    let int = |v: &Value| v.as_u64().unwrap_or(0);
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    let ring = label(name);
    let rep = &evaluation["reports"];
    let mut out = String::new();
    let mut metric = |m: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        out += &format!("# HELP {m} {help}\n# TYPE {m} {kind}\n");
        for (labels, value) in rows {
            out += &format!("{m}{{ring=\"{ring}\"{labels}}} {value}\n");
        }
    };
    metric(
        "ringfeed_feedback_losses_total",
        "counter",
        "Valid per-sample losses reported by trainers.",
        vec![(String::new(), int(&rep["losses"]) as f64)],
    );
    metric(
        "ringfeed_feedback_ignored_total",
        "counter",
        "Reported losses ignored: NaN/inf/negative values, ids outside the dataset.",
        vec![
            (
                ",reason=\"bad_loss\"".into(),
                int(&rep["ignored_bad_loss"]) as f64,
            ),
            (
                ",reason=\"unknown_id\"".into(),
                int(&rep["refused_ids"]) as f64,
            ),
        ],
    );
    let sel = &evaluation["selection"];
    metric(
        "ringfeed_selection_epoch_pruned",
        "gauge",
        "Samples left out of lane 0's current epoch, all ranks (0 without selection).",
        vec![(String::new(), int(&sel["epoch_pruned"]) as f64)],
    );
    let Some(epoch) = evaluation["epochs"].as_array().and_then(|e| e.last()) else {
        return out;
    };
    let e = int(&epoch["epoch"]);
    let mut by_bucket = Vec::new();
    if let Some(by) = epoch["loss_by"].as_object() {
        for (param, p) in by {
            for b in p["buckets"].as_array().into_iter().flatten() {
                by_bucket.push((
                    format!(
                        ",epoch=\"{e}\",parameter=\"{}\",bucket=\"{}\"",
                        label(param),
                        label(b["bucket"].as_str().unwrap_or("?"))
                    ),
                    num(&b["mean_loss"]),
                ));
            }
        }
    }
    metric(
        "ringfeed_loss_by_augmentation",
        "gauge",
        "Mean reported loss of the newest epoch per bucket of each augmentation parameter.",
        by_bucket,
    );
    let by_class = epoch["loss_by_class"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                format!(",epoch=\"{e}\",class=\"{}\"", c["class"]),
                num(&c["mean_loss"]),
            )
        })
        .collect();
    metric(
        "ringfeed_loss_by_class",
        "gauge",
        "Mean reported loss of the newest epoch per class.",
        by_class,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_classes_become_labelled_gauges() {
        let v = serde_json::json!({
            "reports": {"losses": 5, "ignored_bad_loss": 1, "refused_ids": 2},
            "selection": {"epoch_pruned": 24},
            "epochs": [{"epoch": 3, "loss_by": {"flip": {"buckets": [
                {"bucket": "horizontal", "mean_loss": 0.5}]}},
                "loss_by_class": [{"class": 7, "mean_loss": 1.25}]}]
        });
        let text = render("r", &v);
        assert!(text.contains("ringfeed_feedback_losses_total{ring=\"r\"} 5\n"));
        assert!(
            text.contains("ringfeed_feedback_ignored_total{ring=\"r\",reason=\"unknown_id\"} 2\n")
        );
        assert!(text.contains(
            "ringfeed_loss_by_augmentation{ring=\"r\",epoch=\"3\",parameter=\"flip\",bucket=\"horizontal\"} 0.5\n"
        ));
        assert!(text.contains("ringfeed_loss_by_class{ring=\"r\",epoch=\"3\",class=\"7\"} 1.25\n"));
    }
}
