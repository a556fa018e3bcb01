//! The library embedded in another program: configuration text → checked `Plan` →
//! `Pipeline::from_plan` → batches, the same path `ringfeed serve` takes, with the same bytes;
//! each filled batch reports what happened to it; ring slots are written by tensor name.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{small_config, write_dataset};
use ringfeed::batch::{BatchBuffers, BatchSchema, SkipReason, TensorIndex};
use ringfeed::config::{ConfigFile, Overrides, Plan, TorchrunEnv};
use ringfeed::pipeline::{Cursor, Pipeline};
use ringfeed::ring::{BatchMeta, Consumer, DType, Producer, RingSpec, RuntimeDir};

/// One batch: images bytes, labels, sample ids.
type Batch = (Vec<u8>, Vec<i64>, Vec<i64>);

/// The embedder's path, from the configuration's text.
fn pipeline_from_text(text: &str, base_dir: &Path, epochs: u64) -> Pipeline {
    let file = ConfigFile::parse(text, "embedded").expect("the configuration parses");
    let overrides = Overrides {
        epochs: Some(epochs),
        ..Overrides::default()
    };
    let plan = Plan::resolve(file, &overrides, base_dir, &TorchrunEnv::default())
        .expect("the configuration is valid");
    Pipeline::from_plan(plan).expect("the pipeline builds")
}

fn le_i64(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn an_embedder_gets_the_batches_ringfeed_serve_serves() {
    let data = tempfile::tempdir().unwrap();
    let runtime = common::RuntimeTmp::new();
    let spec = write_dataset(data.path(), 2, 20);
    let config = small_config(data.path(), &spec, "embed");
    let text = std::fs::read_to_string(&config).unwrap();

    let pipeline = pipeline_from_text(&text, data.path(), 1);
    let ring = pipeline.ring_spec();
    assert_eq!((ring.name.as_str(), ring.batch_size), ("embed", 8));
    assert_eq!(ring.tensors, pipeline.schema().tensors());
    let rank = pipeline.plan().ranks().rank(0);
    let mut embedded = Vec::new();
    let mut ids = Vec::new();
    for index in 0..pipeline.batches_per_epoch() {
        let mut batch = BatchBuffers::new(pipeline.schema());
        let report = pipeline
            .fill_batch(
                Cursor { epoch: 0, index },
                rank,
                &mut batch.tensors(),
                &mut ids,
            )
            .expect("the batch fills");
        assert_eq!((report.written, report.skipped()), (8, 0));
        let tensor = |t| batch.get(t).unwrap().to_vec();
        embedded.push((
            tensor(TensorIndex::Images),
            le_i64(&tensor(TensorIndex::Labels)),
            le_i64(&tensor(TensorIndex::SampleIds)),
        ));
    }
    assert_eq!(embedded.len(), 5, "40 samples in batches of 8");

    let mut daemon = common::serve_finite(runtime.path(), &config, "1", &[]);
    let consumer =
        Consumer::attach_with(&common::lane_options(runtime.path(), "embed", 0)).expect("attach");
    let mut served: Vec<Batch> = Vec::new();
    common::drain(&consumer, |batch| {
        assert_eq!(batch.index(), served.len() as u64, "batches in order");
        served.push((
            batch.tensor_bytes(0).to_vec(),
            batch.tensor::<i64>("labels").unwrap().to_vec(),
            batch.tensor::<i64>("sample_ids").unwrap().to_vec(),
        ));
    });
    drop(consumer);
    let status = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "daemon failed: {}", daemon.log.join("\n"));
    assert_eq!(served.len(), embedded.len());
    for (index, (a, b)) in embedded.iter().zip(&served).enumerate() {
        assert!(
            a == b,
            "batch {index}: the embedded pipeline and `ringfeed serve` differ"
        );
    }
}

#[test]
fn a_corrupt_sample_is_reported_in_the_batch_that_skipped_it() {
    let data = tempfile::tempdir().unwrap();
    let mut members = common::samples("s0", 16);
    // Member 5's image (id 5) is not an image at all.
    members[2 * 5].1 = b"not a jpeg, not anything".to_vec();
    std::fs::write(data.path().join("shard-000000.tar"), common::tar(&members)).unwrap();
    let spec = format!("{}/shard-{{000000..000000}}.tar", data.path().display());
    let config = small_config(data.path(), &spec, "report");
    let text = std::fs::read_to_string(&config).unwrap();
    let pipeline = pipeline_from_text(&text, data.path(), 1);

    let mut ids = Vec::new();
    let mut reports = Vec::new();
    for index in 0..pipeline.batches_per_epoch() {
        let mut batch = BatchBuffers::new(pipeline.schema());
        let report = pipeline
            .fill_batch(
                Cursor { epoch: 0, index },
                0,
                &mut batch.tensors(),
                &mut ids,
            )
            .expect("a corrupt sample does not stop the batch");
        let served = le_i64(batch.get(TensorIndex::SampleIds).unwrap());
        assert!(!served.contains(&5), "the corrupt sample was replaced");
        reports.push(report);
    }
    let written: u64 = reports.iter().map(|r| r.written).sum();
    assert_eq!(
        written, 16,
        "every row written (the fallback took its place)"
    );
    let failures: Vec<_> = reports.iter().flat_map(|r| &r.failures).collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].sample_id, 5);
    assert_eq!(failures[0].reason, SkipReason::Process);
    assert!(failures[0].message.contains("s0_0005"), "{failures:?}");
    let with_it = reports.iter().find(|r| r.skipped() == 1).unwrap();
    assert_eq!(with_it.skipped_by(SkipReason::Process), 1);
    assert_eq!(with_it.failed_ids().collect::<Vec<_>>(), [5]);
    assert_eq!(with_it.last_error(), Some(failures[0].message.as_str()));
    // The shared counters the status line reads agree with the reports.
    let counters = pipeline.counters();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        (load(&counters.samples_ok), load(&counters.samples_skipped)),
        (16, 1)
    );
    assert_eq!(counters.last_error(), failures[0].message);
}

#[test]
fn a_slot_is_written_by_tensor_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = RuntimeDir::at(tmp.path().join("rt"));
    let augmenter =
        ringfeed::augment::Augmenter::new(&toml::from_str("center-crop = { size = 2 }").unwrap())
            .unwrap();
    let schema = BatchSchema::new(3, &augmenter)
        .with_source()
        .with_weights(true);
    let spec = RingSpec {
        name: "named".into(),
        lanes: 1,
        slots_per_lane: 1,
        batch_size: 3,
        tensors: schema.tensors(),
        drop_last: false,
        nhwc: schema.nhwc,
        selection: true,
        on_demand: false,
        batches_per_epoch: 1,
        epochs: 1,
        seed: 1,
        samples_per_epoch: 3,
        world_size: 1,
        first_rank: 0,
        epoch_samples: 3,
        mean: schema.mean,
        std: schema.std,
    };
    let producer = Producer::create(&spec, &dir).unwrap();
    let mut slot = producer.try_claim(0).expect("a free slot");
    assert!(
        slot.tensor_mut(TensorIndex::Targets).is_none(),
        "no batch mixing: no targets"
    );
    slot.tensor_mut(TensorIndex::Images).unwrap().fill(200);
    {
        let mut tensors = slot.batch_tensors();
        tensors.write_rows(TensorIndex::Labels, [4i64, 5, 6]);
        tensors.write_rows(TensorIndex::Source, [0u16, 1, 0]);
        tensors.write_rows(TensorIndex::Weights, [1.0f32, 2.5, 1.0]);
        tensors.write_rows(TensorIndex::Valid, [1u8, 1, 0]);
    }
    slot.publish(BatchMeta {
        epoch: 0,
        index: 0,
        count: 3,
        last_of_epoch: true,
    });
    let consumer = Consumer::attach_with(&common::lane_options(
        tmp.path().join("rt").as_path(),
        "named",
        0,
    ))
    .unwrap();
    let batch = consumer.next().unwrap().unwrap();
    assert_eq!(batch.tensor::<i64>("labels").unwrap(), &[4, 5, 6]);
    let source = batch.tensor_bytes(schema.position(TensorIndex::Source).unwrap());
    assert_eq!(source, [0, 0, 1, 0, 0, 0], "u16 little-endian");
    assert_eq!(batch.tensor::<f32>("weights").unwrap(), &[1.0, 2.5, 1.0]);
    assert_eq!(batch.tensor::<u8>("valid").unwrap(), &[1, 1, 0]);
    assert!(batch.tensor_bytes(0).iter().all(|&b| b == 200));
    assert_eq!(
        spec.tensors[0].dtype,
        DType::F32,
        "images by name, whatever their dtype"
    );
}
