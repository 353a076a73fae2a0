//! Continuous client load for tests that change something while traffic
//! flows (a replica turning unready, a config reload): a background thread
//! sends requests one after another on a keep-alive connection and records
//! every outcome, with no hidden retry. If the load thread panics (say, a
//! classifier meets a response it cannot read), the next call on [`Load`]
//! panics with that message, so the test fails for the right reason.
//!
//! ```no_run
//! use meshpatterns_tests::load::Load;
//! let load = Load::start(8080, "/", |r| r.replica().to_string());
//! // ... change something, watch load.count("replica-1") ...
//! let report = load.stop();
//! assert!(report.failures.is_empty(), "{:?}", report.failures);
//! ```

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::client::{Client, Response};

/// Labels a successful response (e.g. by the replica that answered).
pub type Classify = Box<dyn Fn(&Response) -> String + Send>;

#[derive(Default, Debug, Clone)]
pub struct Report {
    /// Responses with status 200, by label.
    pub ok: BTreeMap<String, u64>,
    /// Every request that did not get a 200: status or I/O error, in order.
    pub failures: Vec<String>,
    /// Labels of the successful responses, in order.
    pub sequence: Vec<String>,
}

impl Report {
    pub fn total_ok(&self) -> u64 {
        self.ok.values().sum()
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<Report>>,
    /// The load thread's panic message, if it panicked.
    panicked: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Load {
    /// Send `GET path` to `127.0.0.1:port` back to back (with a 2 ms pause,
    /// to leave CPU to the rest of the test) until [`Load::stop`].
    pub fn start(port: u16, path: &str, classify: impl Fn(&Response) -> String + Send + 'static) -> Load {
        Load::with_headers(port, path, Vec::new(), classify)
    }

    pub fn with_headers(
        port: u16,
        path: &str,
        headers: Vec<(String, String)>,
        classify: impl Fn(&Response) -> String + Send + 'static,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(Report::default()));
        let panicked = Arc::new(Mutex::new(None));
        let (s, r, p, path) = (stop.clone(), report.clone(), panicked.clone(), path.to_string());
        let classify: Classify = Box::new(classify);
        let thread = std::thread::spawn(move || {
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| send_until_stopped(port, &path, &headers, &classify, &s, &r)));
            if let Err(payload) = run {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|m| m.to_string()))
                    .unwrap_or_else(|| "a panic without a message".into());
                *p.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
            }
        });
        Load { stop, report, panicked, thread: Some(thread) }
    }

    /// Panic if the load thread has panicked: its requests stopped, so
    /// nothing the test waits for will happen.
    fn check(&self) {
        if let Some(msg) = self.panicked.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
            panic!("the load thread panicked: {msg}");
        }
    }

    /// A copy of the outcomes so far.
    pub fn snapshot(&self) -> Report {
        self.check();
        self.report.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Successful responses labelled `label` so far.
    pub fn count(&self, label: &str) -> u64 {
        self.check();
        self.report.lock().unwrap_or_else(|e| e.into_inner()).ok.get(label).copied().unwrap_or(0)
    }

    /// Requests completed so far (successful or not).
    pub fn done(&self) -> u64 {
        self.check();
        let r = self.report.lock().unwrap_or_else(|e| e.into_inner());
        r.total_ok() + r.failures.len() as u64
    }

    /// Wait until `n` more requests have completed (at most `timeout`).
    pub fn wait_requests(&self, n: u64, timeout: Duration) {
        let target = self.done() + n;
        crate::wait_for(&format!("{n} more requests under load"), timeout, || (self.done() >= target).then_some(()));
    }

    /// Stop the load and return every outcome; panics if the load thread did.
    pub fn stop(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if let Err(payload) = t.join() {
                std::panic::resume_unwind(payload);
            }
        }
        self.snapshot()
    }
}

/// The load thread's loop: one GET after another until `stop` is set.
fn send_until_stopped(port: u16, path: &str, headers: &[(String, String)], classify: &Classify, stop: &AtomicBool, report: &Mutex<Report>) {
    let mut c = Client::new(port);
    let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    while !stop.load(Ordering::SeqCst) {
        let outcome = c.try_request("GET", path, &hs, b"");
        let mut rep = report.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(resp) if resp.status == 200 => {
                let label = classify(&resp);
                *rep.ok.entry(label.clone()).or_default() += 1;
                rep.sequence.push(label);
            }
            Ok(resp) => rep.failures.push(format!("HTTP {}: {}", resp.status, resp.text())),
            Err(e) => {
                rep.failures.push(format!("I/O error: {e}"));
                c = Client::new(port);
            }
        }
        drop(rep);
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Upstream;

    #[test]
    fn a_panic_in_the_load_thread_fails_the_test_with_its_message() {
        let up = Upstream::start("replica-0");
        let load = Load::start(up.port, "/", |r| {
            assert_eq!(r.replica(), "replica-9", "classifier met an unexpected replica");
            String::new()
        });
        let err = std::panic::catch_unwind(AssertUnwindSafe(|| load.wait_requests(100, Duration::from_secs(10)))).unwrap_err();
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.starts_with("the load thread panicked: ") && msg.contains("classifier met an unexpected replica"), "{msg}");
        let err = std::panic::catch_unwind(AssertUnwindSafe(|| load.stop())).unwrap_err();
        assert!(err.downcast_ref::<String>().is_some_and(|m| m.contains("unexpected replica")));
    }
}
