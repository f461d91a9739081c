//! Shared fixtures of the runtime tests: a tiny synthetic dataset and a tiny random model,
//! generated in a temp dir in well under a second.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use onevision_comms::{RingConfig, TcpRingCommunicator};
use onevision_synth::{init_model, synth, Family, InitOptions, SynthOptions};

/// A port for a child process to listen on (see `onevision_comms::ports`).
pub fn free_port() -> u16 {
    onevision_comms::ports::free_port().unwrap()
}

/// Runs `f(rank, input, communicator)` for each input on its own thread, the threads joined by a
/// real TCP ring on loopback (world = number of inputs); results in rank order.
pub fn on_tcp_ring<I: Send + 'static, T: Send + 'static>(
    inputs: Vec<I>,
    f: impl Fn(usize, I, TcpRingCommunicator) -> T + Send + Copy + 'static,
) -> Vec<T> {
    let world = inputs.len();
    let listeners: Vec<std::net::TcpListener> =
        (0..world).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .zip(inputs)
        .enumerate()
        .map(|(rank, (l, input))| {
            let peers = peers.clone();
            std::thread::spawn(move || {
                let comm = TcpRingCommunicator::connect_with_listener(RingConfig::new(rank, world, peers), l).unwrap();
                f(rank, input, comm)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    /// `data/{train,heldout}.jsonl` (colour questions) and `model/` (hidden 32, one layer).
    pub fn new(train: usize, heldout: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        synth(&SynthOptions {
            out: dir.path().join("data"),
            train,
            heldout,
            seed: 3,
            families: vec![(Family::Color, 1.0)],
            difficulty: (1, 1),
            image_size: 56,
        })
        .unwrap();
        init_model(&InitOptions {
            out: dir.path().join("model"),
            tokenizer_corpus: vec![dir.path().join("data/train.jsonl")],
            vocab_size: 400,
            hidden_size: 32,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            intermediate_size: 64,
            vision_hidden_size: 32,
            vision_depth: 1,
            vision_num_heads: 1,
            vision_intermediate_size: 64,
            seed: 1,
            ..Default::default()
        })
        .unwrap();
        Fixture { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn model(&self) -> PathBuf {
        self.path().join("model")
    }

    pub fn train(&self) -> PathBuf {
        self.path().join("data/train.jsonl")
    }

    pub fn heldout(&self) -> PathBuf {
        self.path().join("data/heldout.jsonl")
    }
}

/// The per-step JSON objects of a metrics.jsonl.
pub fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// `onevision run MANIFEST --workdir WORK --data-root DATA_ROOT`, not started yet.
pub fn onevision_run(manifest: &Path, work: &Path, data_root: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_onevision"));
    c.arg("run").arg(manifest).arg("--workdir").arg(work).arg("--data-root").arg(data_root);
    c
}

/// Waits (at most 120 s, else the test fails) until `metrics_file` holds `steps` lines.
pub fn wait_for_steps(metrics_file: &Path, steps: usize) {
    let t = Instant::now();
    while std::fs::read_to_string(metrics_file).map(|s| s.lines().count()).unwrap_or(0) < steps {
        assert!(t.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of running trainer processes of the job file `job` whose environment has `env`.
pub fn trainer_pids(job: &str, env: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let has = |hay: &[u8], n: &str| hay.split(|b| *b == 0).any(|s| String::from_utf8_lossy(s).contains(n));
        // A zombie has an empty cmdline; only live processes count.
        if has(&cmd, job) && has(&cmd, "trainer") && has(&environ, env) {
            pids.push(pid);
        }
    }
    pids
}
