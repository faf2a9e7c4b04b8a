//! The bad-input corpus (`tests/fixtures/bad-input/*.json`, one case a file): every case gets
//! its status and error code in the API's JSON error shape, never a 5xx or a dropped
//! connection, and nothing is stored. `{{KEY}}`, `{{REVOKED_KEY}}` and `{{SUSPENDED_KEY}}`
//! in a case stand for keys the test creates.

mod common;

use base64::Engine as _;
use common::{customer, get, post, start};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    path: String,
    headers: Vec<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    body_base64: Option<String>,
    #[serde(default)]
    body_repeat: Option<Repeat>,
    expect_status: u16,
    expect_code: String,
}

#[derive(Deserialize)]
struct Repeat {
    prefix: String,
    item: String,
    separator: String,
    count: usize,
    suffix: String,
}

fn cases() -> Vec<(String, Case)> {
    let dir = apex_core::testing::package_dir().join("tests/fixtures/bad-input");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let case: Case =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                case,
            )
        })
        .collect()
}

#[tokio::test]
async fn every_bad_input_gets_its_4xx_and_changes_nothing() {
    let server = start().await;
    let (_, key) = customer(&server).await;
    let (_, revoked) = customer(&server).await;
    apex_billing::keys::revoke_key(&server.stores.pool, &revoked)
        .await
        .unwrap();
    let (suspended_customer, suspended) = customer(&server).await;
    sqlx::query("UPDATE customers SET status = 'suspended' WHERE id = $1")
        .bind(&suspended_customer)
        .execute(&server.stores.pool)
        .await
        .unwrap();
    // Let the key cache hear of both changes before the cases run.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let fill = |s: &str| {
        s.replace("{{KEY}}", &key)
            .replace("{{REVOKED_KEY}}", &revoked)
            .replace("{{SUSPENDED_KEY}}", &suspended)
    };

    let all = cases();
    assert!(all.len() >= 40, "the corpus has {} cases", all.len());
    let mut failures = Vec::new();
    for (file, case) in &all {
        let body: Vec<u8> = match (&case.body, &case.body_base64, &case.body_repeat) {
            (Some(text), _, _) => fill(text).into_bytes(),
            (_, Some(b64), _) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
            (_, _, Some(r)) => {
                let items = vec![r.item.as_str(); r.count].join(&r.separator);
                fill(&format!("{}{items}{}", r.prefix, r.suffix)).into_bytes()
            }
            _ => Vec::new(),
        };
        let headers: Vec<String> = case.headers.iter().map(|h| fill(h)).collect();
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let answer = post(server.addr, &case.path, &headers, &body).await;
        let code = serde_json::from_str::<serde_json::Value>(&answer.body)
            .ok()
            .filter(|json| json["success"] == false && json["error"]["message"].is_string())
            .and_then(|json| json["error"]["code"].as_str().map(str::to_owned));
        if answer.status != case.expect_status || code.as_deref() != Some(case.expect_code.as_str())
        {
            failures.push(format!(
                "{file} ({}): expected {} {}, got {} {}",
                case.name, case.expect_status, case.expect_code, answer.status, answer.body
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );

    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_records")
        .fetch_one(&server.stores.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "a refused request stored something");
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
}
