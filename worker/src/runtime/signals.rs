//! SIGINT/SIGTERM → a flag the training loop checks at step boundaries, so a stop always
//! happens between optimizer steps and leaves a resumable checkpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Set once a stop signal arrived.
#[derive(Clone, Default)]
pub struct StopFlag {
    flag: Arc<AtomicBool>,
    why: Arc<Mutex<Option<String>>>,
}

impl StopFlag {
    pub fn new() -> Self {
        Self::default()
    }

    /// Listens for SIGINT and SIGTERM on `rt` (the process keeps running; the loop decides).
    pub fn install(rt: &tokio::runtime::Runtime) -> Self {
        let s = StopFlag::new();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            for (kind, name) in [(SignalKind::interrupt(), "SIGINT"), (SignalKind::terminate(), "SIGTERM")] {
                let s2 = s.clone();
                let _guard = rt.enter();
                match signal(kind) {
                    Ok(mut sig) => {
                        rt.spawn(async move {
                            if sig.recv().await.is_some() {
                                tracing::warn!("{name} received: stopping after the current step");
                                s2.set(name);
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot install the {name} handler"),
                }
            }
        }
        s
    }

    pub fn set(&self, why: &str) {
        if let Ok(mut w) = self.why.lock() {
            w.get_or_insert_with(|| why.to_string());
        }
        self.flag.store(true, Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> String {
        self.why.lock().ok().and_then(|w| w.clone()).unwrap_or_else(|| "stop requested".into())
    }
}
