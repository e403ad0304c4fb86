use super::*;

fn entries(values: &[(&str, &str)]) -> Vec<Entry> {
    values.iter().map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec())).collect()
}

/// Commits checkpoint `epoch` with two parts whose values name the epoch.
fn commit(store: &CheckpointStore, epoch: u64) {
    let value = format!("state at {epoch}");
    let a = store.write_part(epoch, "worker-0", &entries(&[("health/n1", &value), ("source/in", "17")])).unwrap();
    let b = store.write_part(epoch, "worker-1", &entries(&[("health/n2", &value)])).unwrap();
    store.commit(epoch, epoch * 10_000, &[a, b]).unwrap();
}

fn part_path(dir: &Path, epoch: u64, name: &str) -> PathBuf {
    dir.join(format!("ckpt-{epoch:020}/part-{name}.bin"))
}

#[test]
fn a_committed_checkpoint_reads_back_whole_and_old_ones_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path(), 2).unwrap();
    assert_eq!(store.latest().unwrap(), None, "an empty store has no checkpoint");
    for epoch in 1..=3 {
        commit(&store, epoch);
    }
    let loaded = store.latest().unwrap().unwrap();
    assert_eq!((loaded.epoch, loaded.time), (3, 30_000));
    assert_eq!(loaded.parts["worker-0"], entries(&[("health/n1", "state at 3"), ("source/in", "17")]));
    assert_eq!(loaded.parts["worker-1"], entries(&[("health/n2", "state at 3")]));
    assert!(loaded.skipped.is_empty());
    // Two kept: epoch 1 is gone.
    assert_eq!(store.epochs().unwrap(), vec![3, 2]);
}

#[test]
fn a_checkpoint_without_its_manifest_is_passed_over() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path(), 3).unwrap();
    commit(&store, 1);
    // The writer stopped (kill -9) after the parts of epoch 2, before the manifest, and in
    // the middle of a third part's staging file.
    store.write_part(2, "worker-0", &entries(&[("health/n1", "newer")])).unwrap();
    std::fs::write(dir.path().join(format!("ckpt-{:020}/part-worker-1.bin.tmp", 2)), b"EFCKPT1\nhalf").unwrap();
    let loaded = store.latest().unwrap().unwrap();
    assert_eq!(loaded.epoch, 1);
    assert_eq!(loaded.parts["worker-0"][0].1, b"state at 1");
    assert_eq!(loaded.skipped.len(), 1);
    assert!(loaded.skipped[0].1.starts_with("incomplete"), "{:?}", loaded.skipped);
    // The next commit prunes the incomplete one below it.
    commit(&store, 3);
    assert_eq!(store.epochs().unwrap(), vec![3, 1]);
}

#[test]
fn a_corrupted_or_truncated_part_is_detected_and_the_previous_checkpoint_used() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path(), 5).unwrap();
    commit(&store, 1);
    commit(&store, 2);
    // One flipped bit in a value.
    let path = part_path(dir.path(), 2, "worker-1");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let loaded = store.latest().unwrap().unwrap();
    assert_eq!(loaded.epoch, 1);
    assert!(loaded.skipped[0].1.contains("part `worker-1` is corrupted"), "{:?}", loaded.skipped);
    // A truncated part (a torn write that the rename should have prevented).
    commit(&store, 3);
    let path = part_path(dir.path(), 3, "worker-0");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    let loaded = store.latest().unwrap().unwrap();
    assert_eq!(loaded.epoch, 1);
    assert!(loaded.skipped[0].1.contains("part `worker-0` is truncated"), "{:?}", loaded.skipped);
    assert_eq!(loaded.skipped.len(), 2);
}

#[test]
fn a_tampered_manifest_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path(), 5).unwrap();
    commit(&store, 1);
    commit(&store, 2);
    // Still valid JSON, another event time: its checksum no longer matches.
    let path = dir.path().join(format!("ckpt-{:020}/{MANIFEST}", 2));
    let text = std::fs::read_to_string(&path).unwrap().replace("\"time\": 20000", "\"time\": 20001");
    std::fs::write(&path, text).unwrap();
    let loaded = store.latest().unwrap().unwrap();
    assert_eq!(loaded.epoch, 1);
    assert!(loaded.skipped[0].1.contains("checksum does not match its contents"), "{:?}", loaded.skipped);
    // A manifest cut short is not JSON at all.
    let text = std::fs::read(&path).unwrap();
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    assert!(store.latest().unwrap().unwrap().skipped[0].1.starts_with("corrupted manifest"));
}

#[test]
fn part_bytes_are_checked_before_they_are_trusted() {
    assert!(decode_part(b"short").is_err());
    let store_dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(store_dir.path(), 1).unwrap();
    store.write_part(1, "w", &entries(&[("k", "v")])).unwrap();
    let bytes = std::fs::read(part_path(store_dir.path(), 1, "w")).unwrap();
    assert_eq!(decode_part(&bytes).unwrap(), entries(&[("k", "v")]));
    // A key length that runs past the end, with a checksum made to match.
    let mut body = PART_MAGIC.to_vec();
    body.extend_from_slice(&1000u32.to_le_bytes());
    body.extend_from_slice(b"k");
    let digest = Sha256::digest(&body);
    body.extend_from_slice(&digest);
    assert_eq!(decode_part(&body).unwrap_err(), "an entry runs past the end");
    assert!(store.write_part(1, "../escape", &[]).is_err(), "a part name cannot leave its directory");
}

/// A second hold of the same process's directory is refused with the holder's pid; another
/// process's hold is separate; a hold ends when dropped.
#[test]
fn a_directory_is_held_by_one_run_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let held = DirLock::take(dir.path(), 0).unwrap();
    let err = DirLock::take(dir.path(), 0).unwrap_err().to_string();
    assert!(err.contains("in use by another run") && err.contains(&std::process::id().to_string()), "{err}");
    let other_process = DirLock::take(dir.path(), 1).unwrap();
    drop(held);
    DirLock::take(dir.path(), 0).unwrap();
    drop(other_process);
    // The lock files are not checkpoints.
    assert!(CheckpointStore::open(dir.path(), 2).unwrap().latest().unwrap().is_none());
}
