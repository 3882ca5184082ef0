use std::os::unix::fs::PermissionsExt;

use super::*;

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn entries(state: &ClientState) -> R<Vec<(Vec<u8>, Vec<u8>)>> {
    Ok(state
        .mls
        .entries()?
        .into_iter()
        .map(|(k, v)| (k, v.to_vec()))
        .collect())
}

fn len(path: &Path) -> R<u64> {
    Ok(fs::metadata(path)?.len())
}

#[test]
fn state_round_trips_with_mode_0600() -> R {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(DEFAULT_STATE_FILE);
    assert!(matches!(
        ClientState::load(&path),
        Err(StateError::Missing(_))
    ));
    let mut state = ClientState::load_or_create(&path, Suite::Classical)?;
    state.name = Some("alice".into());
    state.inbox_cursor = 3;
    state.groups.insert(
        b"g1".to_vec(),
        GroupMeta {
            name: "friends".into(),
            cursor: 42,
            own_pending: vec![b"m1".to_vec(), b"m2".to_vec()],
        },
    );
    state
        .mls_identity()
        .key_packages(&state.mls, Suite::Classical, 2)?;
    state.save(&path)?;
    assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
    let again = ClientState::load(&path)?;
    assert_eq!(again.identity().public(), state.identity().public());
    assert_eq!(again.name.as_deref(), Some("alice"));
    assert_eq!(again.suite, Suite::Classical);
    assert_eq!(again.inbox_cursor, 3);
    assert_eq!(again.groups, state.groups);
    assert_eq!(entries(&again)?, entries(&state)?);
    // Only the state file is left in the directory.
    assert_eq!(fs::read_dir(dir.path())?.count(), 1);
    // Damage before the last save is reported, not half-read.
    let mut bytes = fs::read(&path)?;
    bytes[log::HEADER_LEN + 20] ^= 1;
    state.inbox_cursor = 4;
    state.save(&path)?;
    let tail = fs::read(&path)?.split_off(bytes.len());
    bytes.extend_from_slice(&tail);
    fs::write(&path, &bytes)?;
    assert!(matches!(
        ClientState::load(&path),
        Err(StateError::Corrupt(_))
    ));
    Ok(())
}

#[test]
fn a_save_appends_only_what_changed() -> R {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(DEFAULT_STATE_FILE);
    let mut state = ClientState::create(Suite::Classical)?;
    state
        .mls_identity()
        .key_packages(&state.mls, Suite::Classical, 20)?;
    state.save(&path)?;
    let full = len(&path)?;
    // Nothing changed: nothing written.
    state.save(&path)?;
    assert_eq!(len(&path)?, full);
    // A cursor moved: one small frame.
    state.inbox_cursor = 9;
    state.save(&path)?;
    let grown = len(&path)? - full;
    assert!(grown < 64, "a cursor change appended {grown} bytes");
    // One more KeyPackage: about its own size, not the state's.
    let before = len(&path)?;
    state
        .mls_identity()
        .key_packages(&state.mls, Suite::Classical, 1)?;
    state.save(&path)?;
    let grown = len(&path)? - before;
    assert!(
        grown < full / 10,
        "one KeyPackage appended {grown} of {full} bytes"
    );
    // Still mode 0600 and readable as the sum of its frames.
    assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
    let again = ClientState::load(&path)?;
    assert_eq!(again.inbox_cursor, 9);
    assert_eq!(entries(&again)?, entries(&state)?);
    // A loaded state appends to the file it was read from.
    again.save(&path)?;
    assert_eq!(len(&path)?, before + grown);
    Ok(())
}

#[test]
fn a_torn_save_loses_nothing_acknowledged() -> R {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(DEFAULT_STATE_FILE);
    let mut state = ClientState::create(Suite::Classical)?;
    state.inbox_cursor = 1;
    state.save(&path)?;
    state
        .mls_identity()
        .key_packages(&state.mls, Suite::Classical, 2)?;
    state.inbox_cursor = 2;
    state.save(&path)?;
    let acknowledged = fs::read(&path)?;
    let saved = entries(&state)?;
    // The next save is torn at every byte of its frame.
    state
        .mls_identity()
        .key_packages(&state.mls, Suite::Classical, 1)?;
    state.inbox_cursor = 3;
    state.save(&path)?;
    let complete = fs::read(&path)?;
    for cut in acknowledged.len()..complete.len() {
        fs::write(&path, &complete[..cut])?;
        let loaded = ClientState::load(&path)?;
        assert_eq!(loaded.inbox_cursor, 2, "cut at {cut}");
        assert!(entries(&loaded)? == saved, "cut at {cut}");
    }
    // A torn frame of the right length whose bytes did not all reach the disk.
    let mut zeroed = complete.clone();
    zeroed[complete.len() - 5..].fill(0);
    fs::write(&path, &zeroed)?;
    assert_eq!(ClientState::load(&path)?.inbox_cursor, 2);
    // After a torn write the next save rewrites the file, which then reads whole.
    let loaded = ClientState::load(&path)?;
    loaded.save(&path)?;
    assert!(len(&path)? < zeroed.len() as u64);
    let again = ClientState::load(&path)?;
    assert_eq!(again.inbox_cursor, 2);
    assert!(entries(&again)? == saved);
    Ok(())
}

#[test]
fn appended_frames_are_compacted_once_they_outgrow_the_state() -> R {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(DEFAULT_STATE_FILE);
    let mut state = ClientState::create(Suite::Classical)?;
    state.save(&path)?;
    let mut largest = 0;
    for i in 0..40u8 {
        // About 4 KiB of metadata changed per save.
        state.groups.insert(
            vec![i],
            GroupMeta {
                name: "g".repeat(4000),
                cursor: 0,
                own_pending: Vec::new(),
            },
        );
        state.groups.retain(|id, _| id[0] == i);
        state.save(&path)?;
        largest = largest.max(len(&path)?);
    }
    assert!(largest > MIN_COMPACTION_SLACK, "frames were appended");
    assert!(
        largest < 2 * MIN_COMPACTION_SLACK + 16 * 1024,
        "{largest} bytes"
    );
    assert!(len(&path)? < largest, "the file was compacted");
    let again = ClientState::load(&path)?;
    assert_eq!(again.groups, state.groups);
    // Compaction on demand leaves the state in one frame.
    state.compact(&path)?;
    assert!(len(&path)? < 4200);
    assert_eq!(fs::read_dir(dir.path())?.count(), 1);
    Ok(())
}

#[test]
fn a_state_file_of_the_previous_version_is_refused_by_name() -> R {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(DEFAULT_STATE_FILE);
    let mut old = b"QPQSTATE".to_vec();
    old.extend_from_slice(&1u32.to_be_bytes());
    old.extend_from_slice(&[0u8; 64]);
    fs::write(&path, &old)?;
    let err = ClientState::load(&path).err().ok_or("loaded")?;
    assert!(matches!(err, StateError::Version { version: 1, .. }));
    assert!(err.to_string().contains("version 1"), "{err}");
    fs::write(&path, b"not a state file")?;
    assert!(matches!(
        ClientState::load(&path),
        Err(StateError::Corrupt(_))
    ));
    Ok(())
}

/// One process at a time holds a state file: a second hold fails at once with `InUse`, and the
/// file is free again when the first is dropped.
#[test]
fn a_state_file_is_held_by_one_process_at_a_time() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("qpq-state.bin");
    let first = StateLock::acquire(&path)?;
    assert!(matches!(
        StateLock::acquire(&path),
        Err(StateError::InUse(p)) if p == path
    ));
    drop(first);
    let again = StateLock::acquire(&path)?;
    drop(again);
    Ok(())
}
