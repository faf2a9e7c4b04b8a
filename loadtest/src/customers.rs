//! Customers to load with: created through `apexctl customers create --json` (the same path a
//! person takes), or read from a key file of such lines.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::workload::{Customer, parse_key_lines, read_key_file};

/// The most customers one run creates.
pub const MAX_CREATED: usize = 10_000;

/// `apexctl` next to this binary (both are built into the same directory), else on `PATH`.
pub fn default_apexctl() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("apexctl")))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("apexctl"))
}

/// Creates `count` customers with `apexctl`, named after `run` so they are easy to find.
pub fn create(apexctl: &Path, count: usize, run: &str) -> Result<Vec<Customer>, String> {
    if count == 0 || count > MAX_CREATED {
        return Err(format!("--customers must be 1 to {MAX_CREATED}"));
    }
    let mut lines = String::new();
    for i in 0..count {
        let output = Command::new(apexctl)
            .args([
                "customers",
                "create",
                "--name",
                &format!("Load test {run} #{i}"),
                "--email",
                &format!("loadtest+{run}-{i}@example.com"),
                "--json",
            ])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", apexctl.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} customers create failed: {}",
                apexctl.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        lines.push_str(&String::from_utf8_lossy(&output.stdout));
        lines.push('\n');
    }
    parse_key_lines(&lines).map_err(|e| format!("apexctl answered something unexpected: {e}"))
}

/// The customers of a run: from `keys_file` when given, else `create`d.
pub fn load_or_create(
    keys_file: Option<&Path>,
    count: Option<usize>,
    apexctl: &Path,
    run: &str,
    save_to: Option<&Path>,
) -> Result<Vec<Customer>, String> {
    let customers = match (keys_file, count) {
        (Some(path), _) => read_key_file(path)?,
        (None, Some(n)) => create(apexctl, n, run)?,
        (None, None) => {
            return Err(
                "give --keys-file FILE (lines of `apexctl customers create --json`) or --customers N"
                    .into(),
            );
        }
    };
    if let Some(path) = save_to {
        let mut file = std::fs::File::create(path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        for c in &customers {
            let line = serde_json::json!({"api_key": c.api_key, "customer_id": c.customer_id});
            writeln!(file, "{line}").map_err(|e| e.to_string())?;
        }
    }
    Ok(customers)
}
