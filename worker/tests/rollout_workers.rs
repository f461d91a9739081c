//! Rollout workers as real `onevision rollout` processes on loopback gRPC, with a tiny random
//! Qwen2.5-VL written by the test: completions equal the model's own `generate_group`, bad
//! weight updates get the documented status codes and leave the old weights serving, a worker
//! killed mid-batch has its groups finished by the other one, a worker added mid-run receives
//! the current weights and work, SIGTERM deregisters.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use onevision::rollout::{
    tensors_from_f32, weights_version, GroupRequest, ImageInput, PoolConfig, RolloutPool, Sampling, WorkerSource,
};
use onevision_comms::coordinator::{serve_coordinator, CoordinatorConfig, CoordinatorServerHandle};
use onevision_comms::weights::{weight_update_messages, OutgoingTensor};
use onevision_model::{generate_group, CpuBackend, DType, PromptInput, Qwen25Vl, SamplingParams, Tensor};
use onevision_proto::v1;
use onevision_proto::v1::rollout_client::RolloutClient;
use rand::{Rng, SeedableRng};
use tonic::Code;

const IMAGE_TOKEN: u32 = 100;
const VISION_START: u32 = 101;
const VISION_END: u32 = 102;

fn config_json() -> String {
    r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 2, "vocab_size": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
  "max_position_embeddings": 512, "tie_word_embeddings": true, "eos_token_id": 2,
  "image_token_id": 100, "vision_start_token_id": 101, "vision_end_token_id": 102, "video_token_id": 103,
  "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
  "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "in_chans": 3,
    "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "window_size": 56, "fullatt_block_indexes": [1]}}"#
        .to_string()
}

/// Seeded random weights: norms near 1, the rest uniform in ±0.3 (outputs depend visibly on
/// every tensor).
fn random_weights(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let cfg = onevision_model::Qwen25VlConfig::from_json_str(&config_json(), None, "test").unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    cfg.expected_tensors()
        .into_iter()
        .map(|(n, s)| {
            let numel: usize = s.iter().product();
            let norm = n.contains("norm") || n.contains("ln_q");
            let v = (0..numel)
                .map(|_| if norm { 1.0 + rng.random_range(-0.2f32..0.2) } else { rng.random_range(-0.3f32..0.3) })
                .collect();
            (n, s, v)
        })
        .collect()
}

/// A tiny HF-layout checkpoint (config.json + model.safetensors).
fn write_model(dir: &Path, seed: u64) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("config.json"), config_json()).unwrap();
    let tensors: Vec<(String, Tensor)> =
        random_weights(seed).into_iter().map(|(n, s, v)| (n, Tensor::from_f32(&s, v).unwrap())).collect();
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    onevision_model::save_safetensors(m.join("model.safetensors"), &refs).unwrap();
    m
}

fn load(dir: &Path) -> Qwen25Vl {
    Qwen25Vl::load(dir, Arc::new(CpuBackend::new()), DType::F32).unwrap()
}

struct Worker {
    child: Child,
    addr: String,
    id: String,
}

impl Worker {
    fn spawn(model: &Path, coordinator: Option<&str>, id: &str, extra: &[&str]) -> Worker {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_onevision"));
        cmd.arg("rollout")
            .arg("--model")
            .arg(model)
            .args(["--listen", "127.0.0.1:0", "--worker-id", id, "--drain-secs", "5"])
            .args(extra)
            .env_remove("ONEVISION_JOB_SPEC")
            .env_remove("ONEVISION_COORDINATOR")
            .env_remove("POD_IP")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(c) = coordinator {
            cmd.args(["--coordinator", c]);
        }
        let mut child = cmd.spawn().expect("spawn onevision rollout");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.split(" listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(120)).expect("worker did not start listening");
        Worker { child, addr, id: id.to_string() }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn client(&self) -> RolloutClient<tonic::transport::Channel> {
        RolloutClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
            .max_decoding_message_size(onevision_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(onevision_proto::MAX_MESSAGE_BYTES)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `SIG<name>` to the worker process (STOP freezes it like a hung node, CONT thaws it).
fn signal(w: &Worker, name: &str) {
    let pid = w.child.id().to_string();
    assert!(Command::new("kill").args([&format!("-{name}"), &pid]).status().unwrap().success(), "kill -{name} {pid}");
}

async fn coordinator() -> CoordinatorServerHandle {
    let mut cfg = CoordinatorConfig::new(1, 0);
    cfg.rollout_lease_ttl = Duration::from_secs(3);
    serve_coordinator("127.0.0.1:0".parse().unwrap(), cfg).await.unwrap()
}

async fn wait_registered(h: &CoordinatorServerHandle, ids: &[&str]) {
    let start = Instant::now();
    loop {
        let live: Vec<String> = h.rollout_workers().into_iter().map(|w| w.worker_id).collect();
        if ids.iter().all(|id| live.iter().any(|l| l == id)) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "workers {ids:?} never registered (live: {live:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn text_prompt(i: usize) -> Vec<u32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1000 + i as u64);
    (0..6 + i % 5).map(|_| rng.random_range(3u32..99)).collect()
}

fn sampling(max_new_tokens: u32) -> Sampling {
    Sampling { temperature: 1.0, top_p: 0.9, top_k: 0, max_new_tokens, stop_token_ids: vec![] }
}

fn model_params(s: &Sampling, seed: u64) -> SamplingParams {
    SamplingParams {
        max_new_tokens: s.max_new_tokens as usize,
        temperature: s.temperature,
        top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
        top_k: s.top_k as usize,
        seed,
        ..SamplingParams::default()
    }
}

/// A 56×84 test image (PNG bytes) and its preprocessed prompt input around `ids`.
fn png_image() -> Vec<u8> {
    let img = image::RgbImage::from_fn(84, 56, |x, y| image::Rgb([(x * 3) as u8, (y * 4) as u8, ((x + y) * 2) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn pool_for(h: &CoordinatorServerHandle, cfg: PoolConfig) -> RolloutPool {
    let client = onevision_comms::coordinator::CoordinatorClient::new(
        &h.endpoint(),
        onevision_comms::coordinator::RetryPolicy { give_up_after: Duration::from_secs(2), ..Default::default() },
    )
    .unwrap();
    RolloutPool::new(WorkerSource::Coordinator(client), cfg)
}

fn test_pool_config() -> PoolConfig {
    PoolConfig {
        deadline: Duration::from_secs(240),
        no_worker_timeout: Duration::from_secs(30),
        group_timeout: Duration::from_secs(60),
        refresh_interval: Duration::from_millis(100),
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
        ..PoolConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_completions_equal_generate_group() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = write_model(tmp.path(), 7);
    let w = Worker::spawn(&model_dir, None, "w-eq", &["--capacity", "8"]);
    let model = load(&model_dir);
    let pool = RolloutPool::new(WorkerSource::Static(vec![w.addr.clone()]), test_pool_config());
    let s = sampling(12);

    // Text-only groups and one with an encoded image (pad collapsed to one token: the worker
    // expands it to the image's token count).
    let png = png_image();
    let mut groups: Vec<GroupRequest> = (0..3)
        .map(|i| GroupRequest { prompt_token_ids: text_prompt(i), images: vec![], group_size: 3, seed: 40 + i as u64 })
        .collect();
    groups.push(GroupRequest {
        prompt_token_ids: vec![5, 6, VISION_START, IMAGE_TOKEN, VISION_END, 7, 8],
        images: vec![ImageInput::Encoded(png.clone())],
        group_size: 2,
        seed: 99,
    });
    let results = pool.generate(groups.clone(), &s).await.unwrap();
    assert_eq!(results.len(), groups.len());

    let img_cfg = onevision_preprocess::ImageConfig::from_dir(&model_dir).unwrap();
    for (g, r) in groups.iter().zip(&results) {
        let prompt = if g.images.is_empty() {
            PromptInput { input_ids: g.prompt_token_ids.clone(), pixel_values: None, image_grid_thw: vec![] }
        } else {
            let im = onevision_preprocess::decode_image(&png).unwrap();
            let p = onevision_preprocess::preprocess_image(&im, &img_cfg).unwrap();
            let ids = onevision::rollout::expand_image_pads(&g.prompt_token_ids, IMAGE_TOKEN, &[p.num_tokens(2)]).unwrap();
            PromptInput {
                input_ids: ids,
                pixel_values: Some(Tensor::from_f32(&[p.num_patches(), p.patch_dim], p.pixel_values.clone()).unwrap()),
                image_grid_thw: vec![p.grid_thw],
            }
        };
        let want = generate_group(&model, &prompt, g.group_size as usize, &model_params(&s, g.seed)).unwrap();
        assert_eq!(r.completions.len(), want.len());
        for (c, w) in r.completions.iter().zip(&want) {
            assert_eq!(c.token_ids, w.token_ids, "token ids differ from generate_group");
            assert_eq!(c.logprobs.len(), c.token_ids.len());
            for (a, b) in c.logprobs.iter().zip(&w.logprobs) {
                assert!((a - b).abs() < 1e-5, "logprob {a} vs {b}");
            }
            assert_eq!(c.model_version, 0);
            let want_reason = if w.finished { v1::FinishReason::Stop } else { v1::FinishReason::Length };
            assert_eq!(c.finish_reason, want_reason);
        }
        // Samples of a group differ (own random streams), so the group is a real GRPO group.
        assert!(r.completions.windows(2).any(|p| p[0].token_ids != p[1].token_ids), "identical samples");
    }

    // Info and a per-group error that does not end the stream.
    let mut c = w.client().await;
    let info = c.info(v1::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.worker_id.as_str(), info.model_version, info.capacity, info.max_context_tokens), ("w-eq", 0, 8, 512));
    let bad = GroupRequest { prompt_token_ids: vec![500], images: vec![], group_size: 1, seed: 0 };
    let e = pool.generate(vec![bad], &s).await.unwrap_err();
    assert!(matches!(e, onevision::rollout::RolloutError::Rejected { code: Code::InvalidArgument, .. }), "{e}");
}

/// Continuous batching: groups sent together decode in the same steps (the worker reports more
/// active sequences than one group has, never more than its capacity), and each still equals
/// the group generated alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_decode_together_up_to_the_capacity() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = write_model(tmp.path(), 8);
    let w = Worker::spawn(&model_dir, None, "w-batch", &["--capacity", "12"]);
    let model = load(&model_dir);
    let pool = RolloutPool::new(WorkerSource::Static(vec![w.addr.clone()]), test_pool_config());
    // Greedy with an eos id the model never produces first: every row runs its whole budget,
    // long enough for the poller below to see the batch.
    let s = Sampling { temperature: 0.0, top_p: 1.0, top_k: 0, max_new_tokens: 300, stop_token_ids: vec![127] };
    let groups: Vec<GroupRequest> = (0..5)
        .map(|i| GroupRequest { prompt_token_ids: text_prompt(i), images: vec![], group_size: 4, seed: i as u64 })
        .collect();
    // The peak is sampled by polling Info while the batch decodes. On a loaded 2-core machine
    // (the other tests of this binary run beside it) the poller can be descheduled for the whole
    // batched phase, so up to three rounds are tried; a worker that never batches fails all three.
    let mut peak = 0;
    let mut results = vec![];
    for _round in 0..3 {
        let mut c = w.client().await;
        let poll = tokio::spawn(async move {
            let mut peak = 0;
            for _ in 0..5000 {
                let info = c.info(v1::InfoRequest {}).await.unwrap().into_inner();
                peak = peak.max(info.active_sequences);
                if peak > 4 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            peak
        });
        results = pool.generate(groups.clone(), &s).await.unwrap();
        peak = poll.await.unwrap();
        if peak > 4 {
            break;
        }
    }
    assert!(peak > 4 && peak <= 12, "active sequences peaked at {peak}: groups were not batched up to the capacity");
    for (g, r) in groups.iter().zip(&results) {
        let want = generate_group(&model, &PromptInput { input_ids: g.prompt_token_ids.clone(), ..Default::default() }, 4, &SamplingParams {
            max_new_tokens: 300,
            eos_token_ids: Some(vec![127]),
            ..Default::default()
        })
        .unwrap();
        for (c, w) in r.completions.iter().zip(&want) {
            assert_eq!(c.token_ids, w.token_ids);
        }
    }
}

fn perturbed(seed: u64) -> Vec<OutgoingTensor> {
    tensors_from_f32(random_weights(seed))
}

async fn push(
    c: &mut RolloutClient<tonic::transport::Channel>,
    msgs: Vec<v1::UpdateWeightsRequest>,
) -> Result<v1::UpdateWeightsResponse, tonic::Status> {
    c.update_weights(tokio_stream::iter(msgs)).await.map(|r| r.into_inner())
}

async fn generate_one(c: &mut RolloutClient<tonic::transport::Channel>, min_version: u64) -> (Vec<Vec<u32>>, v1::GroupDone) {
    let g = v1::PromptGroup {
        request_id: 5,
        prompt_token_ids: text_prompt(1),
        images: vec![],
        group_size: 2,
        sampling: Some(v1::SamplingParams { temperature: 0.0, max_new_tokens: 8, seed: 1, ..Default::default() }),
        min_model_version: min_version,
    };
    let mut s = c.generate(tokio_stream::iter(vec![v1::GenerateRequest { group: Some(g) }])).await.unwrap().into_inner();
    let mut toks = vec![];
    while let Some(m) = s.message().await.unwrap() {
        match m.event.unwrap() {
            v1::generate_response::Event::Completion(c) => toks.push(c.token_ids),
            v1::generate_response::Event::Done(d) => return (toks, d),
        }
    }
    panic!("stream ended without GroupDone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_weight_updates_get_status_codes_and_old_weights_keep_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = write_model(tmp.path(), 7);
    let w = Worker::spawn(&model_dir, None, "w-upd", &["--version-wait-ms", "300"]);
    let mut c = w.client().await;
    let (before, done) = generate_one(&mut c, 0).await;
    assert_eq!(done.error_code, 0);

    let good = perturbed(8);
    let chunk = 1000;
    // Unknown tensor → NOT_FOUND.
    let mut t = good.clone();
    t[3].name = "model.layers.9.mlp.up_proj.weight".into();
    let e = push(&mut c, weight_update_messages(1, &t, chunk).collect()).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Wrong shape → INVALID_ARGUMENT.
    let mut t = good.clone();
    let i = t.iter().position(|x| x.spec.shape.len() == 2 && x.spec.shape[0] != x.spec.shape[1]).unwrap();
    t[i].spec.shape.reverse();
    let e = push(&mut c, weight_update_messages(1, &t, chunk).collect()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Stream without its commit → ABORTED.
    let mut msgs: Vec<_> = weight_update_messages(1, &good, chunk).collect();
    msgs.pop();
    let e = push(&mut c, msgs).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    // Nothing was applied by any of them.
    let (after, _) = generate_one(&mut c, 0).await;
    assert_eq!(after, before, "a refused update changed the weights");
    let info = c.info(v1::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model_version, 0);

    // A group that needs version 1 waits briefly, then fails alone with FAILED_PRECONDITION.
    let (toks, done) = generate_one(&mut c, 1).await;
    assert!(toks.is_empty());
    assert_eq!(Code::from(done.error_code), Code::FailedPrecondition, "{}", done.error_message);

    // A valid update (a subset of the tensors is allowed) applies at the commit.
    let r = push(&mut c, weight_update_messages(1, &good, chunk).collect()).await.unwrap();
    assert_eq!((r.version, r.tensors_updated as usize), (1, good.len()));
    let (v1_out, done) = generate_one(&mut c, 1).await;
    assert_eq!(done.error_code, 0);
    assert_ne!(v1_out, before, "new weights must change the greedy output");
    // Stale version → FAILED_PRECONDITION, version 1 keeps serving.
    let e = push(&mut c, weight_update_messages(1, &perturbed(9), chunk).collect()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let (again, _) = generate_one(&mut c, 0).await;
    assert_eq!(again, v1_out);

    // The served weights equal the pushed ones: same output as the model loaded with them.
    let mut model = load(&model_dir);
    for (n, s, v) in random_weights(8) {
        model.set_weight(&n, &Tensor::from_f32(&s, v).unwrap()).unwrap();
    }
    let p = PromptInput { input_ids: text_prompt(1), pixel_values: None, image_grid_thw: vec![] };
    let params = SamplingParams { max_new_tokens: 8, temperature: 0.0, seed: 1, ..Default::default() };
    let want: Vec<Vec<u32>> = generate_group(&model, &p, 2, &params).unwrap().into_iter().map(|g| g.token_ids).collect();
    assert_eq!(v1_out, want);
    // Health reports SERVING.
    let mut h = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", w.addr)).unwrap().connect().await.unwrap(),
    );
    let st = h.check(tonic_health::pb::HealthCheckRequest { service: "onevision.v1.Rollout".into() }).await.unwrap();
    assert_eq!(st.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_worker_groups_finish_on_the_other_and_new_worker_gets_weights() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("onevision=info").try_init();
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = write_model(tmp.path(), 7);
    let coord = coordinator().await;
    let ep = coord.endpoint();
    // Small capacity: each worker holds only a couple of groups, so the kill hits work in flight.
    let mut a = Worker::spawn(&model_dir, Some(&ep), "w-a", &["--capacity", "4"]);
    let b = Worker::spawn(&model_dir, Some(&ep), "w-b", &["--capacity", "4"]);
    wait_registered(&coord, &["w-a", "w-b"]).await;

    let pool = pool_for(&coord, test_pool_config());
    let stats = pool.sync_weights(1, perturbed(8)).await.unwrap();
    assert_eq!(stats.workers_updated, 2, "{stats:?}");
    assert!(stats.workers_failed.is_empty());
    let s = sampling(24);
    let groups: Vec<GroupRequest> = (0..24)
        .map(|i| GroupRequest { prompt_token_ids: text_prompt(i), images: vec![], group_size: 4, seed: i as u64 })
        .collect();

    // Freeze worker A (SIGSTOP) before the batch starts: its session takes groups that it can
    // never finish, so the kill below always hits work in flight. Waiting to *see* A generating
    // raced with the fast decode: A could finish its whole share between two polls.
    signal(&a, "STOP");
    let run = {
        let pool = pool.clone();
        let groups = groups.clone();
        let s = s.clone();
        tokio::spawn(async move { pool.generate(groups, &s).await })
    };
    // B serves everything else meanwhile; the batch cannot end while A holds groups.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!run.is_finished(), "the batch finished although the frozen worker A held groups");
    a.kill();
    let results = run.await.unwrap().expect("the pool finishes every group on the remaining worker");
    assert_eq!(results.len(), groups.len());
    let retried = results.iter().filter(|r| r.attempts > 1).count();
    assert!(retried >= 1, "groups in flight on the killed worker must have been retried");
    for r in results.iter().filter(|r| r.attempts > 1) {
        assert_eq!(r.worker_id, "w-b");
    }
    // Every group: G completions from version 1, equal to the local model with those weights.
    let mut model = load(&model_dir);
    for (n, sh, v) in random_weights(8) {
        model.set_weight(&n, &Tensor::from_f32(&sh, v).unwrap()).unwrap();
    }
    for (g, r) in groups.iter().zip(&results) {
        assert!(r.completions.iter().all(|c| c.model_version == 1));
        let p = PromptInput { input_ids: g.prompt_token_ids.clone(), pixel_values: None, image_grid_thw: vec![] };
        let want = generate_group(&model, &p, 4, &model_params(&s, g.seed)).unwrap();
        let got: Vec<&Vec<u32>> = r.completions.iter().map(|c| &c.token_ids).collect();
        let want: Vec<&Vec<u32>> = want.iter().map(|w| &w.token_ids).collect();
        assert_eq!(got, want, "retried or not, a group is reproducible from its seed");
    }

    // A worker added mid-run gets version 1 before its first group, and gets work.
    let c = Worker::spawn(&model_dir, Some(&ep), "w-c", &["--capacity", "16"]);
    wait_registered(&coord, &["w-c"]).await;
    let s = sampling(48);
    let more: Vec<GroupRequest> = (0..32)
        .map(|i| GroupRequest { prompt_token_ids: text_prompt(i), images: vec![], group_size: 4, seed: 100 + i as u64 })
        .collect();
    let results = pool.generate(more, &s).await.unwrap();
    let on_c = results.iter().filter(|r| r.worker_id == "w-c").count();
    let ws = pool.workers().await.unwrap();
    let who: Vec<(&str, u32)> = results.iter().map(|r| (r.worker_id.as_str(), r.attempts)).collect();
    assert!(on_c >= 1, "the new worker received no work: {who:?}, workers {ws:?}");
    assert!(results.iter().all(|r| r.completions.iter().all(|c| c.model_version == 1)));
    let mut cc = c.client().await;
    assert_eq!(cc.info(v1::InfoRequest {}).await.unwrap().into_inner().model_version, 1);
    let ws = pool.workers().await.unwrap();
    assert!(ws.iter().any(|w| w.worker_id == "w-c" && w.model_version == 1), "{ws:?}");
    drop(b);
}

/// A worker that hangs without dying (SIGSTOP: a frozen node, a partition) never answers: its
/// groups are given up after `group_timeout` and finish on the other worker, and the batch still
/// equals what the local model generates from the same seeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_worker_times_out_and_its_groups_finish_on_the_other() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = write_model(tmp.path(), 7);
    let a = Worker::spawn(&model_dir, None, "w-frozen", &["--capacity", "4"]);
    let b = Worker::spawn(&model_dir, None, "w-live", &["--capacity", "4"]);
    // The deadline sits far above group_timeout but below HTTP/2 keep-alive's ~30 s, the only
    // other thing that would end a wait on a frozen peer.
    let cfg = PoolConfig { group_timeout: Duration::from_secs(2), deadline: Duration::from_secs(20), ..test_pool_config() };
    let pool = RolloutPool::new(WorkerSource::Static(vec![a.addr.clone(), b.addr.clone()]), cfg);
    let st = pool.sync_weights(1, perturbed(6)).await.unwrap();
    assert_eq!(st.workers_updated, 2, "{st:?}");
    signal(&a, "STOP");
    let s = sampling(12);
    let groups: Vec<GroupRequest> = (0..8)
        .map(|i| GroupRequest { prompt_token_ids: text_prompt(i), images: vec![], group_size: 4, seed: 50 + i as u64 })
        .collect();
    let results = pool.generate(groups.clone(), &s).await.expect("the live worker finishes the frozen one's groups");
    signal(&a, "CONT");
    // Static workers are keyed by address.
    assert!(results.iter().all(|r| r.worker_id == b.addr), "{:?}", results.iter().map(|r| &r.worker_id).collect::<Vec<_>>());
    assert!(results.iter().any(|r| r.attempts > 1), "the frozen worker's groups must have been retried");
    let mut model = load(&model_dir);
    for (n, sh, v) in random_weights(6) {
        model.set_weight(&n, &Tensor::from_f32(&sh, v).unwrap()).unwrap();
    }
    for (g, r) in groups.iter().zip(&results) {
        let p = PromptInput { input_ids: g.prompt_token_ids.clone(), ..Default::default() };
        let want = generate_group(&model, &p, 4, &model_params(&s, g.seed)).unwrap();
        let got: Vec<&Vec<u32>> = r.completions.iter().map(|c| &c.token_ids).collect();
        assert_eq!(got, want.iter().map(|w| &w.token_ids).collect::<Vec<_>>());
    }
}

/// Rollout workers outlive trainer gangs. A gang that restarts from an earlier checkpoint
/// (generation 1, step 3) after its predecessor pushed step 5 must still replace the worker's
/// weights: `weights_version` puts the generation above any step. A trainer that reuses plain
/// step numbers below the worker's version never gets completions from the foreign weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weights_versions_stay_monotonic_across_gang_restarts() {
    assert!(weights_version(1, 0) > weights_version(0, u64::MAX));
    assert!(weights_version(2, 3) > weights_version(1, 7) && weights_version(1, 4) > weights_version(1, 3));
    assert_eq!(weights_version(0, 5), 5);
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = write_model(tmp.path(), 7);
    let w = Worker::spawn(&model_dir, None, "w-gen", &[]);
    let pool = || RolloutPool::new(WorkerSource::Static(vec![w.addr.clone()]), test_pool_config());
    // Gang generation 0 got to step 5 (weights seed 5), then died.
    let st = pool().sync_weights(weights_version(0, 5), perturbed(5)).await.unwrap();
    assert_eq!(st.workers_updated, 1, "{st:?}");
    // Generation 1 resumes from the step-3 checkpoint (weights seed 3) with a fresh pool.
    let resumed = pool();
    let st = resumed.sync_weights(weights_version(1, 3), perturbed(3)).await.unwrap();
    assert_eq!((st.workers_updated, st.workers_failed.len()), (1, 0), "{st:?}");
    let s = sampling(10);
    let group = GroupRequest { prompt_token_ids: text_prompt(2), images: vec![], group_size: 2, seed: 4 };
    let r = resumed.generate(vec![group.clone()], &s).await.unwrap();
    let mut model = load(&model_dir);
    for (n, sh, v) in random_weights(3) {
        model.set_weight(&n, &Tensor::from_f32(&sh, v).unwrap()).unwrap();
    }
    let want = generate_group(&model, &PromptInput { input_ids: group.prompt_token_ids.clone(), ..Default::default() }, 2, &model_params(&s, 4)).unwrap();
    for (c, w) in r[0].completions.iter().zip(&want) {
        assert_eq!(c.model_version, weights_version(1, 3));
        assert_eq!(c.token_ids, w.token_ids, "the worker must serve the resumed gang's weights");
    }
    // Plain step 4 < the served version: refused, and the worker is not used with its weights.
    let reuse = RolloutPool::new(
        WorkerSource::Static(vec![w.addr.clone()]),
        PoolConfig { deadline: Duration::from_secs(2), ..test_pool_config() },
    );
    let st = reuse.sync_weights(4, perturbed(4)).await.unwrap();
    assert_eq!(st.workers_updated, 0, "{st:?}");
    assert!(st.workers_failed[0].1.contains("another trainer run"), "{st:?}");
    let e = reuse.generate(vec![group], &s).await.unwrap_err();
    assert!(e.to_string().contains("another trainer run"), "{e}");
}

/// SIGTERM right after the coordinator lists the worker: under load it often lands while the
/// registration's reply is still on the wire, the path that once exited without deregistering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deregisters_and_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = write_model(tmp.path(), 7);
    let coord = coordinator().await;
    let mut w = Worker::spawn(&model_dir, Some(&coord.endpoint()), "w-term", &[]);
    wait_registered(&coord, &["w-term"]).await;
    signal(&w, "TERM");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = w.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "worker did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    // Deregistered at once: the lease (renewed every second, 3 s TTL) would still be live.
    assert!(start.elapsed() < Duration::from_secs(2), "graceful exit took {:?}", start.elapsed());
    assert!(coord.rollout_workers().iter().all(|x| x.worker_id != w.id), "still registered after SIGTERM");
}

#[test]
fn missing_model_is_a_permanent_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_onevision"))
        .args(["rollout", "--model", "/nonexistent/model-dir", "--listen", "127.0.0.1:0"])
        .env_remove("ONEVISION_JOB_SPEC")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(onevision::EXIT_PERMANENT), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
}
