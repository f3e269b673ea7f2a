//! Checkpoint foundations without a disk: the retention policy's decisions and invariants, the manifest's
//! JSON form and consistency checks, file verification, and the names used on storage.

use proptest::prelude::*;
use serde_json::json;
use std::collections::BTreeSet;
use tessera::ckpt::manifest::{
    checkpoint_name, format_latest, parse_checkpoint_name, parse_latest, FileEntry, Manifest, ManifestError, FORMAT,
};
use tessera::ckpt::retention::{plan, CheckpointInfo, KeepReason, RetentionAction, RetentionPolicy};

fn info(step: u64, clean: bool, committed: bool) -> CheckpointInfo {
    CheckpointInfo { step, clean, committed }
}

fn deleted(actions: &[RetentionAction]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            RetentionAction::Delete { step } => Some(*step),
            RetentionAction::Keep { .. } => None,
        })
        .collect()
}

fn kept(actions: &[RetentionAction]) -> BTreeSet<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            RetentionAction::Keep { step, .. } => Some(*step),
            RetentionAction::Delete { .. } => None,
        })
        .collect()
}

/// What is left on storage after carrying out `actions`.
fn apply(checkpoints: &[CheckpointInfo], actions: &[RetentionAction]) -> Vec<CheckpointInfo> {
    let gone = deleted(actions);
    checkpoints.iter().filter(|c| !(c.committed && gone.contains(&c.step))).copied().collect()
}

#[test]
fn retention_keeps_the_last_k_committed_checkpoints() {
    let cps: Vec<_> = (1..=6).map(|i| info(i * 100, false, true)).collect();
    let actions = plan(&RetentionPolicy { keep_last: 2, keep_every: None }, &cps);
    assert_eq!(deleted(&actions), vec![100, 200, 300, 400]);
    assert_eq!(
        actions[4..],
        [
            RetentionAction::Keep { step: 500, reason: KeepReason::Recent },
            RetentionAction::Keep { step: 600, reason: KeepReason::Recent }
        ]
    );
}

#[test]
fn retention_keeps_every_mth_checkpoint() {
    let cps: Vec<_> = (1..=10).map(|i| info(i * 100, false, true)).collect();
    let actions = plan(&RetentionPolicy { keep_last: 1, keep_every: Some(300) }, &cps);
    assert_eq!(kept(&actions), BTreeSet::from([300, 600, 900, 1000]));
    assert!(actions.contains(&RetentionAction::Keep { step: 600, reason: KeepReason::Milestone }));
}

#[test]
fn retention_keeps_the_newest_clean_checkpoint_beyond_the_last_k() {
    // The loss went bad after step 300: the last two checkpoints are not clean, 300 is the rollback target.
    let cps = [
        info(100, true, true),
        info(200, true, true),
        info(300, true, true),
        info(400, false, true),
        info(500, false, true),
    ];
    let actions = plan(&RetentionPolicy { keep_last: 2, keep_every: None }, &cps);
    assert_eq!(deleted(&actions), vec![100, 200], "only the newest clean one is kept beyond K");
    assert!(actions.contains(&RetentionAction::Keep { step: 300, reason: KeepReason::RollbackTarget }));
}

#[test]
fn retention_does_not_take_an_uncommitted_clean_checkpoint_as_the_rollback_target() {
    let cps = [info(100, true, true), info(200, false, true), info(300, true, false), info(400, false, true)];
    let actions = plan(&RetentionPolicy { keep_last: 1, keep_every: None }, &cps);
    assert!(actions.contains(&RetentionAction::Keep { step: 100, reason: KeepReason::RollbackTarget }));
}

#[test]
fn retention_never_deletes_or_even_mentions_uncommitted_checkpoints() {
    let cps = [
        info(100, false, false),
        info(200, false, true),
        info(300, false, false),
        info(400, false, true),
        info(500, false, false),
    ];
    let actions = plan(&RetentionPolicy { keep_last: 1, keep_every: None }, &cps);
    assert_eq!(
        actions,
        vec![RetentionAction::Delete { step: 200 }, RetentionAction::Keep { step: 400, reason: KeepReason::Recent }]
    );
}

#[test]
fn retention_is_idempotent() {
    let cps: Vec<_> = (0..20).map(|i| info(i * 50, i % 3 == 0, i % 7 != 5)).collect();
    let policy = RetentionPolicy { keep_last: 3, keep_every: Some(250) };
    let first = plan(&policy, &cps);
    assert!(!deleted(&first).is_empty(), "the first plan has work to do");
    let again = plan(&policy, &apply(&cps, &first));
    assert_eq!(deleted(&again), Vec::<u64>::new());
    assert_eq!(kept(&again), kept(&first));
}

#[test]
fn retention_actions_come_in_step_order_whatever_the_listing_order() {
    let mut cps: Vec<_> = (1..=8).map(|i| info(i * 10, i == 3, true)).collect();
    let policy = RetentionPolicy { keep_last: 2, keep_every: Some(40) };
    let sorted = plan(&policy, &cps);
    cps.reverse();
    cps.swap(1, 5);
    assert_eq!(plan(&policy, &cps), sorted);
    let steps: Vec<u64> = sorted
        .iter()
        .map(|a| match a {
            RetentionAction::Keep { step, .. } | RetentionAction::Delete { step } => *step,
        })
        .collect();
    assert_eq!(steps, (1..=8).map(|i| i * 10).collect::<Vec<_>>());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn retention_invariants_hold_for_any_listing(
        listing in prop::collection::btree_map(0u64..400, (any::<bool>(), any::<bool>()), 0..40),
        keep_last in 1usize..6,
        keep_every in prop::option::of(1u64..50),
    ) {
        let cps: Vec<_> = listing.iter().map(|(&step, &(clean, committed))| info(step, clean, committed)).collect();
        let policy = RetentionPolicy { keep_last, keep_every };
        let actions = plan(&policy, &cps);
        let committed: Vec<u64> = cps.iter().filter(|c| c.committed).map(|c| c.step).collect();
        let kept = kept(&actions);
        let gone = deleted(&actions);

        prop_assert_eq!(actions.len(), committed.len(), "one action per committed checkpoint, none for the others");
        for step in &gone {
            prop_assert!(committed.contains(step), "deleted {} which is not committed", step);
        }
        if let Some(newest) = committed.last() {
            prop_assert!(kept.contains(newest), "the newest committed {} was deleted", newest);
        }
        if let Some(clean) = cps.iter().filter(|c| c.committed && c.clean).map(|c| c.step).max() {
            prop_assert!(kept.contains(&clean), "the newest clean committed {} was deleted", clean);
        }
        for step in committed.iter().rev().take(keep_last) {
            prop_assert!(kept.contains(step), "{} is among the last {} but was deleted", step, keep_last);
        }
        let milestones = committed.iter().filter(|&&s| keep_every.is_some_and(|m| s % m == 0)).count();
        prop_assert!(kept.len() <= keep_last + milestones + 1, "kept {} > K {} + milestones {} + 1", kept.len(), keep_last, milestones);
        prop_assert_eq!(deleted(&plan(&policy, &apply(&cps, &actions))), Vec::<u64>::new(), "planning again deletes more");
    }
}

fn manifest() -> Manifest {
    Manifest {
        format: FORMAT.into(),
        step: 1234,
        tokens_seen: 1234 * 524_288,
        world_size: 4,
        zero_stage: 1,
        model: tessera::model::preset("gpt-125m").unwrap(),
        train: json!({"batch_size": 512, "micro_batch": 8, "accum_steps": 8}),
        config_hash: "5f1c0de2a9b04e77".into(),
        created_unix_s: 1_718_000_000.25,
        data_state: json!({"n": 1000, "seed": 7, "layers": [{"start": 40, "seed": 1, "skip": 8}], "position": 9872}),
        detector: json!({"clean": true, "loss_ema": 2.71, "window": [2.70, 2.72]}),
        files: (0..4)
            .map(|r| FileEntry::of(format!("rank-{r:05}.safetensors"), Some(r), format!("shard {r}").as_bytes()))
            .chain([FileEntry::new("model.safetensors", None, 1 << 40, 0xfeed_beef)])
            .collect(),
    }
}

#[test]
fn a_manifest_survives_a_json_round_trip() {
    let m = manifest();
    let text = m.to_json();
    assert_eq!(Manifest::from_json(&text), Ok(m.clone()));
    assert!(text.contains("\"rank\": null"), "coordinator files carry an explicit null rank:\n{text}");
    assert_eq!(Manifest::from_json(&text).unwrap().to_json(), text, "writing it again gives the same text");
}

#[test]
fn validate_rejects_duplicate_file_names() {
    let mut m = manifest();
    m.files[2].name = m.files[1].name.clone();
    assert_eq!(m.validate(), Err(ManifestError::DuplicateFile { name: "rank-00001.safetensors".into() }));
    assert!(matches!(Manifest::from_json(&m.to_json()), Err(ManifestError::DuplicateFile { .. })), "loads check too");
}

#[test]
fn validate_rejects_a_file_name_that_leaves_the_checkpoint_directory() {
    let mut m = manifest();
    m.files[0].name = "../x".into();
    let err = m.validate().unwrap_err();
    assert!(matches!(&err, ManifestError::BadFileName { name, .. } if name == "../x"), "{err}");
}

#[test]
fn validate_rejects_a_rank_outside_the_world() {
    let mut m = manifest();
    m.files[3].rank = Some(4);
    assert_eq!(
        m.validate(),
        Err(ManifestError::RankOutOfRange { name: "rank-00003.safetensors".into(), rank: 4, world: 4 })
    );
}

#[test]
fn validate_rejects_an_unknown_format_version() {
    let m = Manifest { format: "tessera-ckpt-0".into(), ..manifest() };
    assert_eq!(m.validate(), Err(ManifestError::UnknownFormat { found: "tessera-ckpt-0".into() }));
    assert_eq!(Manifest::from_json(&m.to_json()), Err(ManifestError::UnknownFormat { found: "tessera-ckpt-0".into() }));
}

#[test]
fn verify_file_detects_a_flipped_byte_and_names_the_file() {
    let m = manifest();
    let mut data = b"shard 2".to_vec();
    m.verify_file("rank-00002.safetensors", &data).unwrap();
    data[3] ^= 0x01;
    let err = m.verify_file("rank-00002.safetensors", &data).unwrap_err();
    assert!(matches!(err, ManifestError::ChecksumMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("rank-00002.safetensors"), "{err}");
}

#[test]
fn verify_file_detects_a_truncation_and_names_the_file() {
    let m = manifest();
    let err = m.verify_file("rank-00003.safetensors", b"shard").unwrap_err();
    assert_eq!(err, ManifestError::SizeMismatch { name: "rank-00003.safetensors".into(), expected: 7, actual: 5 });
    assert!(err.to_string().contains("rank-00003.safetensors"), "{err}");
}

#[test]
fn checkpoint_names_round_trip() {
    for step in [0, 1, 1234, 999_999_999, 1_000_000_000, u64::MAX] {
        assert_eq!(parse_checkpoint_name(&checkpoint_name(step)), Some(step), "{}", checkpoint_name(step));
    }
    assert_eq!(checkpoint_name(1234), "step-000001234");
    assert_eq!(parse_latest(&format_latest(1234)), Ok(1234));
    assert_eq!(format_latest(1234), "step-000001234\n");
}

#[test]
fn checkpoint_name_parsing_rejects_garbage() {
    for bad in ["step-12", "step-abc", "latest", "step-", "step-0000012345", "Step-000001234", "step-000001234/"] {
        assert_eq!(parse_checkpoint_name(bad), None, "{bad:?} was accepted");
    }
    for bad in ["latest\n", "step-12\n", "step-abc\n", "garbage"] {
        assert!(parse_latest(bad).is_err(), "{bad:?} was accepted as a latest pointer");
    }
}
