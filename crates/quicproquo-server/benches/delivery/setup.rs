//! Setup: every user registers, the first creates the group and adds all the others in one
//! commit, and they join from its Welcome. Timed, but not part of the figures.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use quicproquo_client::chat::{Chat, ChatEvent};
use quicproquo_client::{ClientState, ConnectOptions, Connection, Session};
use quicproquo_core::group::Group;
use quicproquo_core::mls::Suite;

use crate::Settings;
use crate::probe::{CpuUse, cpu_snapshot};

/// KeyPackages each user uploads.
pub(crate) const KEY_PACKAGES: usize = 2;

/// A registered user with its state, connection and bound session.
pub(crate) struct Member {
    pub(crate) index: usize,
    name: String,
    pub(crate) state: ClientState,
    pub(crate) path: PathBuf,
    pub(crate) session: Session,
    _conn: Connection,
}

impl Member {
    async fn register(
        addr: SocketAddr,
        options: &ConnectOptions,
        dir: &Path,
        index: usize,
        suite: Suite,
    ) -> Result<Self> {
        let name = format!("member{index:03}");
        let path = dir.join(format!("{name}.bin"));
        let mut state = ClientState::create(suite)?;
        state.name = Some(name.clone());
        let conn = Connection::connect(addr, options).await?;
        let session = conn.bind(state.identity()).await?;
        session.auth.claim_name(&name).await?;
        let kps = state
            .mls_identity()
            .key_packages(&state.mls, suite, KEY_PACKAGES)?;
        state.save(&path)?;
        session.auth.upload_key_packages(&kps, None).await?;
        Ok(Self {
            index,
            name,
            state,
            path,
            session,
            _conn: conn,
        })
    }

    fn chat(&mut self) -> Chat<'_> {
        Chat::new(&mut self.state, &self.path, &self.session)
    }

    pub(crate) fn group(&self, id: &[u8]) -> Result<Group> {
        Group::load(&self.state.mls, id)?.ok_or_else(|| anyhow::anyhow!("no group"))
    }
}

/// How long the setup took, and the CPU it used.
pub(crate) struct SetupReport {
    pub(crate) register: Duration,
    pub(crate) invite: Duration,
    pub(crate) join: Duration,
    pub(crate) total: Duration,
    pub(crate) cpu: CpuUse,
}

/// Registers every user, creates the group, adds everyone in one commit and joins them all;
/// checks that all members agree on the group.
pub(crate) async fn setup(
    s: &Settings,
    addr: SocketAddr,
    options: &ConnectOptions,
    dir: &Path,
) -> Result<(Vec<Member>, Vec<u8>, SetupReport)> {
    let cpu0 = cpu_snapshot();
    let started = Instant::now();
    let mut members = futures::future::try_join_all(
        (0..s.members).map(|i| Member::register(addr, options, dir, i, s.suite)),
    )
    .await?;
    let register = started.elapsed();

    let t = Instant::now();
    let (creator, others) = members.split_first_mut().context("no members")?;
    let id = creator.chat().create_group("bench").await?;
    let names: Vec<String> = others.iter().map(|m| m.name.clone()).collect();
    let epoch = creator.chat().invite("bench", &names, &mut |_| {}).await?;
    ensure!(epoch == 1, "one commit adds everyone (epoch {epoch})");
    let invite = t.elapsed();

    let t = Instant::now();
    futures::future::try_join_all(others.iter_mut().map(|m| async move {
        let mut joined = 0;
        m.chat()
            .receive_all(&mut |e| {
                if matches!(e, ChatEvent::Joined { .. }) {
                    joined += 1;
                }
            })
            .await?;
        ensure!(joined == 1, "{} joined {joined} groups", m.name);
        anyhow::Ok(())
    }))
    .await?;
    let join = t.elapsed();
    let total = started.elapsed();

    let reference = members[0].group(&id)?.epoch_authenticator();
    for m in &members {
        let g = m.group(&id)?;
        ensure!(
            g.epoch() == 1 && g.epoch_authenticator() == reference,
            "{} disagrees about the group",
            m.name
        );
        ensure!(
            g.members().len() == s.members,
            "{} sees the wrong roster",
            m.name
        );
    }
    let cpu = CpuUse::since(&cpu0);
    Ok((
        members,
        id,
        SetupReport {
            register,
            invite,
            join,
            total,
            cpu,
        },
    ))
}
