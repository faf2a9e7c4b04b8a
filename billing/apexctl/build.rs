//! Rebuilds `apexctl` when a migration is added or changed: `apexctl doctor` embeds the list
//! of Postgres migrations with `sqlx::migrate!`, and cargo does not see new files there.

fn main() {
    println!("cargo:rerun-if-changed=../../migrations/postgres");
}
