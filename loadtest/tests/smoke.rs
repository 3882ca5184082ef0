//! A short run of the real `qpq-loadtest` binary (in-process server, tens of members, a few
//! seconds) that must finish without errors and pass its own (generous) thresholds: what CI
//! runs to keep the load test working. The figures of a debug build on a shared machine mean
//! nothing; only completeness and correctness are checked tightly.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

fn run(args: &[&str]) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_qpq-loadtest"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--quiet")
        .output()
        .context("running qpq-loadtest")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "qpq-loadtest failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    ensure!(
        stdout.contains("delivery") || stdout.contains("connect"),
        "no table:\n{stdout}"
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    Ok(report)
}

fn phase<'a>(report: &'a Value, name: &str) -> Result<&'a Value> {
    report["phases"]
        .as_array()
        .context("phases")?
        .iter()
        .find(|p| p["name"].as_str().is_some_and(|n| n.starts_with(name)))
        .with_context(|| format!("no phase {name}"))
}

#[test]
fn messages_scenario_delivers_everything_and_checks_its_thresholds() -> Result<()> {
    let report = run(&[
        "--members",
        "12",
        "--group-size",
        "6",
        "--groups",
        "3",
        "--rate",
        "12",
        "--sweep",
        "6",
        "--duration",
        "2s",
        "--drain",
        "60s",
        "--ciphersuite",
        "classical",
        "--payload-bytes",
        "64",
        "--threshold",
        "errors=0,p99<120s,rate>0",
    ])?;
    assert_eq!(report["errors"], 0, "errors in {report:#}");
    assert_eq!(report["passed"], true);
    // 3 groups of 6 from 12 members: 15 joins (some members are in two groups).
    let join = phase(&report, "join")?;
    assert_eq!(join["stats"]["counters"]["joins"], 15);
    // Both rates (--rate, then --sweep) deliver every message to every other member.
    let steady: Vec<&Value> = report["phases"]
        .as_array()
        .context("phases")?
        .iter()
        .filter(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("steady state"))
        })
        .collect();
    assert_eq!(steady.len(), 2);
    for p in steady {
        let counters = &p["stats"]["counters"];
        let delivered = counters["deliveries"].as_u64().context("deliveries")?;
        assert!(delivered > 0);
        assert_eq!(Some(delivered), counters["deliveries expected"].as_u64());
        let h = &p["stats"]["latency_ms"]["delivery (planned send -> decrypted)"];
        assert_eq!(h["count"].as_u64(), Some(delivered));
        assert!(h["p50"].as_f64().is_some_and(|p| p > 0.0));
    }
    assert!(
        report["memory"]["process_peak_bytes"]
            .as_u64()
            .is_some_and(|b| b > 0)
    );
    Ok(())
}

#[test]
fn members_that_do_not_decrypt_still_receive_everything_in_order() -> Result<()> {
    let report = run(&[
        "--members",
        "12",
        "--group-size",
        "6",
        "--rate",
        "12",
        "--duration",
        "2s",
        "--drain",
        "60s",
        "--ciphersuite",
        "classical",
        "--decrypting",
        "2",
        "--threshold",
        "errors=0",
    ])?;
    assert_eq!(report["errors"], 0, "errors in {report:#}");
    assert_eq!(report["settings"]["decrypting"], 2);
    let steady = phase(&report, "steady state")?;
    let counters = &steady["stats"]["counters"];
    let delivered = counters["deliveries"].as_u64().context("deliveries")?;
    assert_eq!(Some(delivered), counters["deliveries expected"].as_u64());
    // Two of six members per group decrypt; the other four receive without decrypting.
    let undecrypted = counters["deliveries received without decrypting"]
        .as_u64()
        .context("undecrypted")?;
    assert!(undecrypted > 0 && undecrypted < delivered);
    let latency = &steady["stats"]["latency_ms"];
    assert_eq!(
        latency["delivery (planned send -> received or decrypted)"]["count"].as_u64(),
        Some(delivered)
    );
    assert_eq!(
        latency["delivery (planned send -> decrypted)"]["count"].as_u64(),
        Some(delivered - undecrypted)
    );
    Ok(())
}

#[test]
fn churn_removes_and_re_adds_members_during_traffic() -> Result<()> {
    // Half the members do not decrypt: they still process every churn commit.
    let report = run(&[
        "--decrypting",
        "4",
        "--members",
        "8",
        "--group-size",
        "8",
        "--rate",
        "8",
        "--duration",
        "5s",
        "--churn",
        "1",
        "--churn-every",
        "1s",
        "--drain",
        "5s",
        "--ciphersuite",
        "classical",
    ])?;
    // Nothing may go wrong: a sender too many epochs behind is refused and counted, a
    // rejoiner counts the messages from before its Welcome as not for it, and the churning
    // creator reads what precedes each of its commits before merging it.
    for p in report["phases"].as_array().context("phases")? {
        let errors = p["stats"]["errors"].as_object().context("errors")?;
        assert!(errors.is_empty(), "errors in {report:#}");
    }
    let steady = phase(&report, "steady state")?;
    let counters = &steady["stats"]["counters"];
    // Two commits (remove, re-add) per churn step.
    assert!(
        counters["churn commits"]
            .as_u64()
            .is_some_and(|n| n >= 2 && n % 2 == 0)
    );
    // The in-process server verified every churn commit against its view, and says how long
    // that took.
    let commits = counters["churn commits"]
        .as_u64()
        .context("churn commits")?;
    let verified = &steady["verification"];
    assert!(
        verified["messages"].as_u64().is_some_and(|n| n >= commits),
        "{verified:#}"
    );
    assert!(
        verified["mean_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{verified:#}"
    );
    let rejoins = &steady["stats"]["latency_ms"]["churn rejoin (removed -> joined)"];
    assert!(rejoins["count"].as_u64().is_some_and(|n| n >= 1));
    assert!(counters["deliveries"].as_u64().is_some_and(|n| n > 0));
    // Nothing lost: once the drain is over, every member (each was removed and added back,
    // or saw others be) has processed the group's log to its end.
    assert_eq!(
        counters["members at the end of the log after the drain (churn)"].as_u64(),
        Some(8),
        "{counters:#}"
    );
    Ok(())
}

#[test]
fn connections_scenario_holds_idle_connections_and_reports_server_memory() -> Result<()> {
    let report = run(&[
        "--scenario",
        "connections",
        "--members",
        "50",
        "--duration",
        "1s",
        "--threshold",
        "errors=0,rate>0",
    ])?;
    assert_eq!(report["errors"], 0, "errors in {report:#}");
    let connect = phase(&report, "connect")?;
    assert_eq!(
        connect["stats"]["latency_ms"]["connect+handshake"]["count"].as_u64(),
        Some(50)
    );
    let ping = phase(&report, "ping")?;
    assert_eq!(
        ping["stats"]["latency_ms"]["ping idle connection"]["count"].as_u64(),
        Some(50)
    );
    assert!(
        report["memory"]["server_peak_bytes"]
            .as_u64()
            .is_some_and(|b| b > 0)
    );
    assert!(report["memory"]["server_bytes_per_idle_connection"].is_number());
    Ok(())
}
