//! The run's picture: the loss over steps with every fault, rollback and checkpoint marked, as an SVG file
//! in the run directory (`loss.svg`), drawn from what the run wrote (`metrics.jsonl`, `events.jsonl`).
//!
//! Steps that a rollback or a restart later re-ran are drawn in grey; the history that stands is drawn in
//! blue, held-out evaluations as orange dots. Committed checkpoints are green ticks along the bottom; each
//! fault is a red dashed line at the step it was detected, labelled with its kind; each rollback is a purple
//! arc back to the step it resumed from. The SVG is written by hand (a few primitives), so it needs no font
//! or rendering library and opens in any browser.

use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const W: f64 = 960.0;
const H: f64 = 440.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 48.0;
const BOTTOM: f64 = 56.0;

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Most training-loss points drawn; a longer run's are thinned to about this many.
pub const MAX_LOSS_POINTS: usize = 20_000;

/// The records of `metrics.jsonl` the picture needs, read a line at a time: every evaluation and checkpoint
/// record, and at most about [`MAX_LOSS_POINTS`] loss records (every k-th, plus the first and last of each
/// run of steps, so that rollbacks and restarts stay where they were). A weeks-long run's file (a million
/// lines) would otherwise be parsed whole into memory at the end of the run: 1.4 GB.
fn metrics_for_plot(path: &Path) -> Vec<Value> {
    use std::io::BufRead;
    let open = || std::fs::File::open(path).map(std::io::BufReader::new);
    let Ok(total) = open().map(|r| r.lines().count()) else { return vec![] };
    let every = total.div_ceil(MAX_LOSS_POINTS).max(1);
    let Ok(reader) = open() else { return vec![] };
    let step_of = |v: &Value| v.get("step").and_then(Value::as_f64);
    let (mut out, mut held, mut prev): (Vec<Value>, Option<Value>, Option<f64>) = (vec![], None, None);
    for (i, line) in reader.lines().map_while(Result::ok).enumerate() {
        let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
        if v.get("loss").is_none() {
            out.push(v); // evaluations and checkpoints: few, all kept
            continue;
        }
        let step = step_of(&v);
        let restarts = matches!((prev, step), (Some(p), Some(s)) if s <= p);
        prev = step;
        if restarts {
            out.extend(held.take()); // the last point before the step went back
        }
        if i % every == 0 || restarts {
            out.push(v);
            held = None;
        } else {
            held = Some(v);
        }
    }
    out.extend(held);
    out
}

/// A fault as drawn: the step it was detected at, what it was, and where the run resumed.
struct Mark {
    step: f64,
    label: String,
    resumed: Option<f64>,
}

/// Draws `run_dir/loss.svg` from the run's records and returns its path.
///
/// # Errors
/// The file cannot be written, or the run has no loss records yet.
pub fn write_loss_svg(run_dir: &Path) -> std::io::Result<PathBuf> {
    let metrics = metrics_for_plot(&run_dir.join("metrics.jsonl"));
    let events = lines(&run_dir.join("events.jsonl"));
    let svg = render(&metrics, &events, &run_dir.display().to_string())
        .ok_or_else(|| std::io::Error::other("no loss records to plot"))?;
    let path = run_dir.join("loss.svg");
    std::fs::write(&path, svg)?;
    Ok(path)
}

/// The SVG for these records (`None` without loss records).
pub fn render(metrics: &[Value], events: &[Value], title: &str) -> Option<String> {
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
    // Loss records in file order, cut into segments where the step goes back (a rollback or restart).
    let mut segments: Vec<Vec<(f64, f64)>> = vec![];
    for v in metrics {
        if let (Some(step), Some(loss)) = (num(v, "step"), num(v, "loss")) {
            match segments.last_mut() {
                Some(seg) if seg.last().is_some_and(|&(s, _)| step > s) => seg.push((step, loss)),
                _ => segments.push(vec![(step, loss)]),
            }
        }
    }
    if segments.is_empty() {
        return None;
    }
    let evals: Vec<(f64, f64)> = metrics.iter().filter_map(|v| Some((num(v, "step")?, num(v, "eval_loss")?))).collect();
    let checkpoints: Vec<f64> = metrics
        .iter()
        .filter(|v| v.get("checkpoint").and_then(Value::as_str) == Some("committed"))
        .filter_map(|v| num(v, "step"))
        .collect();
    let mut marks: Vec<Mark> = vec![];
    for e in events {
        match e.get("event").and_then(Value::as_str) {
            Some("fault") => marks.push(Mark {
                step: num(e, "last_step").unwrap_or(0.0),
                label: e.get("kind").and_then(Value::as_str).unwrap_or("fault").to_string(),
                resumed: None,
            }),
            Some("spike") => {
                // The ledger knows the exact step; it refines the fault mark logged just before it.
                let l = &e["ledger"];
                if let (Some(step), Some(m)) = (num(l, "step"), marks.last_mut()) {
                    m.step = step + 1.0;
                }
            }
            Some("restart") => {
                if let Some(m) = marks.last_mut() {
                    m.resumed = num(e, "resume_from_step");
                }
            }
            // Where a restarted gang really resumed (a commit can land while it restarts).
            Some("resumed") if e.get("lost_steps").is_some() => {
                if let Some(m) = marks.last_mut() {
                    m.resumed = num(e, "step");
                }
            }
            Some("preempted") => {
                marks.push(Mark { step: num(e, "steps").unwrap_or(0.0), label: "preempted".into(), resumed: None })
            }
            _ => {}
        }
    }

    // A point is superseded when a later segment re-ran its step.
    let firsts: Vec<f64> = segments.iter().map(|s| s[0].0).collect();
    let superseded = |i: usize, step: f64| firsts[i + 1..].iter().any(|&f| f <= step);
    let all: Vec<f64> = segments.iter().flatten().map(|&(_, l)| l).filter(|l| l.is_finite()).collect();
    let standing: Vec<f64> = segments
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.iter().filter(move |&&(st, _)| !superseded(i, st)).map(|&(_, l)| l))
        .filter(|l| l.is_finite())
        .collect();
    let max_step = segments.iter().flatten().map(|&(s, _)| s).fold(1.0, f64::max);
    let lo =
        all.iter().copied().fold(f64::INFINITY, f64::min).min(evals.iter().map(|e| e.1).fold(f64::INFINITY, f64::min));
    // Spikes can be orders of magnitude above the curve: the axis follows the standing history, and higher
    // points are drawn clipped at the top.
    let hi_standing = standing.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let hi_all = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let hi = if hi_all > 2.0 * hi_standing { hi_standing * 1.3 } else { hi_all };
    let (lo, hi) =
        if (hi - lo).abs() < 1e-9 { (lo - 1.0, hi + 1.0) } else { (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)) };
    let x = |s: f64| LEFT + (W - LEFT - RIGHT) * s / max_step;
    let y = |l: f64| {
        let l = if l.is_finite() { l.clamp(lo, hi) } else { hi };
        TOP + (H - TOP - BOTTOM) * (hi - l) / (hi - lo)
    };

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{LEFT}" y="20" font-size="15">Loss over steps: {}</text>"#, escape(title));
    // Axes and ticks.
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
    let _ = writeln!(out, r##"<path d="M{x0} {y0} V{y1} H{x1}" stroke="#333" fill="none"/>"##);
    for k in 0..=5 {
        let s = max_step * k as f64 / 5.0;
        let l = lo + (hi - lo) * k as f64 / 5.0;
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#333">{:.0}</text>"##,
            x(s),
            y1 + 16.0,
            s
        );
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#333">{:.3}</text>"##,
            x0 - 6.0,
            y(l) + 4.0,
            l
        );
        let _ = writeln!(out, r##"<path d="M{x0} {:.1} H{x1}" stroke="#eee"/>"##, y(l));
    }
    let _ = writeln!(out, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">step</text>"#, (x0 + x1) / 2.0, y1 + 30.0);
    // Checkpoints.
    for &c in &checkpoints {
        let _ = writeln!(out, r##"<path d="M{:.1} {y1} l-4 8 h8 z" fill="#2a2"/>"##, x(c));
    }
    // Faults and rollbacks.
    for (k, m) in marks.iter().enumerate() {
        let _ = writeln!(out, r##"<path d="M{:.1} {y0} V{y1}" stroke="#d22" stroke-dasharray="4 3"/>"##, x(m.step));
        // Labels of neighbouring faults take turns in three rows so they do not overlap.
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" fill="#d22" font-size="11">{}</text>"##,
            x(m.step) + 3.0,
            y0 + 32.0 + 13.0 * (k % 3) as f64,
            escape(&m.label)
        );
        if let Some(r) = m.resumed {
            let (a, b) = (x(m.step), x(r));
            let _ = writeln!(
                out,
                r##"<path d="M{a:.1} {:.1} Q{:.1} {:.1} {b:.1} {:.1}" stroke="#82c" fill="none" marker-end="url(#arrow)"/>"##,
                y0 + 18.0,
                (a + b) / 2.0,
                y0 - 10.0,
                y0 + 18.0
            );
        }
    }
    let _ = writeln!(
        out,
        r##"<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="6" refY="3" orient="auto"><path d="M0 0 L6 3 L0 6 z" fill="#82c"/></marker></defs>"##
    );
    // Loss: superseded steps in grey, the standing history in blue.
    for (i, seg) in segments.iter().enumerate() {
        for (colour, keep) in [("#bbb", true), ("#1f5fbf", false)] {
            let mut d = String::new();
            let mut pen = false;
            for &(s, l) in seg {
                if superseded(i, s) == keep {
                    let _ = write!(d, "{}{:.1} {:.1} ", if pen { "L" } else { "M" }, x(s), y(l));
                    pen = true;
                } else {
                    pen = false;
                }
            }
            if !d.is_empty() {
                let _ = writeln!(out, r#"<path d="{d}" stroke="{colour}" stroke-width="1.5" fill="none"/>"#);
            }
        }
    }
    for &(s, l) in &evals {
        let _ = writeln!(out, r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#e80"/>"##, x(s), y(l));
    }
    // Legend.
    let items = [
        ("#1f5fbf", "loss (standing history)"),
        ("#bbb", "loss (re-run after a rollback)"),
        ("#e80", "held-out loss"),
        ("#2a2", "checkpoint committed"),
        ("#d22", "fault detected"),
        ("#82c", "rolled back to"),
    ];
    let mut lx = x0;
    for (colour, text) in items {
        let _ = writeln!(out, r#"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{colour}"/>"#, H - 20.0);
        let _ = writeln!(out, r#"<text x="{:.1}" y="{:.1}" font-size="11">{text}</text>"#, lx + 14.0, H - 11.0);
        lx += 30.0 + 6.0 * text.len() as f64;
    }
    out.push_str("</svg>\n");
    Some(out)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_long_runs_metrics_are_thinned_for_the_picture_keeping_restarts_evaluations_and_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut text = String::new();
        // 60,000 steps, a restart back to step 50,000, then on to 110,000: 120,000 loss lines.
        for step in (1..=60_000).chain(50_001..=110_000) {
            text.push_str(&format!("{{\"step\":{step},\"loss\":{}}}\n", 1.0 + 1.0 / step as f64));
            if step % 1000 == 0 {
                text.push_str(&format!("{{\"step\":{step},\"eval_loss\":1.5}}\n"));
                text.push_str(&format!("{{\"checkpoint\":\"committed\",\"step\":{step}}}\n"));
            }
        }
        std::fs::write(&path, text).unwrap();
        let kept = metrics_for_plot(&path);
        let steps = |key: &str| -> Vec<u64> {
            kept.iter().filter(|v| v.get(key).is_some()).map(|v| v["step"].as_u64().unwrap()).collect()
        };
        let losses = steps("loss");
        assert!(losses.len() <= MAX_LOSS_POINTS + 4, "{} loss points", losses.len());
        assert!(losses.len() >= MAX_LOSS_POINTS / 2, "{} loss points", losses.len());
        // The run of steps still goes back where the restart was, from the last step before it.
        let back = losses.windows(2).position(|w| w[1] <= w[0]).expect("the restart is kept");
        assert_eq!((losses[back], losses[back + 1]), (60_000, 50_001));
        assert_eq!(losses.last(), Some(&110_000));
        assert_eq!(steps("eval_loss").len(), 120, "every evaluation");
        assert_eq!(kept.iter().filter(|v| v.get("checkpoint").is_some()).count(), 120, "every checkpoint");
        assert!(render(&kept, &[], "long").is_some());
    }

    #[test]
    fn a_rolled_back_run_draws_both_histories_the_fault_and_the_checkpoints() {
        let mut metrics: Vec<Value> = (1..=10).map(|s| json!({"step": s, "loss": 5.0 - 0.1 * s as f64})).collect();
        metrics.push(json!({"checkpoint": "committed", "step": 5}));
        metrics.extend((6..=12).map(|s| json!({"step": s, "loss": 4.6 - 0.1 * s as f64})));
        metrics.push(json!({"step": 12, "eval_loss": 3.5}));
        let events = vec![
            json!({"event": "fault", "kind": "hung", "last_step": 10}),
            json!({"event": "restart", "resume_from_step": 5}),
        ];
        let svg = render(&metrics, &events, "run <1>").unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("#bbb") && svg.contains("#1f5fbf"), "both histories drawn");
        assert!(svg.contains(">hung</text>") && svg.contains("url(#arrow)"), "the fault and its rollback");
        assert!(svg.contains("fill=\"#2a2\""), "the checkpoint");
        assert!(svg.contains("run &lt;1&gt;"), "the title is escaped");
        assert_eq!(render(&[], &events, "empty"), None);
    }
}
