//! Two nodes on loopback: two `tessera launch` processes, `--nnodes 2`, one rank each, sharing a run
//! directory as nodes share a file system. Node 0's launcher supervises the whole run and node 1's is its
//! agent: a rank lost on either node is replaced by its own node's launcher, the survivors reset in place,
//! and the run ends with the weights of a run that never failed. A preemption signal on any node stops the
//! whole run at a common checkpoint; a node's launcher that goes away stops it with a clear message and no
//! orphans; nodes that disagree are refused before anything starts.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tessera::data::TokenizerKind;

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

/// World 2 with ZeRO-2 on the tiny preset, a checkpoint every 5 steps, a 3 s hang timeout.
fn config(corpus: &Path, run_dir: &Path, steps: u64) -> PathBuf {
    config_with(corpus, run_dir, steps, "")
}

/// As [`config`], with `extra` TOML at the end.
fn config_with(corpus: &Path, run_dir: &Path, steps: u64, extra: &str) -> PathBuf {
    let path = run_dir.with_extension("toml");
    let text = format!(
        "run_dir = {:?}\nseed = 5\n[model]\npreset = \"tiny\"\n[data]\npath = {:?}\neval_fraction = 0.02\n[train]\nsteps = {steps}\nbatch_size = 8\nmicro_batch = 2\nlr = 3e-3\nwarmup_steps = 2\nlog_every = 1\neval_every = 0\nzero = 2\ncheckpoint_every = 5\n[launch]\nhang_timeout_s = 3\nmax_restarts = 2\nrdzv_timeout_s = 60\n{extra}",
        run_dir.display().to_string(),
        corpus.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Node `node` of two, meeting at `port`, with extra arguments, in working directory `cwd`.
fn node(cfg: &Path, node: usize, port: u16, extra: &[&str], cwd: &Path) -> Child {
    tessera()
        .current_dir(cwd)
        .arg("launch")
        .arg("--config")
        .arg(cfg)
        .args(["--nproc", "1", "--nnodes", "2", "--node-rank", &node.to_string()])
        .args(["--rdzv", &format!("127.0.0.1:{port}")])
        .args(extra)
        .env("TESSERA_RUN_SECRET", "multinode-test-secret")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Both nodes' launchers.
struct TwoNodes {
    n0: Child,
    n1: Child,
}

impl TwoNodes {
    fn start(cfg: &Path, extra1: &[&str]) -> TwoNodes {
        let here = std::env::current_dir().unwrap();
        Self::start_in(cfg, [&[], extra1], [&here, &here])
    }

    /// As [`TwoNodes::start`], with extra arguments for each node, each launcher in its own working directory.
    fn start_in(cfg: &Path, extra: [&[&str]; 2], cwd: [&Path; 2]) -> TwoNodes {
        let port = common::moto::free_port();
        // Node 1 first: its launcher waits for node 0's, as on a cluster where nodes start in any order.
        let n1 = node(cfg, 1, port, extra[1], cwd[1]);
        let n0 = node(cfg, 0, port, extra[0], cwd[0]);
        TwoNodes { n0, n1 }
    }

    /// Both outcomes, node 0's first; fails the test if either runs past two minutes.
    fn wait(self) -> (Output, Output) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut children = [self.n0, self.n1];
        while !children.iter_mut().all(|c| c.try_wait().unwrap().is_some()) {
            if Instant::now() > deadline {
                for c in &mut children {
                    let _ = c.kill();
                }
                panic!("the two launchers did not end within 120 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let [n0, n1] = children;
        (n0.wait_with_output().unwrap(), n1.wait_with_output().unwrap())
    }

    /// The pid of rank `rank`'s worker, whichever launcher started it.
    fn rank_pid(&self, rank: usize) -> i32 {
        [&self.n0, &self.n1]
            .iter()
            .flat_map(|c| common::children(c.id()))
            .find(|&p| common::environ(p).contains(&format!("TESSERA_RANK={rank}")))
            .unwrap_or_else(|| panic!("rank {rank} is running")) as i32
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn wait_for_checkpoint(run: &Path, step: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let manifest = run.join(format!("checkpoints/step-{step:09}/manifest.json"));
    while !manifest.exists() {
        assert!(Instant::now() < deadline, "no checkpoint after step {step}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn events(run_dir: &Path) -> Vec<Value> {
    common::read_lines(&run_dir.join("events.jsonl")).iter().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn event<'a>(events: &'a [Value], name: &str) -> &'a Value {
    events.iter().find(|e| e["event"] == name).unwrap_or_else(|| panic!("no {name} event in {events:?}"))
}

fn assert_same_weights(a: &Path, b: &Path) {
    let read = |d: &Path| {
        let mut w = tch::Tensor::read_safetensors(d.join("model.safetensors")).unwrap();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        w
    };
    for ((n, x), (_, y)) in read(a).iter().zip(&read(b)) {
        assert!(x.equal(y), "{n} differs between {} and {}", a.display(), b.display());
    }
}

/// The reference: one node with both ranks, never failing.
fn one_node(tmp: &Path, corpus: &Path, steps: u64) -> PathBuf {
    let dir = tmp.join("one-node");
    let out = tessera()
        .arg("launch")
        .arg("--config")
        .arg(config(corpus, &dir, steps))
        .args(["--nproc", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    dir
}

fn corpus(tmp: &Path) -> PathBuf {
    let corpus = tmp.join("corpus");
    common::stdlib_corpus(&corpus, 4, TokenizerKind::Byte);
    corpus
}

fn assert_no_workers_left(nodes: &[u32]) {
    for &pid in nodes {
        let left: Vec<u32> = common::children(pid).into_iter().filter(|&p| !common::is_zombie(p)).collect();
        assert!(left.is_empty(), "launcher {pid} left workers behind: {left:?}");
    }
}

#[test]
fn two_nodes_train_to_the_weights_of_one_node_with_both_ranks_and_both_launchers_exit_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let reference = one_node(tmp.path(), &corpus, 20);

    let run = tmp.path().join("two-nodes");
    let (n0, n1) = TwoNodes::start(&config(&corpus, &run, 20), &[]).wait();
    assert!(n0.status.success(), "{}", text(&n0));
    assert!(n1.status.success(), "node 1 ends as node 0 does: {}", text(&n1));
    for o in [&n0, &n1] {
        assert!(String::from_utf8_lossy(&o.stdout).contains("all ranks finished 20 steps"), "{}", text(o));
    }
    assert_same_weights(&reference, &run);
}

#[test]
fn a_rank_killed_on_the_second_node_is_replaced_there_and_the_run_ends_with_the_weights_of_a_run_that_never_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let reference = one_node(tmp.path(), &corpus, 30);

    let run = tmp.path().join("killed");
    let nodes = TwoNodes::start(&config(&corpus, &run, 30), &[]);
    wait_for_checkpoint(&run, 10);
    unsafe { libc::kill(nodes.rank_pid(1), libc::SIGKILL) };
    let (n0, n1) = nodes.wait();
    assert!(n0.status.success() && n1.status.success(), "{}\n---\n{}", text(&n0), text(&n1));
    assert!(text(&n0).contains("rank 1 failed"), "{}", text(&n0));
    assert!(text(&n1).contains("gang 2 forms; replacing rank(s) [1]"), "{}", text(&n1));

    assert_same_weights(&reference, &run);
    let ev = events(&run);
    assert_eq!(event(&ev, "fault")["ranks"], serde_json::json!([1]));
    let restart = event(&ev, "restart");
    assert_eq!(restart["replaced"], serde_json::json!([1]), "{restart}");
    assert_eq!(restart["reset_in_place"], serde_json::json!([0]), "node 0's rank kept its process: {restart}");
    assert_eq!(event(&ev, "finished")["steps"], 30);
}

#[test]
fn with_checkpoints_in_object_storage_a_rank_killed_on_the_second_node_is_replaced_and_resumes_from_the_bucket() {
    let moto = common::moto::Moto::start();
    moto.create_bucket("ckpts");
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let reference = one_node(tmp.path(), &corpus, 30);

    let options: Vec<String> =
        common::moto::s3_options(&moto.endpoint()).iter().map(|(k, v)| format!("{k} = {v:?}")).collect();
    let extra =
        format!("[checkpoint]\ndir = \"s3://ckpts/two-nodes\"\nstorage_options = {{ {} }}\n", options.join(", "));
    let run = tmp.path().join("bucket");
    let nodes = TwoNodes::start(&config_with(&corpus, &run, 30, &extra), &[]);
    let store =
        tessera::ckpt::store::CkptStore::open("s3://ckpts/two-nodes", &common::moto::s3_options(&moto.endpoint()))
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !store.list().unwrap().iter().any(|c| c.committed && c.step == 10) {
        assert!(Instant::now() < deadline, "no checkpoint after step 10 in the bucket");
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(nodes.rank_pid(1), libc::SIGKILL) };
    let (n0, n1) = nodes.wait();
    assert!(n0.status.success() && n1.status.success(), "{}\n---\n{}", text(&n0), text(&n1));
    assert!(text(&n0).contains("restarting the gang from its checkpoint after step"), "{}", text(&n0));
    assert!(text(&n0).contains("resumed from s3://ckpts/two-nodes/step-"), "{}", text(&n0));
    assert_same_weights(&reference, &run);
}

#[test]
fn when_node_0_loses_its_rank_the_rank_on_node_1_resets_in_place_and_joins_the_next_gang() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("killed-on-0");
    let nodes = TwoNodes::start(&config(&corpus, &run, 30), &[]);
    wait_for_checkpoint(&run, 10);
    unsafe { libc::kill(nodes.rank_pid(0), libc::SIGKILL) };
    let (n0, n1) = nodes.wait();
    assert!(n0.status.success() && n1.status.success(), "{}\n---\n{}", text(&n0), text(&n1));
    let t1 = text(&n1);
    assert!(t1.contains("rank 1: reset in place") && t1.contains("its ranks reset in place"), "{t1}");
    let ev = events(&run);
    assert_eq!(event(&ev, "restart")["replaced"], serde_json::json!([0]));
    assert_eq!(event(&ev, "finished")["steps"], 30);
}

#[test]
fn a_survivor_on_the_second_node_that_cannot_reset_is_replaced_there_after_the_grace_period() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("stuck-survivor");
    let nodes = TwoNodes::start(&config(&corpus, &run, 30), &[]);
    wait_for_checkpoint(&run, 10);
    // Rank 1 cannot act on its reset (stopped); rank 0's death fails the gang.
    unsafe { libc::kill(nodes.rank_pid(1), libc::SIGSTOP) };
    unsafe { libc::kill(nodes.rank_pid(0), libc::SIGKILL) };
    let (n0, n1) = nodes.wait();
    assert!(n0.status.success() && n1.status.success(), "{}\n---\n{}", text(&n0), text(&n1));
    let ev = events(&run);
    let faults: Vec<&Value> = ev.iter().filter(|e| e["event"] == "fault").collect();
    assert_eq!(faults.len(), 1, "one fault, one restart: {faults:?}");
    assert_eq!(event(&ev, "restart")["replaced"], serde_json::json!([0, 1]), "{ev:?}");
    assert_eq!(event(&ev, "finished")["steps"], 30);
}

#[test]
fn a_stopped_rank_on_the_second_node_is_named_as_hung_killed_by_its_node_and_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("stopped");
    let nodes = TwoNodes::start(&config(&corpus, &run, 30), &[]);
    wait_for_checkpoint(&run, 10);
    let stopped = nodes.rank_pid(1);
    unsafe { libc::kill(stopped, libc::SIGSTOP) };
    let (n0, n1) = nodes.wait();
    assert!(n0.status.success() && n1.status.success(), "{}\n---\n{}", text(&n0), text(&n1));
    let ev = events(&run);
    let fault = event(&ev, "fault");
    assert_eq!((&fault["kind"], &fault["ranks"]), (&serde_json::json!("hung"), &serde_json::json!([1])), "{fault}");
    assert_eq!(event(&ev, "finished")["steps"], 30);
    // Node 1's launcher killed the stopped process (a stopped process cannot act on an abort).
    assert!(std::fs::metadata(format!("/proc/{stopped}")).is_err() || common::is_zombie(stopped as u32));
}

#[test]
fn sigterm_on_the_second_node_preempts_the_whole_run_at_a_common_checkpoint_and_a_rerun_finishes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let reference = one_node(tmp.path(), &corpus, 300);

    let run = tmp.path().join("preempted");
    let cfg = config(&corpus, &run, 300);
    let nodes = TwoNodes::start(&cfg, &[]);
    wait_for_checkpoint(&run, 10);
    unsafe { libc::kill(nodes.n1.id() as i32, libc::SIGTERM) };
    let (n0, n1) = nodes.wait();
    assert!(n0.status.success() && n1.status.success(), "{}\n---\n{}", text(&n0), text(&n1));
    for o in [&n0, &n1] {
        assert!(String::from_utf8_lossy(&o.stdout).contains("preempted: stopped after step"), "{}", text(o));
    }
    event(&events(&run), "preempted");

    let (n0, n1) = TwoNodes::start(&cfg, &[]).wait();
    assert!(n0.status.success() && n1.status.success(), "{}\n---\n{}", text(&n0), text(&n1));
    assert_same_weights(&reference, &run);
}

#[test]
fn a_node_whose_launcher_dies_stops_the_run_naming_it_and_no_worker_is_left_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("lost-node");
    let mut nodes = TwoNodes::start(&config(&corpus, &run, 300), &[]);
    wait_for_checkpoint(&run, 10);
    let pids = [nodes.n0.id(), nodes.n1.id()];
    let orphan = nodes.rank_pid(1);
    nodes.n1.kill().unwrap();
    let (n0, _) = nodes.wait();
    assert_eq!(n0.status.code(), Some(1), "{}", text(&n0));
    assert!(text(&n0).contains("node 1's launcher went away"), "{}", text(&n0));
    assert_no_workers_left(&pids[..1]);
    // Node 1's worker lost its gang (node 0 aborted it) and exited by itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(format!("/proc/{orphan}")).is_ok() && !common::is_zombie(orphan as u32) {
        assert!(Instant::now() < deadline, "rank 1's worker outlived its launcher and node 0");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn node_0s_metrics_say_when_each_other_node_was_last_heard_from() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("metrics");
    let addr = format!("127.0.0.1:{}", common::moto::free_port());
    let here = std::env::current_dir().unwrap();
    let nodes = TwoNodes::start_in(&config(&corpus, &run, 300), [&["--metrics-addr", &addr], &[]], [&here, &here]);
    wait_for_checkpoint(&run, 10);
    let m = common::scrape(&addr);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let heard = common::sample(&m, "tessera_node_last_heard_timestamp_seconds", Some(("node", "1")));
    assert!(now - heard < 3.0, "node 1 heard from {:.1} s ago", now - heard);
    unsafe { libc::kill(nodes.n0.id() as i32, libc::SIGTERM) };
    let (n0, n1) = nodes.wait();
    assert!(n0.status.success() && n1.status.success(), "{}\n---\n{}", text(&n0), text(&n1));
}

#[test]
fn a_frozen_node_is_noticed_by_its_silence_and_the_run_stops_naming_it_and_the_node_stops_its_ranks_when_it_thaws() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("frozen-node");
    let mut nodes = TwoNodes::start(&config(&corpus, &run, 300), &[]);
    wait_for_checkpoint(&run, 10);
    let worker = nodes.rank_pid(1);
    let frozen = nodes.n1.id() as i32;
    unsafe { libc::kill(frozen, libc::SIGSTOP) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = nodes.n0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "node 0 did not notice node 1's silence");
        std::thread::sleep(Duration::from_millis(20));
    };
    unsafe { libc::kill(frozen, libc::SIGCONT) };
    let (n0, n1) = nodes.wait();
    assert_eq!((status.code(), n0.status.code()), (Some(1), Some(1)), "{}", text(&n0));
    // The launch's hang timeout (3 s) is the limit on a node's silence too.
    assert!(text(&n0).contains("node 1's launcher went away (no word from it for 3 s"), "{}", text(&n0));
    assert!(!n1.status.success(), "node 1 stops when it thaws: {}", text(&n1));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(format!("/proc/{worker}")).is_ok() && !common::is_zombie(worker as u32) {
        assert!(Instant::now() < deadline, "node 1's rank outlived the run");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nodes_that_do_not_share_the_checkpoint_store_are_refused_before_training_naming_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    // One relative run directory, seen from two working directories: two machines' local disks.
    let disks = [tmp.path().join("disk0"), tmp.path().join("disk1")];
    for d in &disks {
        std::fs::create_dir_all(d).unwrap();
    }
    let cfg = config(&corpus, &tmp.path().join("local"), 20);
    let absolute = std::fs::read_to_string(&cfg).unwrap();
    let relative = absolute
        .replace(&format!("run_dir = {:?}", tmp.path().join("local").display().to_string()), "run_dir = \"run\"");
    assert_ne!(absolute, relative);
    std::fs::write(&cfg, relative).unwrap();

    let (n0, n1) = TwoNodes::start_in(&cfg, [&[], &[]], [&disks[0], &disks[1]]).wait();
    for o in [&n0, &n1] {
        assert_eq!(o.status.code(), Some(2), "{}", text(o));
        let t = text(o);
        assert!(t.contains("node 0 does not see it there") && t.contains("object storage (s3://bucket/run)"), "{t}");
    }
    assert!(!disks[0]
        .join("run/checkpoints")
        .read_dir()
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.path().is_dir()))));
}

#[test]
fn ranks_listening_on_every_interface_are_reached_at_the_address_their_node_joined_from() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("anywhere");
    // The last table of the config is [launch]: this line lands in it.
    let (n0, n1) = TwoNodes::start(&config_with(&corpus, &run, 10, "bind = \"0.0.0.0\"\n"), &[]).wait();
    assert!(n0.status.success() && n1.status.success(), "{}\n---\n{}", text(&n0), text(&n1));
}

#[test]
fn a_node_whose_ranks_would_listen_on_loopback_of_a_real_network_is_refused_naming_launch_bind() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let cfg = config(&corpus, &tmp.path().join("loopback"), 10);
    // 192.0.2.1 (TEST-NET-1) is another machine's address: the check comes before any connection.
    let out = tessera()
        .arg("launch")
        .arg("--config")
        .arg(&cfg)
        .args(["--nproc", "1", "--nnodes", "2", "--node-rank", "1", "--rdzv", "192.0.2.1:29500"])
        .env("TESSERA_RUN_SECRET", "s")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("launch.bind") && t.contains("127.0.0.1 is loopback") && t.contains("0.0.0.0"), "{t}");
}

#[test]
fn nodes_with_different_configs_are_refused_before_training_and_both_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("mismatch");
    let (n0, n1) = TwoNodes::start(&config(&corpus, &run, 20), &["--set", "train.lr=1e-3"]).wait();
    for o in [&n0, &n1] {
        assert_eq!(o.status.code(), Some(2), "{}", text(o));
        assert!(text(o).contains("node 1 and node 0 resolved different configs"), "{}", text(o));
    }
    assert!(!run.join("metrics.jsonl").exists(), "nothing trained");
}
