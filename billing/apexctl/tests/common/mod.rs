//! Support shared by the `apexctl` tests: the binary, pointed at a test's own databases.

use std::process::Command;

use apex_core::testing::TestStores;

/// The `apexctl` binary pointed at the test's own databases, with no other settings from
/// the environment that could change what it does.
pub(crate) fn apexctl_command(stores: &TestStores) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_apexctl"));
    command
        .env("DATABASE_URL", &stores.config.database_url)
        .env("CLICKHOUSE_URL", &stores.config.clickhouse_url)
        .env("CLICKHOUSE_DATABASE", &stores.config.clickhouse_database)
        .env_remove("APEX_JWT_SECRET")
        .env_remove("STRIPE_SECRET_KEY")
        .env_remove("STRIPE_API_BASE")
        .env_remove("APEX_CLOCK_START")
        .env_remove("APEX_CLOCK_SPEED")
        .env_remove("APEX_CLOCK_EPOCH")
        .env_remove("APEX_CRON_TEST_JOBS")
        .env("EMAIL_PROVIDER", "file")
        .env_remove("EMAIL_DAILY_CAP")
        .env_remove("EMAIL_MONTHLY_CAP")
        .env(
            "EMAIL_FILE_DIR",
            std::env::temp_dir().join(format!("{}_mail", stores.name)),
        );
    command
}
