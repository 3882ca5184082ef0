//! Regenerates the checked-in Rust code for `schemas/*.capnp`.
//!
//! `cargo run -p quicproquo-proto --example codegen` rewrites `src/generated/`;
//! `cargo run -p quicproquo-proto --example codegen -- --check` fails when the checked-in code
//! differs from what the schemas produce. Both need the `capnp` compiler on `PATH`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const SCHEMAS: &[&str] = &[
    "common.capnp",
    "envelope.capnp",
    "auth.capnp",
    "delivery.capnp",
    "cluster.capnp",
    "bootstrap.capnp",
];

fn generate(schema_dir: &Path, out_dir: &Path) -> Result<()> {
    let mut cmd = capnpc::CompilerCommand::new();
    cmd.src_prefix(schema_dir).output_path(out_dir);
    for schema in SCHEMAS {
        cmd.file(schema_dir.join(schema));
    }
    cmd.run()
        .context("running the capnp compiler (install it: apt-get install capnproto)")?;
    Ok(())
}

fn main() -> Result<()> {
    let check = std::env::args().any(|a| a == "--check");
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let schema_dir = crate_dir.join("../../schemas");
    let generated = crate_dir.join("src/generated");
    if !check {
        generate(&schema_dir, &generated)?;
        println!("regenerated {}", generated.display());
        return Ok(());
    }
    let scratch = std::env::temp_dir().join(format!("qpq-codegen-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let result = (|| -> Result<Vec<String>> {
        generate(&schema_dir, &scratch)?;
        let mut stale = Vec::new();
        for schema in SCHEMAS {
            let name = schema.replace(".capnp", "_capnp.rs");
            let fresh = std::fs::read(scratch.join(&name))
                .with_context(|| format!("reading regenerated {name}"))?;
            let checked_in = std::fs::read(generated.join(&name)).unwrap_or_default();
            if fresh != checked_in {
                stale.push(name);
            }
        }
        Ok(stale)
    })();
    std::fs::remove_dir_all(&scratch).ok();
    let stale = result?;
    if !stale.is_empty() {
        bail!(
            "generated code is stale: {}; run `cargo run -p quicproquo-proto --example codegen`",
            stale.join(", ")
        );
    }
    println!("generated code matches the schemas");
    Ok(())
}
