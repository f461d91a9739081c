//! User rewards computed by an external command speaking JSON lines.
//!
//! Protocol: the command is started once per batch; it reads one JSON object per line on stdin
//! (`{"prompt", "completion", "answer", "meta"}`, a [`RewardRequest`]) and must write exactly one line
//! per request on stdout, in order: either a bare number or `{"reward": number}`. Stdin is closed after
//! the last request. A non-zero exit, a wrong line count, a non-finite value or running past the
//! timeout is an error naming the command.

use crate::{Reward, RewardError, RewardRequest};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Configuration of an external reward command.
#[derive(Debug, Clone)]
pub struct CommandReward {
    /// Name used in the `rewards: [{name, weight}]` spec.
    pub name: String,
    /// Program and arguments (no shell unless the user asks for one, e.g. `["sh", "-c", "…"]`).
    pub argv: Vec<String>,
    /// Wall-clock limit for one batch.
    pub timeout: Duration,
}

impl CommandReward {
    pub fn new(name: impl Into<String>, argv: Vec<String>, timeout: Duration) -> Self {
        Self {
            name: name.into(),
            argv,
            timeout,
        }
    }

    fn cmd(&self) -> String {
        self.argv.join(" ")
    }
}

fn parse_line(line: &str) -> Result<f64, String> {
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("not JSON ({e}): {line:?}"))?;
    let x = match &v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::Object(o) => o.get("reward").and_then(|r| r.as_f64()),
        _ => None,
    }
    .ok_or_else(|| format!("expected a number or {{\"reward\": number}}, got {line:?}"))?;
    if x.is_finite() {
        Ok(x)
    } else {
        Err(format!("non-finite reward in {line:?}"))
    }
}

impl Reward for CommandReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score_batch(&self, batch: &[RewardRequest]) -> Result<Vec<f64>, RewardError> {
        let cmd = self.cmd();
        let (prog, args) = self.argv.split_first().ok_or_else(|| RewardError::Spawn {
            cmd: cmd.clone(),
            msg: "empty command".into(),
        })?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut input = Vec::new();
        for r in batch {
            serde_json::to_writer(&mut input, r).map_err(|e| RewardError::Protocol {
                cmd: cmd.clone(),
                line: 0,
                msg: format!("cannot encode request: {e}"),
            })?;
            input.push(b'\n');
        }
        let mut child = Command::new(prog)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| RewardError::Spawn {
                cmd: cmd.clone(),
                msg: e.to_string(),
            })?;
        // Writer, stdout reader and stderr reader run on their own threads so that a command that
        // answers before reading everything (or fills its stderr pipe) cannot deadlock us.
        let mut stdin = child.stdin.take().expect("piped stdin");
        let writer = std::thread::spawn(move || {
            // A command that exits early closes the pipe; that shows up as a line-count error.
            let _ = stdin.write_all(&input);
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<std::io::Result<String>>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().expect("piped stderr");
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });

        let deadline = Instant::now() + self.timeout;
        let mut out = Vec::with_capacity(batch.len());
        let mut failure: Option<RewardError> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(line)) => {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let n = out.len() + 1;
                    if n > batch.len() {
                        failure = Some(RewardError::Protocol {
                            cmd: cmd.clone(),
                            line: n,
                            msg: format!("more output lines than the {} requests", batch.len()),
                        });
                        break;
                    }
                    match parse_line(&line) {
                        Ok(x) => out.push(x),
                        Err(msg) => {
                            failure = Some(RewardError::Protocol {
                                cmd: cmd.clone(),
                                line: n,
                                msg,
                            });
                            break;
                        }
                    }
                }
                Ok(Err(e)) => {
                    failure = Some(RewardError::Protocol {
                        cmd: cmd.clone(),
                        line: out.len() + 1,
                        msg: e.to_string(),
                    });
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    failure = Some(RewardError::Timeout {
                        cmd: cmd.clone(),
                        timeout: self.timeout,
                        got: out.len(),
                        want: batch.len(),
                    });
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break, // stdout closed
            }
        }
        if let Some(f) = failure {
            // Don't join the pipe threads: a grandchild (e.g. under `sh -c`) may keep the pipes open
            // after the kill, and waiting for it would defeat the timeout. They end when it does.
            let _ = child.kill();
            let _ = child.wait();
            return Err(f);
        }
        let status = child.wait().map_err(|e| RewardError::Spawn {
            cmd: cmd.clone(),
            msg: e.to_string(),
        })?;
        let _ = writer.join();
        let stderr = err_reader.join().unwrap_or_default();
        if !status.success() {
            return Err(RewardError::Exit {
                cmd,
                status: status.to_string(),
                stderr: tail(&stderr),
            });
        }
        if out.len() != batch.len() {
            return Err(RewardError::Protocol {
                cmd,
                line: out.len() + 1,
                msg: format!(
                    "got {} reward lines for {} requests; stderr: {}",
                    out.len(),
                    batch.len(),
                    tail(&stderr)
                ),
            });
        }
        Ok(out)
    }
}

fn tail(s: &str) -> String {
    let t = s.trim();
    let start = t.char_indices().rev().nth(499).map_or(0, |(i, _)| i);
    t[start..].to_string()
}
