//! `s3://` shards served from a local S3-compatible server (`moto_server`, installed by
//! tests/setup.sh) through a fault-injecting proxy (tests/fault_support/s3_proxy.py) and the
//! local shard cache: every sample once per epoch despite 503 SlowDown, refused connections
//! (a restarting server), bodies cut off mid-object and requests that hang past the
//! timeout; wrong credentials, plain HTTP and missing objects stop the daemon at start
//! naming bucket and key; an object that vanishes while serving is skipped and counted; two
//! daemons as two nodes sharing one cache split every epoch exactly.

mod common;
mod fault_support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{config_with_source, free_addr, http_get, samples, tar, Daemon, RuntimeTmp};
use fault_support::Watchdog;
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};

const BUCKET: &str = "data";

/// moto_server on a free loopback port, and the fault proxy in front of it.
struct S3Server {
    moto: Child,
    proxy: Child,
    upstream: String,
    endpoint: String,
    control: PathBuf,
    _dir: tempfile::TempDir,
}

impl S3Server {
    fn start() -> S3Server {
        let dir = tempfile::tempdir().unwrap();
        let upstream = free_addr();
        let port = upstream.rsplit(':').next().unwrap().to_owned();
        let moto = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "moto_server not found: tests/setup.sh installs it (pip install 'moto[server]')",
            );
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(&upstream).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {upstream}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let control = dir.path().join("faults.json");
        std::fs::write(&control, "{}").unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fault_support/s3_proxy.py");
        let mut proxy = Command::new("python3")
            .arg(script)
            .args(["--upstream", &upstream, "--control"])
            .arg(&control)
            .args(["--server-pid", &moto.id().to_string()])
            // Held open by this process: its end, however it comes, stops proxy and server.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(proxy.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let proxy_port = line
            .trim()
            .strip_prefix("LISTENING ")
            .expect(&line)
            .to_owned();
        let server = S3Server {
            moto,
            proxy,
            upstream,
            endpoint: format!("127.0.0.1:{proxy_port}"),
            control,
            _dir: dir,
        };
        server.put(&format!("/{BUCKET}"), &[]);
        server
    }

    /// A plain (unsigned) PUT straight to moto, which does not check signatures.
    fn put(&self, path: &str, body: &[u8]) {
        let mut s = TcpStream::connect(&self.upstream).unwrap();
        write!(
            s,
            "PUT {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.upstream,
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        // The reply's head is enough (a PUT answers no body); don't wait for the close.
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        while !reply.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "PUT {path}: connection closed");
            reply.extend_from_slice(&buf[..n]);
        }
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 200"), "PUT {path}: {reply}");
    }

    /// Uploads `shards` shards of `per_shard` samples as `train/shard-NNNNNN.tar`.
    fn upload(&self, shards: u32, per_shard: u32) {
        for s in 0..shards {
            let members = samples(&format!("s{s}"), per_shard);
            self.put(&format!("/{BUCKET}/train/shard-{s:06}.tar"), &tar(&members));
        }
    }

    /// Replaces the proxy's fault rules (see s3_proxy.py).
    fn faults(&self, json: &str) {
        let tmp = self.control.with_extension("tmp");
        std::fs::write(&tmp, json).unwrap();
        std::fs::rename(&tmp, &self.control).unwrap();
    }

    /// Faults injected so far, by kind.
    fn injected(&self) -> BTreeMap<String, u64> {
        let reply = http_get(&self.endpoint, "/__faults");
        let body = reply.split("\r\n\r\n").nth(1).unwrap_or("{}");
        serde_json::from_str(body).expect(&reply)
    }

    /// The environment of a daemon using this server (the proxy) with `key_id`.
    fn env(&self, key_id: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", format!("http://{}", self.endpoint)),
            ("AWS_ACCESS_KEY_ID", key_id.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "secret".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("RINGFEED_S3_TIMEOUT_S", "1.5".to_owned()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        for child in [&mut self.proxy, &mut self.moto] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A config over `spec` with the cache and index in `dir`.
fn s3_config(dir: &Path, spec: &str, name: &str, extra: &str) -> PathBuf {
    let source = format!(
        "kind = \"tar\"\nshards = [\"{spec}\"]\ncache-dir = \"{}\"\nindex-dir = \"{}\"\n{extra}",
        dir.join("cache").display(),
        dir.join("index").display()
    );
    config_with_source(dir, &source, name)
}

fn spawn(runtime: &Path, cfg: &Path, args: &[&str], env: &[(&str, String)]) -> Daemon {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut all = vec!["--config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    Daemon::spawn_env(runtime, &all, &env)
}

/// Consumes lanes `0..lanes` of ring `name` to the end: per lane, (epoch, sample ids) of
/// each batch.
fn consume(runtime: &Path, name: &str, lanes: u32) -> Vec<Vec<(u64, Vec<i64>)>> {
    let handles: Vec<_> = (0..lanes)
        .map(|lane| {
            let mut opts = AttachOptions::new(name, lane);
            opts.dir = Some(RuntimeDir::at(runtime));
            let name = name.to_owned();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                let consumer = loop {
                    match Consumer::attach_with(&opts) {
                        Ok(c) => break c,
                        Err(e) if Instant::now() > deadline => panic!("{name} lane {lane}: {e}"),
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                };
                let mut batches = Vec::new();
                while let Some(b) = consumer.next_timeout(Duration::from_secs(120)).unwrap() {
                    batches.push((b.epoch(), b.tensor::<i64>("sample_ids").unwrap().to_vec()));
                }
                batches
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Per epoch, how often each sample id was served, over all `lanes`.
fn per_epoch(lanes: &[Vec<(u64, Vec<i64>)>]) -> BTreeMap<u64, BTreeMap<i64, u32>> {
    let mut out: BTreeMap<u64, BTreeMap<i64, u32>> = BTreeMap::new();
    for (epoch, ids) in lanes.iter().flatten() {
        for &id in ids {
            *out.entry(*epoch).or_default().entry(id).or_default() += 1;
        }
    }
    out
}

fn assert_every_sample_once(
    counts: &BTreeMap<u64, BTreeMap<i64, u32>>,
    epochs: u64,
    n: i64,
    log: &[String],
) {
    let log = log.join("\n");
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        (0..epochs).collect::<Vec<_>>()
    );
    for (epoch, ids) in counts {
        assert_eq!(
            ids.keys().copied().collect::<Vec<_>>(),
            (0..n).collect::<Vec<_>>(),
            "epoch {epoch}\n{log}"
        );
        assert!(
            ids.values().all(|&c| c == 1),
            "epoch {epoch}: {ids:?}\n{log}"
        );
    }
}

/// Serves `cfg` (ring `name`, one lane) for two epochs with `--exit-when-done` under `dog`,
/// consumes it to the end, and asserts that the daemon exits cleanly and that each of the
/// `sample_count` ids came exactly once per epoch.
fn serve_to_end(s3: &S3Server, dog: &Watchdog, cfg: &Path, name: &str, sample_count: i64) {
    let runtime = RuntimeTmp::new();
    let mut daemon = spawn(
        runtime.path(),
        cfg,
        &["--epochs", "2", "--exit-when-done", "--lanes", "1"],
        &s3.env("test"),
    );
    dog.guard(daemon.child.id());
    daemon.wait_for_line("serving ring", Duration::from_secs(120));
    let lanes = consume(runtime.path(), name, 1);
    let status = daemon.wait(Duration::from_secs(120));
    assert!(status.success(), "{status}\n{}", daemon.log.join("\n"));
    assert_every_sample_once(&per_epoch(&lanes), 2, sample_count, &daemon.log);
}

/// Bytes of complete shard copies in the cache.
fn cached_bytes(cache: &Path) -> (u64, usize) {
    let mut out = (0, 0);
    let mut stack = vec![cache.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                stack.push(path);
            } else if name.contains(".tar@") && !name.ends_with(".lock") && !name.contains(".part-")
            {
                out.0 += entry.metadata().unwrap().len();
                out.1 += 1;
            }
        }
    }
    out
}

#[test]
fn two_epochs_from_s3_through_a_small_cache_serve_every_sample_once_despite_faults() {
    let dog = Watchdog::arm("s3 two epochs with faults", Duration::from_secs(300));
    let s3 = S3Server::start();
    s3.upload(4, 16);
    let shard_size = tar(&samples("s0", 16)).len() as u64;
    let tmp = tempfile::tempdir().unwrap();
    // Room for about two shards: the second epoch must fetch again what the first evicted.
    let limit = shard_size * 5 / 2;
    let cfg = s3_config(
        tmp.path(),
        &format!("s3://{BUCKET}/train/shard-{{000000..000003}}.tar"),
        "s3epochs",
        &format!("cache-limit = {limit}\nallow-http = true"),
    );
    // Start-up meets throttling and a restarting server (listing, HEADs, first fetches).
    s3.faults(
        r#"{"latency_ms": 2, "slowdown": 3, "refuse": 2, "drop_body": 2, "hang": 1, "hang_s": 3}"#,
    );
    serve_to_end(&s3, &dog, &cfg, "s3epochs", 64);
    let injected = s3.injected();
    for kind in ["SlowDown", "refuse", "drop_body", "hang"] {
        assert!(
            injected.get(kind).copied().unwrap_or(0) > 0,
            "{kind} never injected: {injected:?}"
        );
    }
    let (bytes, copies) = cached_bytes(&tmp.path().join("cache"));
    assert!((1..4).contains(&copies), "{copies} copies, {bytes} bytes");

    // A second run reuses the local indexes (no fetch before serving) and survives faults
    // injected while it serves.
    s3.faults(r#"{"slowdown": 2, "refuse": 2, "drop_body": 2}"#);
    serve_to_end(&s3, &dog, &cfg, "s3epochs", 64);
}

#[test]
fn wrong_credentials_plain_http_and_missing_objects_stop_the_daemon_at_start_naming_them() {
    let _dog = Watchdog::arm("s3 start-up errors", Duration::from_secs(180));
    let s3 = S3Server::start();
    s3.upload(2, 8);
    s3.faults(r#"{"require_key": "GOOD"}"#);
    let tmp = tempfile::tempdir().unwrap();
    let spec = format!("s3://{BUCKET}/train/shard-{{000000..000001}}.tar");
    let fails = |cfg: &Path, key: &str| -> String {
        let runtime = RuntimeTmp::new();
        let mut daemon = spawn(
            runtime.path(),
            cfg,
            &["--epochs", "1", "--exit-when-done"],
            &s3.env(key),
        );
        let status = daemon.wait(Duration::from_secs(60));
        let log = daemon.log.join("\n");
        assert!(!status.success(), "served anyway:\n{log}");
        assert!(!log.contains("serving ring"), "{log}");
        log
    };

    let cfg = s3_config(tmp.path(), &spec, "creds", "allow-http = true");
    let log = fails(&cfg, "WRONG");
    assert!(
        log.contains("s3://data/train/shard-000000.tar") && log.contains("access denied"),
        "{log}"
    );

    let cfg = s3_config(tmp.path(), &spec, "plainhttp", "");
    let log = fails(&cfg, "GOOD");
    assert!(
        log.contains("plain HTTP") && log.contains("allow-http"),
        "{log}"
    );

    let missing = format!("s3://{BUCKET}/train/shard-{{000000..000002}}.tar");
    let cfg = s3_config(tmp.path(), &missing, "missing", "allow-http = true");
    let log = fails(&cfg, "GOOD");
    assert!(
        log.contains("s3://data/train/shard-000002.tar: no such object"),
        "{log}"
    );

    let cfg = s3_config(
        tmp.path(),
        "s3://data/valid/*.tar",
        "nomatch",
        "allow-http = true",
    );
    let log = fails(&cfg, "GOOD");
    assert!(
        log.contains("s3://data/valid/*.tar") && log.contains("matches no object"),
        "{log}"
    );
}

#[test]
fn an_object_that_vanishes_while_serving_is_skipped_counted_and_named() {
    let dog = Watchdog::arm("s3 vanished object", Duration::from_secs(240));
    let s3 = S3Server::start();
    s3.upload(3, 8);
    let tmp = tempfile::tempdir().unwrap();
    // A glob: listed, not HEAD-ed, so the indexes of the first run serve the second.
    let cfg = s3_config(
        tmp.path(),
        "s3://data/train/shard-*.tar",
        "vanish",
        "allow-http = true\ncache-limit = 1",
    );
    let runtime = RuntimeTmp::new();
    let mut daemon = spawn(
        runtime.path(),
        &cfg,
        &["--epochs", "1", "--exit-when-done"],
        &s3.env("test"),
    );
    dog.guard(daemon.child.id());
    daemon.wait_for_line("serving ring", Duration::from_secs(120));
    let lanes = consume(runtime.path(), "vanish", 1);
    assert!(daemon.wait(Duration::from_secs(60)).success());
    assert_every_sample_once(&per_epoch(&lanes), 1, 24, &daemon.log);
    std::fs::remove_dir_all(tmp.path().join("cache")).unwrap();

    s3.faults(r#"{"missing": ["shard-000001"]}"#);
    let runtime = RuntimeTmp::new();
    let mut daemon = spawn(
        runtime.path(),
        &cfg,
        &[
            "--epochs",
            "1",
            "--exit-when-done",
            "--max-skip-fraction",
            "0.9",
        ],
        &s3.env("test"),
    );
    dog.guard(daemon.child.id());
    daemon.wait_for_line("serving ring", Duration::from_secs(120));
    let lanes = consume(runtime.path(), "vanish", 1);
    assert!(
        daemon.wait(Duration::from_secs(60)).success(),
        "{}",
        daemon.log.join("\n")
    );
    // Every batch was still served; shard 1 (ids 8–15) never, each of its samples skipped,
    // counted and named with bucket, key and member.
    let served: Vec<i64> = lanes[0]
        .iter()
        .flat_map(|(_, ids)| ids.iter().copied())
        .collect();
    assert_eq!(served.len(), 24);
    assert!(served.iter().all(|id| !(8..16).contains(id)), "{served:?}");
    let named: std::collections::BTreeSet<&str> = daemon
        .log
        .iter()
        .filter_map(|l| {
            l.split("skipped sample s3://data/train/shard-000001.tar:")
                .nth(1)
        })
        .filter(|rest| rest.contains("no such object"))
        .filter_map(|rest| rest.split(':').next())
        .collect();
    assert_eq!(named.len(), 8, "{named:?}\n{}", daemon.log.join("\n"));
}

#[test]
fn two_daemons_as_two_nodes_on_the_same_s3_shards_split_every_epoch_exactly() {
    let dog = Watchdog::arm("s3 two nodes", Duration::from_secs(300));
    let s3 = S3Server::start();
    s3.upload(4, 16);
    let tmp = tempfile::tempdir().unwrap();
    s3.faults(r#"{"latency_ms": 1, "slowdown": 2, "drop_body": 1}"#);
    let runtimes = [RuntimeTmp::new(), RuntimeTmp::new()];
    let mut daemons = Vec::new();
    for node in 0..2u32 {
        // One cache and index directory for both: two daemons on one node.
        let cfg = s3_config(
            tmp.path(),
            &format!("s3://{BUCKET}/train/shard-{{000000..000003}}.tar"),
            &format!("node{node}"),
            "allow-http = true",
        );
        let first = (2 * node).to_string();
        let daemon = spawn(
            runtimes[node as usize].path(),
            &cfg,
            &[
                "--lanes",
                "2",
                "--world-size",
                "4",
                "--first-rank",
                &first,
                "--epochs",
                "2",
                "--exit-when-done",
            ],
            &s3.env("test"),
        );
        dog.guard(daemon.child.id());
        daemons.push(daemon);
    }
    for daemon in &mut daemons {
        daemon.wait_for_line("serving ring", Duration::from_secs(120));
    }
    let mut lanes = Vec::new();
    for (node, runtime) in runtimes.iter().enumerate() {
        lanes.extend(consume(runtime.path(), &format!("node{node}"), 2));
    }
    for daemon in &mut daemons {
        assert!(
            daemon.wait(Duration::from_secs(120)).success(),
            "{}",
            daemon.log.join("\n")
        );
    }
    let logs: Vec<String> = daemons.iter().flat_map(|d| d.log.iter().cloned()).collect();
    assert_every_sample_once(&per_epoch(&lanes), 2, 64, &logs);
    let batches: Vec<usize> = lanes.iter().map(Vec::len).collect();
    assert!(
        batches.iter().all(|&b| b == batches[0] && b > 0),
        "{batches:?}"
    );
}
