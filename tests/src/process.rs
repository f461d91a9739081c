//! Building workspace binaries and running them in the background with a log file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{io_err, workspace_root, Error, Result};

static BUILT: Mutex<Option<HashMap<(String, String), PathBuf>>> = Mutex::new(None);

/// Path of binary `bin` of workspace package `package`, built with `cargo build -p` (once per
/// test binary) into the same target dir and profile as the running test, so tests always run
/// the current source. `CARGO_BIN_EXE_*` only covers the test's own package; this covers all.
pub fn workspace_binary(package: &str, bin: &str) -> Result<PathBuf> {
    // Binary names are unique in the workspace; `package` names the owner in messages.
    let key = (package.to_string(), bin.to_string());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = built.get_or_insert_with(HashMap::new).get(&key) {
        return Ok(p.clone());
    }
    // Test executables live in <target>/<profile>/deps/; binaries in <target>/<profile>/.
    let exe = std::env::current_exe().map_err(io_err("current_exe"))?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| {
            if deps.ends_with("deps") {
                deps.parent()
            } else {
                Some(deps)
            }
        })
        .ok_or_else(|| {
            Error::Other(format!(
                "cannot derive the target dir from {}",
                exe.display()
            ))
        })?
        .to_path_buf();
    let profile = profile_dir
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("debug")
        .to_string();
    let target_dir = profile_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| profile_dir.clone());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace_root())
        // `--workspace` (rather than `-p`): features resolve as in `cargo test --workspace`
        // (what CI runs), so the dependencies it already built are reused, not rebuilt.
        .args(["build", "--quiet", "--workspace", "--bin", bin])
        .env("CARGO_TARGET_DIR", &target_dir);
    // `cargo test` gives the test process package variables (CARGO_MANIFEST_DIR, CARGO_PKG_*,
    // ...). Build scripts such as ring's declare `rerun-if-env-changed` on them, so passing them
    // on would make this build and the next `cargo test` rebuild each other's dependencies.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let from_cargo_test = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            );
        if from_cargo_test {
            cmd.env_remove(key);
        }
    }
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(PathBuf::from(&cargo)))?;
    if !out.status.success() {
        return Err(Error::Command {
            what: format!("cargo build --workspace --bin {bin} (package {package})"),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let path = profile_dir.join(bin);
    if !path.is_file() {
        return Err(Error::Other(format!(
            "cargo built {package} but {} does not exist",
            path.display()
        )));
    }
    built
        .get_or_insert_with(HashMap::new)
        .insert(key, path.clone());
    Ok(path)
}

/// Lines of a process's log quoted in a stop error.
const LOG_TAIL_LINES: usize = 40;

/// A child process whose stdout and stderr go to a log file. Its stdin is a pipe that stays
/// open while this handle lives: programs that watch stdin (the node agent does) shut down
/// cleanly when the test process dies. Dropping the handle stops the process.
pub struct BackgroundProcess {
    name: String,
    child: Mutex<Child>,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl BackgroundProcess {
    /// Spawns `cmd` with output appended to `log` (created with its parent directories).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<BackgroundProcess> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_err(log))?;
        let file2 = file.try_clone().map_err(io_err(log))?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(file2))
            .spawn()
            .map_err(|e| Error::Command {
                what: format!("starting {name} ({cmd:?})"),
                detail: e.to_string(),
            })?;
        let stdin = child.stdin.take();
        eprintln!(
            "[onevision-tests] started {name} (pid {}), log: {}",
            child.id(),
            log.display()
        );
        Ok(BackgroundProcess {
            name: name.to_string(),
            child: Mutex::new(child),
            stdin,
            log: log.to_path_buf(),
        })
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, on lines of their own after a header: the log file lives in
    /// a temporary directory that is gone by the time anyone reads a CI failure.
    fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(n)..];
        format!(
            "\n--- last {} lines of the log ---\n{}",
            tail.len(),
            tail.join("\n")
        )
    }

    pub fn pid(&self) -> u32 {
        self.lock().id()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.lock().try_wait().ok().flatten()
    }

    /// SIGTERM (and stdin closed), then SIGKILL after `grace`. Returns an error if the process
    /// had already exited unsuccessfully before being asked to stop (it crashed).
    pub async fn stop_gracefully(&mut self, grace: Duration) -> Result<()> {
        if let Some(status) = self.exited() {
            self.stdin = None;
            return if status.success() {
                Ok(())
            } else {
                Err(Error::Other(format!(
                    "{} had exited with {status}; log: {}{}",
                    self.name,
                    self.log.display(),
                    self.log_tail(LOG_TAIL_LINES)
                )))
            };
        }
        self.stdin = None;
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut child = self.lock();
        let _ = child.kill();
        let _ = child.wait();
        Err(Error::Other(format!(
            "{} ignored SIGTERM for {grace:?} and was killed; log: {}{}",
            self.name,
            self.log.display(),
            self.log_tail(LOG_TAIL_LINES)
        )))
    }

    /// Sends SIGKILL immediately (simulates a crash).
    pub fn kill(&mut self) {
        let mut child = self.lock();
        let _ = child.kill();
        let _ = child.wait();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for BackgroundProcess {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        self.stdin = None;
        signal(self.pid(), libc::SIGTERM);
        // Blocking wait is fine here: drop runs at the end of a test.
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}
