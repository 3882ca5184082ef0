//! Writes the fuzz targets' seed inputs, made of real traffic, into the corpus folder given as
//! argument (`fuzz/run.sh` calls it): the RPC messages a client sends first (bootstrap, ping,
//! bind), framed and unframed, and a real group's MLS messages (a commit adding a member, its
//! Welcome and GroupInfo, a KeyPackage, an application message) in both suites. Existing
//! files are kept.

use std::path::Path;

use capnp::message::Builder;
use quicproquo_proto::bootstrap_capnp::bootstrap;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn words(m: &Builder<capnp::message::HeapAllocator>) -> Vec<u8> {
    capnp::serialize::write_message_to_words(m)
}

/// A bootstrap, a ping and a bind pipelined on it: what a client sends first.
fn client_opening() -> Result<Vec<u8>> {
    use capnp_rpc::rpc_capnp::message;
    let mut out = Vec::new();
    let mut m = Builder::new_default();
    m.init_root::<message::Builder<'_>>()
        .init_bootstrap()
        .set_question_id(0);
    out.extend(words(&m));
    for (q, method) in [(1u32, 0u16), (2, 1)] {
        let mut m = Builder::new_default();
        {
            let mut call = m.init_root::<message::Builder<'_>>().init_call();
            call.set_question_id(q);
            call.set_interface_id(<bootstrap::Client as capnp::traits::HasTypeId>::TYPE_ID);
            call.set_method_id(method);
            call.reborrow()
                .init_target()
                .init_promised_answer()
                .set_question_id(0);
            let content = call.init_params().init_content();
            if method == 0 {
                content
                    .init_as::<bootstrap::ping_params::Builder<'_>>()
                    .set_payload(b"hello");
            } else {
                let mut bind = content.init_as::<bootstrap::bind_params::Builder<'_>>();
                bind.set_identity_key(&[7; 32]);
                bind.set_signature(&[9; 64]);
            }
        }
        out.extend(words(&m));
    }
    Ok(out)
}

/// A real group's traffic: a commit adding a member (public framing), its Welcome, its
/// GroupInfo and an application message (private framing), in both suites.
fn mls_traffic() -> Result<Vec<(String, Vec<u8>)>> {
    use quicproquo_core::IdentityKeypair;
    use quicproquo_core::group::Group;
    use quicproquo_core::mls::{MlsIdentity, MlsProvider, Suite};
    let mut out = Vec::new();
    for suite in Suite::ALL {
        let (alice_p, bob_p) = (MlsProvider::default(), MlsProvider::default());
        let alice = MlsIdentity::new(&IdentityKeypair::generate()?);
        let bob = MlsIdentity::new(&IdentityKeypair::generate()?);
        let mut group = Group::create(&alice_p, &alice, suite, b"fuzz-seed-group")?;
        let kps = bob.key_packages(&bob_p, suite, 1)?;
        let added = group.add_members(&alice_p, &alice, &kps)?;
        group.merge_pending_commit(&alice_p)?;
        let name = suite.as_str();
        out.push((format!("{name}-commit"), added.commit));
        if let Some(w) = added.welcome {
            out.push((format!("{name}-welcome"), w));
        }
        out.push((format!("{name}-group-info"), added.group_info));
        out.push((format!("{name}-key-package"), kps[0].clone()));
        out.push((
            format!("{name}-application"),
            group.encrypt(&alice_p, &alice, b"hello")?,
        ));
    }
    Ok(out)
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
    let d = dir.join(target);
    std::fs::create_dir_all(&d)?;
    let path = d.join(name);
    if !path.exists() {
        std::fs::write(path, bytes)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let dir = std::env::args().nth(1).ok_or("usage: seeds CORPUS_DIR")?;
    let dir = Path::new(&dir);
    let opening = client_opening()?;
    write(dir, "rpc_messages", "opening", &opening)?;
    let mut framed = (opening.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&opening);
    write(dir, "channel_frames", "opening", &framed)?;
    for (name, bytes) in mls_traffic()? {
        write(dir, "mls_peek", &name, &bytes)?;
    }
    write(
        dir,
        "append_decision",
        "three",
        &[3, 1, 3, 0, 1, 1, 0, 2, 0, 0, 1, 0, 1, 1],
    )?;
    Ok(())
}
