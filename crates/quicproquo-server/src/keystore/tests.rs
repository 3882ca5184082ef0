use super::*;

#[test]
fn keys_are_created_once_with_private_modes() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    let first = NodeIdentity::load_or_create(&dir, NodeRole::Standalone)?;
    let again = NodeIdentity::load_or_create(&dir, NodeRole::Standalone)?;
    assert_eq!(first.cluster_public(), again.cluster_public());
    assert_eq!(first.noise.public(), again.noise.public());
    assert_eq!(fs::metadata(&dir)?.permissions().mode() & 0o777, 0o700);
    for f in [CLUSTER_KEY_FILE, NODE_KEY_FILE, TELEMETRY_KEY_FILE] {
        assert_eq!(
            fs::metadata(dir.join(f))?.permissions().mode() & 0o777,
            0o600
        );
    }
    first
        .cluster_public()
        .verify(&first.certificate(), first.noise.public())?;
    // No temporary files are left behind.
    assert_eq!(fs::read_dir(&dir)?.count(), 3);
    Ok(())
}

#[test]
fn exposed_key_modes_warn_and_read_only_group_mounts_do_not() {
    for private in [0o600, 0o400, 0o440] {
        assert_eq!(exposure(private), None, "{private:o}");
    }
    for exposed in [0o644, 0o604, 0o444, 0o640, 0o660, 0o620, 0o460] {
        assert!(exposure(exposed).is_some(), "{exposed:o}");
    }
}

#[test]
fn a_corrupt_key_file_is_reported() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    fs::write(tmp.path().join(CLUSTER_KEY_FILE), "not hex")?;
    assert!(matches!(
        cluster_key(tmp.path()),
        Err(KeyStoreError::Invalid { .. })
    ));
    Ok(())
}

fn issue(
    cluster: &ClusterSigningKey,
    node: &NoiseKeypair,
    role: NodeRole,
    from_now: i64,
    for_secs: u64,
) -> Result<NodeCertificate, KeyError> {
    let now = quicproquo_core::cert::unix_now();
    let not_before = now.saturating_add_signed(from_now);
    cluster.issue(&quicproquo_core::CertificateFields {
        role,
        node_key: *node.public(),
        node_id: "n1".into(),
        not_before,
        not_after: not_before + for_secs,
    })
}

#[test]
fn a_node_starts_from_a_valid_certificate_only() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    let node = node_key(&dir)?;
    let cluster = ClusterSigningKey::generate()?;
    let other = ClusterSigningKey::generate()?;
    let file = tmp.path().join("node.cert");
    let source = CertificateSource {
        file: &file,
        node_key_file: None,
        trusted: &[],
        telemetry_key_file: None,
    };
    write_certificate(&file, &issue(&cluster, &node, NodeRole::Edge, -10, 3600)?)?;
    let identity = NodeIdentity::with_certificate(&dir, &source, NodeRole::Edge)?;
    assert_eq!(identity.cluster_public(), cluster.public_key());
    assert_eq!(identity.certificate().node_id(), "n1");
    assert!(
        !dir.join(CLUSTER_KEY_FILE).exists(),
        "no signing key on a node"
    );

    let refused = |cert: NodeCertificate, role, trusted: &[ClusterPublicKey]| {
        write_certificate(&file, &cert).map_err(|e| e.to_string())?;
        let source = CertificateSource {
            file: &file,
            node_key_file: None,
            trusted,
            telemetry_key_file: None,
        };
        match NodeIdentity::with_certificate(&dir, &source, role) {
            Err(KeyStoreError::Certificate { source, .. }) => Ok(source),
            other => Err(format!("expected a refusal, got {other:?}")),
        }
    };
    assert!(matches!(
        refused(
            issue(&cluster, &node, NodeRole::Edge, -7200, 3600)?,
            NodeRole::Edge,
            &[]
        )?,
        KeyError::CertificateExpired { .. }
    ));
    assert!(matches!(
        refused(
            issue(&cluster, &node, NodeRole::Shard, -10, 3600)?,
            NodeRole::Edge,
            &[]
        )?,
        KeyError::WrongRole { .. }
    ));
    assert!(matches!(
        refused(
            issue(&other, &node, NodeRole::Edge, -10, 3600)?,
            NodeRole::Edge,
            &[cluster.public_key()]
        )?,
        KeyError::UnknownClusterKey
    ));
    let stranger = NoiseKeypair::generate()?;
    assert!(matches!(
        refused(
            issue(&cluster, &stranger, NodeRole::Edge, -10, 3600)?,
            NodeRole::Edge,
            &[]
        )?,
        KeyError::CertificateForAnotherKey
    ));
    Ok(())
}

#[test]
fn a_renewed_certificate_is_picked_up_and_a_bad_one_is_not()
-> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    let node = node_key(&dir)?;
    let old = ClusterSigningKey::generate()?;
    let new = ClusterSigningKey::generate()?;
    let file = tmp.path().join("node.cert");
    write_certificate(&file, &issue(&old, &node, NodeRole::Shard, -10, 60)?)?;
    let trusted = [old.public_key(), new.public_key()];
    let source = CertificateSource {
        file: &file,
        node_key_file: None,
        trusted: &trusted,
        telemetry_key_file: None,
    };
    let identity = NodeIdentity::with_certificate(&dir, &source, NodeRole::Shard)?;
    assert!(identity.reload_certificate()?.is_none(), "nothing changed");
    // Renewed by the new cluster key (a rollover).
    let renewed = issue(&new, &node, NodeRole::Shard, -10, 3600)?;
    write_certificate(&file, &renewed)?;
    assert_eq!(identity.reload_certificate()?, Some(renewed.clone()));
    assert_eq!(identity.cluster_public(), new.public_key());
    // A certificate for another role is refused; the renewed one stays.
    write_certificate(&file, &issue(&new, &node, NodeRole::Edge, -10, 3600)?)?;
    assert!(identity.reload_certificate().is_err());
    assert_eq!(identity.certificate(), renewed);
    Ok(())
}
