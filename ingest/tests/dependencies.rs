//! The edge links only what it needs: `cargo tree` of `apex-ingest`'s normal dependencies has
//! no Stripe SDK, no TLS client stack, no email, template or scheduler crate and no CLI
//! parser, and the billing domain it links does no network I/O of its own (no HTTP client).
//! A change that pulls one of them into `apex-server` fails here.

use std::collections::BTreeSet;
use std::process::Command;

/// Normal dependencies of `package`, by name, as `cargo tree` resolves them for it alone.
fn dependency_names(package: &str) -> BTreeSet<String> {
    let args = [
        "tree",
        "--package",
        package,
        "--edges",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
        "--offline",
    ];
    let output = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(apex_core::testing::package_dir())
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Crate names (or their prefixes, ending in `-`) that must stay out of a tree.
fn banned_in(tree: &BTreeSet<String>, banned: &[&str]) -> Vec<String> {
    tree.iter()
        .filter(|name| {
            banned.iter().any(|b| match b.strip_suffix('-') {
                Some(prefix) => name.starts_with(&format!("{prefix}-")),
                None => name.as_str() == *b,
            })
        })
        .cloned()
        .collect()
}

const NOT_AT_THE_EDGE: &[&str] = &[
    // Stripe and its HTTPS client stack.
    "async-stripe-",
    "apex-stripe",
    "hyper-rustls",
    "rustls",
    "webpki-roots",
    // Email.
    "apex-notify",
    "lettre",
    "resend-rs",
    "aws-sdk-sesv2",
    // Templates.
    "tera",
    "minijinja",
    "handlebars",
    "askama",
    // Scheduling.
    "apex-cron",
    "croner",
    "cron",
    "tokio-cron-scheduler",
    // The CLI stack.
    "clap",
    "apexctl",
];

#[test]
fn the_edge_links_no_stripe_email_template_scheduler_or_cli_crate() {
    let tree = dependency_names("apex-ingest");
    assert!(
        tree.contains("apex-billing") && tree.contains("apex-pipeline"),
        "the tree was not read: {tree:?}"
    );
    let found = banned_in(&tree, NOT_AT_THE_EDGE);
    assert!(found.is_empty(), "apex-ingest links {found:?}");
}

#[test]
fn the_billing_domain_does_no_network_io_of_its_own() {
    let tree = dependency_names("apex-billing");
    assert!(tree.contains("sqlx"), "the tree was not read: {tree:?}");
    let mut banned = NOT_AT_THE_EDGE.to_vec();
    // No HTTP client and no store client but Postgres's (apex-core without its `stores`
    // feature links none), and not the write-ahead log.
    banned.extend([
        "hyper",
        "hyper-util",
        "reqwest",
        "ureq",
        "clickhouse",
        "apex-pipeline",
    ]);
    let found = banned_in(&tree, &banned);
    assert!(found.is_empty(), "apex-billing links {found:?}");
}
