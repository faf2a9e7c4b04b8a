//! Integration-test support: every test gets its own freshly created Postgres database and
//! ClickHouse database on the real servers of `scripts/stack.sh`, so tests never share data
//! and can run in parallel. Databases are named `apex_t_*`; `scripts/test.sh` drops old ones.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Connection, PgConnection, PgPool};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::env::EnvSource;
use crate::stores::StoreConfig;

/// A pair of empty databases (Postgres and ClickHouse) private to one test.
pub struct TestStores {
    /// Settings pointing at the private databases.
    pub config: StoreConfig,
    /// A pool on the private Postgres database.
    pub pool: PgPool,
    /// The databases' shared name.
    pub name: String,
}

/// The folder of the package whose test is running, read when it runs (cargo sets
/// `CARGO_MANIFEST_DIR` for every test process). Not `env!("CARGO_MANIFEST_DIR")`: the build
/// folder is shared between clones, and a test binary built in one clone and still fresh
/// in another would read the first clone's files.
pub fn package_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .expect("CARGO_MANIFEST_DIR is unset: run the tests with cargo test")
        .into()
}

/// The versions of the repository's migration files of `store` (`postgres` or `clickhouse`,
/// the folder `migrations/{store}` above the [`package_dir`]), read from the folder when the
/// test runs; in order.
pub fn migration_file_versions(store: &str) -> Vec<i64> {
    let dir = package_dir()
        .ancestors()
        .map(|dir| dir.join("migrations").join(store))
        .find(|dir| dir.is_dir())
        .unwrap_or_else(|| panic!("no migrations/{store} above {}", package_dir().display()));
    let mut versions: Vec<i64> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".sql"))
        .map(|n| n.split('_').next().unwrap().parse().unwrap())
        .collect();
    versions.sort_unstable();
    versions
}

/// `promtool check metrics` on a `/metrics` page: `Err` with what promtool said (the
/// page's lint problems) unless it passes with nothing to say. Panics (never skips) when
/// promtool is missing: `scripts/stack.sh up` installs it (`APEX_PROMTOOL` names another).
pub fn promtool_check(page: &str) -> Result<(), String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let path = std::env::var("APEX_PROMTOOL")
        .unwrap_or_else(|_| "/var/cache/apex/tools/prometheus/usr/bin/promtool".to_owned());
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: run scripts/stack.sh up, which installs promtool"
    );
    let mut check = Command::new(path)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    check
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(page.as_bytes())
        .expect("promtool reads the page");
    let out = check.wait_with_output().expect("promtool finishes");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "apex_t_{}_{}_{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `url` with its database path replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let host_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    format!("{}/{}{}", &base[..host_end], database, query)
}

impl TestStores {
    /// Creates empty databases (no migrations applied).
    ///
    /// Panics with a pointer to `scripts/test.sh` when the stack's variables are missing:
    /// a test that needs the stores must fail, never pass silently, without them.
    pub async fn empty() -> Self {
        let base = StoreConfig::from_env(&EnvSource::process()).unwrap_or_else(|e| {
            panic!("{e}. Integration tests need the local stack: run scripts/test.sh")
        });
        let name = unique_name();
        let mut admin = PgConnection::connect(&base.database_url)
            .await
            .expect("cannot connect to the stack's Postgres");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("cannot create a test database");
        let _ = admin.close().await;
        let config = StoreConfig {
            database_url: with_database(&base.database_url, &name),
            clickhouse_database: name.clone(),
            pg_max_connections: 8,
            ..base
        };
        let pool = config
            .connect_postgres()
            .await
            .expect("cannot connect to the test database");
        Self { config, pool, name }
    }

    /// Sum of `quantity` of a customer in the Postgres rollups.
    pub async fn postgres_total(&self, customer: &str) -> u64 {
        let sum: Option<i64> = sqlx::query_scalar(
            "SELECT sum(quantity)::bigint FROM usage_records WHERE customer_id = $1",
        )
        .bind(customer)
        .fetch_one(&self.pool)
        .await
        .expect("cannot read usage_records");
        sum.map_or(0, |s| s.max(0) as u64)
    }

    /// Rows and sum of `quantity` of a customer in ClickHouse `usage_events`.
    pub async fn clickhouse_events(&self, customer: &str) -> (u64, u64) {
        self.config
            .clickhouse()
            .query("SELECT count(), sum(quantity) FROM usage_events WHERE customer_id = ?")
            .bind(customer)
            .fetch_one::<(u64, u64)>()
            .await
            .expect("cannot read usage_events")
    }

    /// Sum of `quantity` of a customer in the ClickHouse daily rollup.
    pub async fn clickhouse_daily_total(&self, customer: &str) -> u64 {
        self.config
            .clickhouse()
            .query("SELECT sum(quantity) FROM usage_daily WHERE customer_id = ?")
            .bind(customer)
            .fetch_one::<u64>()
            .await
            .expect("cannot read usage_daily")
    }

    /// Creates databases and applies every migration to both.
    pub async fn migrated() -> Self {
        let stores = Self::empty().await;
        crate::migrate::migrate_all(&stores.pool, &stores.config)
            .await
            .expect("migrations failed on empty databases");
        stores
    }
}

/// Byte range of the `host:port` part of a URL.
fn host_span(url: &str) -> (usize, usize) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let start = url[after_scheme..]
        .find('@')
        .map_or(after_scheme, |i| after_scheme + i + 1);
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    (start, end)
}

/// `url` with its `host:port` replaced by `addr` (to route a store through a [`Proxy`]).
pub fn with_address(url: &str, addr: SocketAddr) -> String {
    let (start, end) = host_span(url);
    format!("{}{addr}{}", &url[..start], &url[end..])
}

/// The `host:port` of a URL, resolved to a socket address.
pub fn address_of(url: &str) -> SocketAddr {
    let (start, end) = host_span(url);
    std::net::ToSocketAddrs::to_socket_addrs(&url[start..end])
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("no address in {url}"))
}

/// A TCP proxy on loopback in front of a real store: `set_down(true)` cuts every open
/// connection and refuses new ones until `set_down(false)`, as a store outage looks to a
/// client, without stopping the shared server other tests use.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    down: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (down, _) = watch::channel(false);
        let watcher = down.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut cut = watcher.subscribe();
                if *cut.borrow() {
                    continue; // dropped at once: connection reset
                }
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|down| *down) => {}
                    }
                });
            }
        });
        Self { addr, down, task }
    }

    /// Takes the store away (`true`) or brings it back (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::{with_address, with_database};

    #[test]
    fn addresses_are_replaced_in_urls() {
        let to = "127.0.0.1:9".parse().unwrap();
        assert_eq!(
            with_address("postgres://u:p@h:1/apex?x=1", to),
            "postgres://u:p@127.0.0.1:9/apex?x=1"
        );
        assert_eq!(
            with_address("http://127.0.0.1:18123", to),
            "http://127.0.0.1:9"
        );
    }

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://u:p@h:1/apex?sslmode=disable", "t1"),
            "postgres://u:p@h:1/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "t1"), "postgres://h:1/t1");
        assert_eq!(with_database("postgres://h:1/", "t1"), "postgres://h:1/t1");
    }
}
