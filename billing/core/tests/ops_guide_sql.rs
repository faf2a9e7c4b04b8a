//! Every SQL snippet of the operations guide (manual operations, troubleshooting, Grafana)
//! runs unchanged against the migrated schema. The snippets are kept verbatim as fixture
//! files; parameterized ones run as a prepared statement with untyped arguments, which is how
//! the guide's Node.js client sends them (so `$2` into `data jsonb` is parsed as JSON).

use std::path::PathBuf;

use apex_core::testing::TestStores;
use sqlx::{AssertSqlSafe, Row};

struct Snippet {
    file: String,
    sql: String,
    params: Option<Vec<String>>,
}

fn snippets() -> Vec<Snippet> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(apex_core::testing::package_dir().join("tests/fixtures/ops-guide-sql"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "sql"))
            .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let params = text
                .lines()
                .find_map(|l| l.strip_prefix("-- params: "))
                .map(|json| serde_json::from_str(json).unwrap());
            let sql = text
                .lines()
                .filter(|l| !l.starts_with("-- from: ") && !l.starts_with("-- params: "))
                .collect::<Vec<_>>()
                .join("\n");
            Snippet {
                file: path.file_name().unwrap().to_string_lossy().into_owned(),
                sql,
                params,
            }
        })
        .collect()
}

fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

async fn seed(stores: &TestStores) {
    sqlx::raw_sql(
        "INSERT INTO customers (id, name, email) VALUES ('cus_xxx', 'Example', 'ops@example.com');
         INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) VALUES
           ('cus_xxx', 'impressions', date_trunc('hour', now() - interval '1 day'), 28000),
           ('cus_xxx', 'impressions', date_trunc('hour', now()), 32000),
           ('cus_xxx', 'api_calls', date_trunc('hour', now()), 2800);
         INSERT INTO dunning_attempts (customer_id, invoice_id, attempt_number, status, next_retry_at) VALUES
           ('cus_xxx', 'in_1', 1, 'failed', NULL),
           ('cus_xxx', 'in_1', 2, 'pending', now() - interval '1 minute'),
           ('cus_xxx', 'in_2', 1, 'succeeded', NULL);
         INSERT INTO events (event_type, data, processed_at, error_message) VALUES
           ('email.payment_failed', '{\"to\": \"ops@example.com\"}', NULL, NULL),
           ('email.trial_ending', '{\"to\": \"ops@example.com\"}', now(), 'provider refused');
         INSERT INTO email_log (customer_id, email_type, recipient) VALUES ('cus_xxx', 'trial_ending_7d', 'ops@example.com');
         INSERT INTO usage_alerts (customer_id, metric_type, threshold_percent, period_start, usage_quantity, limit_quantity)
           SELECT 'cus_xxx', 'impressions', t, date_trunc('month', now()), 1, 1 FROM generate_series(1, 12) AS t;",
    )
    .execute(&stores.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn every_snippet_of_the_guide_runs_against_the_schema() {
    let stores = TestStores::migrated().await;
    seed(&stores).await;
    let all = snippets();
    assert_eq!(all.len(), 16, "the guide has 16 SQL snippets");
    for snippet in &all {
        let result = match &snippet.params {
            None => {
                sqlx::raw_sql(AssertSqlSafe(snippet.sql.clone()))
                    .execute(&stores.pool)
                    .await
            }
            Some(params) => {
                let args: Vec<String> = params.iter().map(|p| literal(p)).collect();
                let statement = format!("s_{}", &snippet.file[..2]);
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "PREPARE {statement} AS {}; EXECUTE {statement}({}); DEALLOCATE {statement};",
                    snippet.sql.trim().trim_end_matches(';'),
                    args.join(", ")
                )))
                .execute(&stores.pool)
                .await
            }
        };
        if let Err(e) = result {
            panic!(
                "{} fails against the schema: {e}\n{}",
                snippet.file, snippet.sql
            );
        }
    }
}

#[tokio::test]
async fn snippets_return_what_the_guide_promises() {
    let stores = TestStores::migrated().await;
    seed(&stores).await;
    let by_file = |name: &str| {
        snippets()
            .into_iter()
            .find(|s| s.file.contains(name))
            .unwrap()
            .sql
    };
    // The snippet runs unchanged as a subquery; the outer query only casts SUM's numeric.
    let usage: Vec<(String, i64, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT customer_id, impressions::bigint, api_calls::bigint FROM ({}) AS q",
        by_file("check_customer_usage").trim().trim_end_matches(';')
    )))
    .fetch_all(&stores.pool)
    .await
    .unwrap();
    assert_eq!(usage, [("cus_xxx".to_owned(), 60_000, 2_800)]);

    let due = sqlx::raw_sql(AssertSqlSafe(by_file("pending_dunning_retries")))
        .fetch_all(&stores.pool)
        .await
        .unwrap();
    assert_eq!(due.len(), 1, "one pending retry is due");

    let spam = sqlx::raw_sql(AssertSqlSafe(by_file("alert_frequency")))
        .fetch_all(&stores.pool)
        .await
        .unwrap();
    assert_eq!(spam.len(), 1, "12 alerts in a week is more than 10");

    let queue = sqlx::raw_sql(AssertSqlSafe(by_file("emails_in_queue")))
        .fetch_all(&stores.pool)
        .await
        .unwrap();
    let recipient: serde_json::Value = queue[0].get("recipient");
    assert_eq!(recipient, serde_json::json!("ops@example.com"));
}

/// Statements of the guide, extracted from its code blocks: ```sql blocks split at `;`,
/// `psql -c "..."` bodies, and `db.query(`...`)` templates. Whitespace is normalized.
fn statements_in_guide(guide: &str) -> Vec<String> {
    let normalize = |s: &str| {
        s.lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join(" ")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .trim_end_matches(';')
            .to_owned()
    };
    let mut found = Vec::new();
    let mut rest = guide;
    while let Some(start) = rest.find("```sql\n") {
        let body = &rest[start + 7..];
        let end = body.find("```").unwrap();
        found.extend(
            body[..end]
                .split(';')
                .map(normalize)
                .filter(|s| !s.is_empty()),
        );
        rest = &body[end..];
    }
    for (open, close) in [("psql $DATABASE_URL -c \"", "\""), ("db.query(`", "`")] {
        let mut rest = guide;
        while let Some(start) = rest.find(open) {
            let body = &rest[start + open.len()..];
            let end = body.find(close).unwrap();
            found.push(normalize(&body[..end]));
            rest = &body[end..];
        }
    }
    found
}

#[test]
fn fixtures_cover_every_statement_of_the_guide() {
    // The guide lives beside the repository (`shared/` next to the clone, in CI and on
    // developer machines), not in it; a checkout with `shared/` inside is looked at too, and
    // `APEX_OPS_GUIDE` names it anywhere. Where the guide must be (`APEX_OPS_GUIDE` or `CI`
    // set), not finding it fails: a coverage check that skips itself in CI checks nothing.
    let named = std::env::var_os("APEX_OPS_GUIDE").map(std::path::PathBuf::from);
    let package = apex_core::testing::package_dir();
    let candidates = match &named {
        Some(path) => vec![path.clone()],
        None => vec![
            package.join("../../../shared/spec/operations-guide.md"),
            package.join("../../shared/spec/operations-guide.md"),
        ],
    };
    let Some(guide) = candidates
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
    else {
        assert!(
            named.is_none() && std::env::var_os("CI").is_none(),
            "operations guide not found at {candidates:?}, and APEX_OPS_GUIDE or CI is set"
        );
        eprintln!("operations guide not found at {candidates:?}: coverage not re-checked");
        return;
    };
    let fixtures: Vec<String> = snippets()
        .iter()
        .map(|s| {
            s.sql
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .trim_end_matches(';')
                .to_owned()
        })
        .collect();
    let statements = statements_in_guide(&guide);
    assert_eq!(statements.len(), 16);
    for statement in statements {
        assert!(
            fixtures.contains(&statement),
            "not in the fixtures: {statement}"
        );
    }
}
