//! The run's event log: `run_dir/events.jsonl`, one JSON object per line, every fault, decision and recovery
//! the launcher saw, each stamped with `unix_s` (seconds since the Unix epoch). Appended and flushed line by
//! line, so a crash loses at most the line being written.

use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct EventLog {
    path: PathBuf,
}

impl EventLog {
    pub fn new(run_dir: &Path) -> Self {
        EventLog { path: run_dir.join("events.jsonl") }
    }

    /// The spike ledger so far: every `spike` event's entry, oldest first (a restarted launcher continues
    /// the escalation where the previous one left it). Unreadable lines are passed over.
    pub fn spike_ledger(&self) -> Vec<crate::spike::rollback::Entry> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("event").and_then(Value::as_str) == Some("spike"))
            .filter_map(|v| serde_json::from_value(v.get("ledger")?.clone()).ok())
            .collect()
    }

    /// Appends `event` (an object) with its time. A log that cannot be written is reported once per line on
    /// stderr and otherwise ignored: losing a log line must not stop a run.
    pub fn log(&self, event: &str, mut fields: Value) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64());
        if let Value::Object(m) = &mut fields {
            m.insert("unix_s".into(), json!(now.unwrap_or(0.0)));
            m.insert("event".into(), json!(event));
        }
        let line = format!("{fields}\n");
        let written = std::fs::create_dir_all(self.path.parent().unwrap_or(Path::new(".")))
            .and_then(|()| std::fs::OpenOptions::new().create(true).append(true).open(&self.path))
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            crate::say!("tessera launch: cannot write the event log {}: {e}", self.path.display());
        }
    }
}
