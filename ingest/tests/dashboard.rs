//! The dashboard API over real HTTP, with usage written through the real pipeline into the
//! test's own Postgres and ClickHouse databases: current usage and overages, analytics from
//! ClickHouse's daily rollup, limits, the invoice preview with revenue set by the admin
//! endpoint, and every way a token or a parameter can be wrong.

mod common;

use std::time::Duration;

use apex_billing::tokens;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{Datelike, Utc};
use common::{Answer, JWT_SECRET, TestServer};
use serde_json::{Value, json};

const ADMIN: &str = "admin-token-for-tests-0123456789";

/// Signs `claims` with `secret` (never empty here).
fn sign(claims: &Value, secret: &[u8]) -> String {
    tokens::sign(claims, secret).unwrap()
}

fn token_for(customer: &str) -> String {
    sign(
        &json!({"sub": customer, "exp": Utc::now().timestamp() + 300}),
        JWT_SECRET.as_bytes(),
    )
}

async fn dashboard(server: &TestServer, path: &str, token: &str) -> Answer {
    common::get_with(
        server.addr,
        path,
        &[&format!("Authorization: Bearer {token}")],
    )
    .await
}

async fn track(server: &TestServer, key: &str, metric: &str, quantity: &str) {
    let answer = common::post(
        server.addr,
        "/api/usage/track",
        &["Content-Type: application/json"],
        format!(r#"{{"api_key":"{key}","metric_type":"{metric}","quantity":{quantity}}}"#)
            .as_bytes(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}

/// A starter customer with 1,500,000 impressions, 40,000 API calls and 35.2 GB this month,
/// landed in Postgres.
async fn customer_with_usage(server: &TestServer) -> (String, String) {
    let (customer, key) = common::customer(server).await;
    track(server, &key, "impressions", "1000000").await;
    track(server, &key, "impressions", "500000").await;
    track(server, &key, "api_calls", "40000").await;
    track(server, &key, "data_transfer", "35.2").await;
    common::assert_total(server, &customer, "impressions", 1_500_000).await;
    common::assert_total(server, &customer, "api_calls", 40_000).await;
    common::assert_total(server, &customer, "data_transfer", 35_200_000_000).await;
    (customer, key)
}

fn this_month() -> String {
    let now = Utc::now();
    format!("{:04}-{:02}", now.year(), now.month())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_usage_shows_the_period_and_prices_the_overage() {
    let server = common::start().await;
    let (customer, _) = customer_with_usage(&server).await;
    let answer = dashboard(&server, "/api/usage/current", &token_for(&customer)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    let usage = &body["usage"];
    assert_eq!(usage["customer_id"], customer.as_str());
    assert_eq!(usage["impressions"], 1_500_000);
    assert_eq!(usage["api_calls"], 40_000);
    // Exactly 35.2 in the JSON text, not a float approximation.
    assert!(
        answer.body.contains("\"data_transfer_gb\":35.2"),
        "{}",
        answer.body
    );
    let month_start = format!("{}-01T00:00:00Z", this_month());
    assert_eq!(usage["period_start"], month_start.as_str());
    // Starter: 1,000,000 impressions included, 10 cents per 1,000 over.
    let overages = &body["overages"];
    assert_eq!(overages["impressions_overage"], 500_000);
    assert_eq!(overages["impressions_overage_cost_cents"], 5_000);
    assert_eq!(overages["api_calls_overage"], 0);
    assert_eq!(overages["api_calls_overage_cost_cents"], 0);
    assert_eq!(overages["data_transfer_gb_overage"], 0);
    assert_eq!(overages["total_overage_cost_cents"], 5_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_show_the_share_used_and_the_projection() {
    let server = common::start().await;
    let (customer, _) = customer_with_usage(&server).await;
    let answer = dashboard(&server, "/api/usage/limits", &token_for(&customer)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["plan_type"], "starter");
    assert_eq!(body["limits"]["impressions"], 1_000_000);
    assert_eq!(body["current_usage"]["impressions"], 1_500_000);
    assert_eq!(body["remaining"]["impressions"], 0);
    assert_eq!(body["remaining"]["api_calls"], 60_000);
    assert_eq!(body["percent_used_by_metric"]["impressions"], 150);
    assert_eq!(body["percent_used_by_metric"]["api_calls"], 40);
    assert_eq!(body["percent_used"], 150);
    assert_eq!(body["will_exceed"], true);
    assert!(body["limits"]["data_transfer_gb"].is_number());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_come_from_the_daily_rollup_with_empty_days_as_zero() {
    let server = common::start().await;
    let (customer, _) = customer_with_usage(&server).await;
    let token = token_for(&customer);
    // ClickHouse's applier runs apart from Postgres': wait for the rollup to hold it all.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let body = loop {
        let answer = dashboard(&server, "/api/usage/analytics", &token).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let body = answer.json();
        if body["total_impressions"] == 1_500_000 && body["total_api_calls"] == 40_000 {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let days = body["daily_usage"].as_array().unwrap();
    assert_eq!(days.len(), 30);
    assert_eq!(body["days"], 30);
    let today = Utc::now().date_naive().to_string();
    let last = days.last().unwrap();
    assert_eq!(last["date"], today.as_str());
    assert_eq!(last["impressions"], 1_500_000);
    assert_eq!(last["data_transfer_gb"], json!(35.2));
    assert!(
        days[..29]
            .iter()
            .all(|d| d["impressions"] == 0 && d["api_calls"] == 0)
    );
    assert_eq!(body["avg_daily_impressions"], 50_000);
    assert_eq!(body["total_data_transfer_gb"], json!(35.2));

    let week = dashboard(&server, "/api/usage/analytics?days=7", &token)
        .await
        .json();
    assert_eq!(week["daily_usage"].as_array().unwrap().len(), 7);
    assert_eq!(week["avg_daily_impressions"], 1_500_000 / 7);
    let year = dashboard(&server, "/api/usage/analytics?days=365", &token).await;
    assert_eq!(year.json()["daily_usage"].as_array().unwrap().len(), 365);
    // Parameters are percent-decoded: `3%30` is 30.
    let encoded = dashboard(&server, "/api/usage/analytics?days=3%30", &token).await;
    assert_eq!(encoded.status, 200, "{}", encoded.body);
    assert_eq!(encoded.json()["days"], 30);
    // The token is checked before the parameters.
    let anonymous = common::get(server.addr, "/api/usage/analytics?days=0").await;
    assert_eq!(anonymous.status, 401);
    for bad in ["0", "366", "abc", "-5", "1.5", ""] {
        let answer = dashboard(&server, &format!("/api/usage/analytics?days={bad}"), &token).await;
        assert_eq!(answer.status, 400, "days={bad}: {}", answer.body);
        assert_eq!(answer.error_code(), "invalid_days");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preview_charges_the_platform_fee_on_reported_revenue_and_the_overage() {
    let server = common::start_with(&[("APEX_ADMIN_TOKEN", ADMIN)], None).await;
    let (customer, _) = customer_with_usage(&server).await;
    let token = token_for(&customer);
    let month = this_month();
    let path = format!("/api/billing/preview?month={month}");

    // No revenue reported yet: only the overage.
    let before = dashboard(&server, &path, &token).await;
    assert_eq!(before.status, 200, "{}", before.body);
    let before = before.json();
    assert_eq!(before["mediated_revenue_cents"], Value::Null);
    assert_eq!(before["total_cents"], 5_000);

    // The guide's example: $50,000 of revenue falls in the Growth band, 2.5 % = $1,250.
    let admin = |body: Value, auth: &'static str| {
        let addr = server.addr;
        async move {
            common::post(
                addr,
                "/api/admin/revenue",
                &["Content-Type: application/json", auth],
                body.to_string().as_bytes(),
            )
            .await
        }
    };
    let auth_ok: &'static str =
        Box::leak(format!("Authorization: Bearer {ADMIN}").into_boxed_str());
    let set = admin(
        json!({"customer_id": customer, "month": month, "cents": 5_000_000}),
        auth_ok,
    )
    .await;
    assert_eq!(set.status, 200, "{}", set.body);
    assert_eq!(set.json()["revenue_cents"], 5_000_000);

    let preview = dashboard(&server, &path, &token).await.json();
    assert_eq!(preview["mediated_revenue_cents"], 5_000_000);
    assert_eq!(preview["platform_fee"]["band"], "growth");
    assert_eq!(preview["platform_fee"]["amount_cents"], 125_000);
    let lines = preview["lines"].as_array().unwrap();
    let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["platform_fee", "overage"]);
    assert_eq!(lines[0]["amount_cents"], 125_000);
    assert!(
        lines[0]["description"]
            .as_str()
            .unwrap()
            .contains("$50,000.00")
    );
    assert_eq!(lines[1]["metric"], "impressions");
    assert_eq!(lines[1]["quantity"], 500_000);
    assert_eq!(lines[1]["amount_cents"], 5_000);
    assert_eq!(preview["total_cents"], 130_000);

    // Setting it again replaces it.
    admin(
        json!({"customer_id": customer, "month": month, "cents": 100}),
        auth_ok,
    )
    .await;
    let preview = dashboard(&server, &path, &token).await.json();
    assert_eq!(preview["platform_fee"]["band"], "starter");
    assert_eq!(preview["total_cents"], 5_000);

    // A month without usage or revenue is empty; bad months are refused.
    let empty = dashboard(&server, "/api/billing/preview?month=2020-01", &token)
        .await
        .json();
    assert_eq!(empty["total_cents"], 0);
    assert_eq!(empty["lines"], json!([]));
    // Months whose periods an RFC 3339 date-time cannot show (9999-12 would end in year
    // 10000) are refused; every answer stays valid against the spec (the test client checks
    // each one against openapi.yaml).
    for bad in ["2025-13", "2025-1", "nope", "", "9999-12", "9999-01"] {
        let answer = dashboard(
            &server,
            &format!("/api/billing/preview?month={bad}"),
            &token,
        )
        .await;
        assert_eq!(answer.status, 400, "{bad}: {}", answer.body);
        assert_eq!(answer.error_code(), "invalid_month");
    }
    let last = dashboard(&server, "/api/billing/preview?month=9998-12", &token).await;
    assert_eq!(last.status, 200, "{}", last.body);
    assert_eq!(last.json()["period_end"], "9999-01-01T00:00:00Z");
    let missing = dashboard(&server, "/api/billing/preview", &token).await;
    assert_eq!(missing.status, 400);

    // The admin endpoint's refusals.
    let body = json!({"customer_id": customer, "month": month, "cents": 1});
    assert_eq!(admin(body.clone(), "X-Nothing: 1").await.status, 401);
    assert_eq!(
        admin(
            body.clone(),
            "Authorization: Bearer wrong-token-wrong-token"
        )
        .await
        .status,
        401
    );
    let unknown = admin(
        json!({"customer_id": "cus_nobody", "month": month, "cents": 1}),
        auth_ok,
    )
    .await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    for (bad, code) in [
        (
            json!({"customer_id": customer, "month": "2025-13", "cents": 1}),
            "invalid_month",
        ),
        (
            json!({"customer_id": customer, "month": "9999-12", "cents": 1}),
            "invalid_month",
        ),
        (
            json!({"customer_id": customer, "month": month, "cents": -1}),
            "invalid_field",
        ),
        (
            json!({"customer_id": customer, "month": month, "cents": 1.5}),
            "invalid_field",
        ),
        (
            json!({"customer_id": customer, "month": month}),
            "invalid_field",
        ),
        (
            json!({"customer_id": "robert'); DROP", "month": month, "cents": 1}),
            "invalid_customer_id",
        ),
        (
            json!({"customer_id": customer, "month": month, "cents": 1, "extra": true}),
            "invalid_field",
        ),
    ] {
        let answer = admin(bad.clone(), auth_ok).await;
        assert_eq!(answer.status, 400, "{bad}: {}", answer.body);
        assert_eq!(answer.error_code(), code, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_does_not_exist_without_a_token() {
    let server = common::start().await;
    let answer = common::post(
        server.addr,
        "/api/admin/revenue",
        &[
            "Content-Type: application/json",
            "Authorization: Bearer anything-anything",
        ],
        br#"{"customer_id":"cus_x","month":"2025-11","cents":1}"#,
    )
    .await;
    assert_eq!(answer.status, 404, "{}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_401_and_a_token_sees_only_its_own_customer() {
    let server = common::start().await;
    let (customer, _) = customer_with_usage(&server).await;
    let (other, other_key) = common::customer(&server).await;
    track(&server, &other_key, "impressions", "7").await;
    common::assert_total(&server, &other, "impressions", 7).await;

    let now = Utc::now().timestamp();
    let claims = json!({"sub": customer, "exp": now + 300});
    let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
    let unsigned = |alg: &str| {
        format!(
            "{}.{}.",
            b64(&format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#)),
            b64(&claims.to_string())
        )
    };
    let cases: Vec<(String, Option<String>, &str)> = vec![
        ("missing".into(), None, "missing_token"),
        (
            "malformed".into(),
            Some("not-a-jwt".into()),
            "invalid_token",
        ),
        (
            "wrong signature".into(),
            Some(sign(&claims, b"some-other-secret-some-other-secret")),
            "invalid_signature",
        ),
        (
            "alg none".into(),
            Some(unsigned("none")),
            "unsupported_algorithm",
        ),
        (
            "HS512".into(),
            Some(unsigned("HS512")),
            "unsupported_algorithm",
        ),
        (
            "RS256".into(),
            Some(unsigned("RS256")),
            "unsupported_algorithm",
        ),
        (
            "expired".into(),
            Some(sign(
                &json!({"sub": customer, "exp": now - 1}),
                JWT_SECRET.as_bytes(),
            )),
            "token_expired",
        ),
        (
            "no exp".into(),
            Some(sign(&json!({"sub": customer}), JWT_SECRET.as_bytes())),
            "missing_expiry",
        ),
        (
            "unknown customer".into(),
            Some(token_for("cus_doesnotexist")),
            "invalid_subject",
        ),
    ];
    for path in [
        "/api/usage/current",
        "/api/usage/limits",
        "/api/usage/analytics",
        "/api/billing/preview?month=2025-11",
    ] {
        for (name, token, code) in &cases {
            let answer = match token {
                Some(t) => dashboard(&server, path, t).await,
                None => common::get(server.addr, path).await,
            };
            assert_eq!(answer.status, 401, "{path} {name}: {}", answer.body);
            assert_eq!(answer.error_code(), *code, "{path} {name}");
            assert_eq!(answer.json()["success"], false);
        }
    }
    // Basic auth or an API key is not a dashboard token.
    let answer = common::get_with(
        server.addr,
        "/api/usage/current",
        &[&format!("Authorization: Bearer {other_key}")],
    )
    .await;
    assert_eq!(answer.status, 401);

    // The other customer's token sees the other customer, whatever the query says.
    let answer = dashboard(
        &server,
        &format!("/api/usage/current?customer_id={customer}"),
        &token_for(&other),
    )
    .await;
    assert_eq!(answer.status, 200);
    let body = answer.json();
    assert_eq!(body["usage"]["customer_id"], other.as_str());
    assert_eq!(body["usage"]["impressions"], 7);

    // Write methods are refused on read endpoints.
    let answer = common::post(server.addr, "/api/usage/current", &[], b"").await;
    assert_eq!(answer.status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issued_invoice_is_listed_and_equals_the_preview_and_stripe_to_the_cent() {
    use apex_stripe::catalog::{sync_catalog, sync_customers};
    use apex_stripe::client::{ClientSettings, StripeClient};
    use apex_stripe::invoicing::{CloseRequest, close_invoices};
    use apex_stripe::testing::{StripeStandIn, TEST_KEY};

    let server = common::start_with(&[("APEX_ADMIN_TOKEN", ADMIN)], None).await;
    // Usage through the edge and the pipeline: 500,000 impressions over Starter's million.
    let (customer, _) = customer_with_usage(&server).await;
    let month = this_month();
    let revenue = common::post(
        server.addr,
        "/api/admin/revenue",
        &[
            "Content-Type: application/json",
            &format!("Authorization: Bearer {ADMIN}"),
        ],
        json!({"customer_id": customer, "month": month, "cents": 5_000_000})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(revenue.status, 200, "{}", revenue.body);
    let token = token_for(&customer);
    let listed = dashboard(&server, "/api/billing/invoices", &token).await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.json()["invoices"], json!([]));

    // The month closes (the job's clock: six hours after it ended).
    let standin = StripeStandIn::start();
    let stripe =
        StripeClient::new(&standin.base_url(), TEST_KEY, ClientSettings::default()).unwrap();
    let pool = &server.stores.pool;
    sync_catalog(pool, &stripe).await.unwrap();
    sync_customers(pool, &stripe, Some(&customer))
        .await
        .unwrap();
    let period = apex_billing::pricing::parse_month(&month).unwrap();
    let request = CloseRequest {
        customer: Some(customer.clone()),
        period: Some(period),
        now: period.end + chrono::Duration::hours(6),
        settings: Default::default(),
    };
    let summary = close_invoices(pool, &stripe, &request).await.unwrap();
    assert_eq!(summary.issued.len(), 1, "{summary:?}");

    let preview = dashboard(
        &server,
        &format!("/api/billing/preview?month={month}"),
        &token,
    )
    .await;
    assert_eq!(preview.status, 200, "{}", preview.body);
    let preview = preview.json();
    // $1,250.00 platform fee and 500,000 impressions over at 10 cents per 1,000: $50.00.
    assert_eq!(preview["total_cents"], 125_000 + 5_000);
    let listed = dashboard(&server, "/api/billing/invoices?limit=5", &token).await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let body = listed.json();
    let invoice = &body["invoices"][0];
    assert_eq!(invoice["month"], month.as_str());
    assert_eq!(invoice["status"], "open");
    assert_eq!(invoice["total_cents"], preview["total_cents"]);
    assert_eq!(invoice["lines"].as_array().unwrap().len(), 2);
    assert_eq!(invoice["lines"][0]["line_key"], "platform_fee");
    assert!(
        invoice["hosted_invoice_url"]
            .as_str()
            .unwrap()
            .starts_with("https://")
    );
    let stripe_invoice = standin.invoice(invoice["stripe_invoice_id"].as_str().unwrap());
    assert_eq!(stripe_invoice["total"], preview["total_cents"]);

    // Bad input: a clear 400, and no token at all is a 401.
    for limit in ["0", "101", "x", "-1", "1.5"] {
        let answer = dashboard(
            &server,
            &format!("/api/billing/invoices?limit={limit}"),
            &token,
        )
        .await;
        assert_eq!(answer.status, 400, "{limit}: {}", answer.body);
        assert_eq!(answer.error_code(), "invalid_limit");
    }
    let anonymous = common::get(server.addr, "/api/billing/invoices").await;
    assert_eq!(anonymous.status, 401);
}
