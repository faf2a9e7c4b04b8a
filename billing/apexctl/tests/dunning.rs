//! `apexctl dunning ...` end to end: the binary on the test's own Postgres (and the Stripe
//! stand-in for `process`), with cases opened by the real webhook code
//! (`apex_billing::webhooks::handle` of `invoice.payment_failed`) and time set by the
//! simulated clock (`APEX_CLOCK_*`): `status` by our id and by the Stripe id, text and JSON;
//! `process` making each retry on its day exactly once, down to the suspension; `reactivate`,
//! `exempt` and `close` recording who and why; and every bad request refused with a clear
//! message and a non-zero exit.

mod common;

use apex_billing::customers::{self, NewCustomer};
use apex_billing::dunning::{self, AttemptResult, Policy, Recorded};
use apex_billing::{subscriptions, webhooks};
use apex_core::testing::TestStores;
use apex_stripe::catalog::{sync_catalog, sync_customers};
use apex_stripe::client::{ClientSettings, StripeClient};
use apex_stripe::testing::{CardOutcome, StripeStandIn, TEST_KEY};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};

/// What a run of the binary gave: exit code, stdout, stderr.
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}{}", self.out, self.err))
    }

    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "stdout: {}\nstderr: {}", self.out, self.err);
        self
    }
}

/// `apexctl args` on the test's databases, at `now` on the simulated clock when given, with
/// the stand-in's key and URL when given. `$USER` is `ops-test` (the default `--by`).
fn apexctl(
    stores: &TestStores,
    standin: Option<&StripeStandIn>,
    now: Option<DateTime<Utc>>,
    args: &[&str],
) -> Run {
    let mut command = common::apexctl_command(stores);
    command
        .args(args)
        .env_remove("APEX_DUNNING_RETRY_DAYS")
        .env_remove("APEX_DUNNING_POSTPONE_SECS")
        .env_remove("APEX_STRIPE_RATE")
        .env_remove("SUDO_USER")
        .env("USER", "ops-test");
    if let Some(now) = now {
        command
            .env("APEX_CLOCK_START", now.to_rfc3339())
            .env("APEX_CLOCK_SPEED", "1");
    }
    if let Some(standin) = standin {
        command
            .env("STRIPE_SECRET_KEY", TEST_KEY)
            .env("STRIPE_API_BASE", standin.base_url());
    }
    let out = command.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A customer of this test: our id, its subscription's id, and (once mapped) its Stripe
/// customer and subscription.
struct Customer {
    id: String,
    subscription: i64,
    stripe_id: String,
    stripe_subscription: String,
}

/// Signs up an active (no trial) Starter customer named `name`.
async fn signup(stores: &TestStores, name: &str) -> (String, i64) {
    let new = NewCustomer {
        name: name.into(),
        email: "billing@dunning.example".into(),
        plan_id: "starter".into(),
        trial_days: Some(0),
    };
    let created =
        customers::create_customer(&mut stores.pool.acquire().await.unwrap(), &new, Utc::now())
            .await
            .unwrap();
    (created.customer.id, created.subscription_id)
}

/// A customer mapped to made-up Stripe ids (no Stripe involved).
async fn mapped_customer(stores: &TestStores, name: &str) -> Customer {
    let (id, subscription) = signup(stores, name).await;
    let suffix = id.trim_start_matches("cus_");
    let stripe_id = format!("cus_stripe{suffix}");
    let stripe_subscription = format!("sub_stripe{suffix}");
    customers::set_stripe_customer_id(&stores.pool, &id, &stripe_id)
        .await
        .unwrap();
    subscriptions::set_stripe_ids(&stores.pool, subscription, &stripe_subscription, &stripe_id)
        .await
        .unwrap();
    Customer {
        id,
        subscription,
        stripe_id,
        stripe_subscription,
    }
}

/// Now, to the second (Stripe's `created` is whole seconds): Day 0 of the cases.
fn day0() -> DateTime<Utc> {
    DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap()
}

/// Day `day` after `day0` at `hour`:00 UTC.
fn at(day0: DateTime<Utc>, day: i64, hour: u32) -> DateTime<Utc> {
    (day0.date_naive() + Duration::days(day))
        .and_hms_opt(hour, 0, 0)
        .unwrap()
        .and_utc()
}

/// Stripe's `invoice.payment_failed` for `invoice` of Stripe customer `stripe_customer`,
/// created at `day0`, applied by the real webhook code; asserts that it opened a case.
async fn payment_failed(
    stores: &TestStores,
    invoice: &str,
    stripe_customer: &str,
    day0: DateTime<Utc>,
) {
    let body = json!({
        "id": format!("evt_failed_{}", invoice.trim_start_matches("in_")),
        "type": "invoice.payment_failed",
        "created": day0.timestamp(),
        "data": {"object": {
            "id": invoice,
            "customer": stripe_customer,
            "amount_due": 4900,
            "currency": "usd",
            "hosted_invoice_url": "https://invoice.stripe.com/i/x",
            "parent": null,
        }},
    });
    let event = webhooks::parse_event(body.to_string().as_bytes()).unwrap();
    let handled = webhooks::handle(
        &mut stores.pool.acquire().await.unwrap(),
        &Policy::default(),
        &event,
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    assert!(
        matches!(handled, webhooks::Handled::Stored { .. }),
        "{handled:?}"
    );
    let cases: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dunning_attempts WHERE invoice_id = $1 AND attempt_number = 0",
    )
    .bind(invoice)
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(cases, 1, "payment_failed opened no case for {invoice}");
}

/// Makes every retry of `invoice`'s case fail, as the dunning runs of Days 3, 4 and 7 would
/// (the library's claim and record, no Stripe): the customer ends suspended.
async fn decline_every_retry(stores: &TestStores, invoice: &str, day0: DateTime<Utc>) {
    let policy = Policy::default();
    let mut recorded = Vec::new();
    for day in [3, 4, 7] {
        let now = at(day0, day, 3);
        let claim = dunning::claim_next(&stores.pool, now, false)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no retry due on Day {day}"));
        assert_eq!(claim.invoice_id, invoice);
        let result = AttemptResult::Declined {
            code: Some("card_declined".into()),
            message: "Your card was declined.".into(),
        };
        recorded.push(
            dunning::record_attempt(
                &mut stores.pool.acquire().await.unwrap(),
                &policy,
                &claim,
                &result,
                now,
            )
            .await
            .unwrap(),
        );
    }
    assert!(
        matches!(
            recorded[..],
            [
                Recorded::Failed { .. },
                Recorded::Failed { .. },
                Recorded::Suspended
            ]
        ),
        "{recorded:?}"
    );
}

/// A customer suspended by dunning over `invoice`, its case opened at `day0`.
async fn suspended_customer(
    stores: &TestStores,
    name: &str,
    invoice: &str,
    day0: DateTime<Utc>,
) -> Customer {
    let customer = mapped_customer(stores, name).await;
    payment_failed(stores, invoice, &customer.stripe_id, day0).await;
    decline_every_retry(stores, invoice, day0).await;
    assert_eq!(customer_status(stores, &customer.id).await, "suspended");
    customer
}

async fn customer_status(stores: &TestStores, id: &str) -> String {
    sqlx::query_scalar("SELECT status FROM customers WHERE id = $1")
        .bind(id)
        .fetch_one(&stores.pool)
        .await
        .unwrap()
}

async fn subscription_status(stores: &TestStores, id: i64) -> String {
    sqlx::query_scalar("SELECT status FROM subscriptions WHERE id = $1")
        .bind(id)
        .fetch_one(&stores.pool)
        .await
        .unwrap()
}

/// The case row of `invoice`: (status, resolution, resolved_by, resolution_note).
async fn case_row(
    stores: &TestStores,
    invoice: &str,
) -> (String, Option<String>, Option<String>, Option<String>) {
    sqlx::query_as(
        "SELECT status, resolution, resolved_by, resolution_note FROM dunning_attempts \
         WHERE invoice_id = $1 AND attempt_number = 0",
    )
    .bind(invoice)
    .fetch_one(&stores.pool)
    .await
    .unwrap()
}

/// The statuses of `invoice`'s retries, by attempt number.
async fn retry_statuses(stores: &TestStores, invoice: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT status FROM dunning_attempts WHERE invoice_id = $1 AND attempt_number > 0 \
         ORDER BY attempt_number",
    )
    .bind(invoice)
    .fetch_all(&stores.pool)
    .await
    .unwrap()
}

/// The row of attempt `n` in a `status --json` answer.
fn row(status: &Value, invoice: &str, n: i64) -> Value {
    status["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["invoice_id"] == invoice && r["attempt_number"] == n)
        .unwrap_or_else(|| panic!("no attempt {n} of {invoice} in {status}"))
        .clone()
}

/// Asserts that `actual` is `expected` read off the simulated clock: a command reads it a
/// moment after it started, so at most a few seconds later.
fn assert_near(actual: DateTime<Utc>, expected: DateTime<Utc>) {
    let late = actual - expected;
    assert!(
        late >= Duration::zero() && late < Duration::seconds(30),
        "{actual} is not {expected} on the simulated clock"
    );
}

fn time(value: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(
        value
            .as_str()
            .unwrap_or_else(|| panic!("not a time: {value}")),
    )
    .unwrap()
    .with_timezone(&Utc)
}

#[tokio::test]
async fn status_finds_the_case_a_failed_payment_opened_by_either_id() {
    let stores = TestStores::migrated().await;
    let customer = mapped_customer(&stores, "Status Studio").await;
    let day0 = day0();
    let invoice = "in_statuscase1";
    payment_failed(&stores, invoice, &customer.stripe_id, day0).await;
    let day3 = at(day0, 3, 0);

    // Text, by our id.
    let run = apexctl(
        &stores,
        None,
        None,
        &["dunning", "status", "--customer", &customer.id],
    )
    .ok();
    let first = run.out.lines().next().unwrap();
    assert!(
        first.starts_with(&format!(
            "customer {} (Status Studio) matched by our customer id: status active;",
            customer.id
        )),
        "{}",
        run.out
    );
    assert!(
        first.ends_with(&format!("subscription {} past_due", customer.subscription)),
        "{}",
        run.out
    );
    assert!(!first.contains("exempt"), "{}", run.out);
    let case_line = run
        .out
        .lines()
        .find(|l| l.contains(invoice) && l.contains("failed"))
        .unwrap_or_else(|| panic!("{}", run.out));
    assert!(case_line.contains("$49.00"), "{case_line}");
    assert!(
        case_line.contains(&format!("failed {}", day0.format("%Y-%m-%d %H:%M"))),
        "{case_line}"
    );
    assert!(case_line.ends_with("; open"), "{case_line}");
    let retry_line = run
        .out
        .lines()
        .find(|l| l.contains(invoice) && l.contains("pending"))
        .unwrap_or_else(|| panic!("{}", run.out));
    assert!(
        retry_line.contains(&day3.format("%Y-%m-%d 00:00").to_string()),
        "{retry_line}"
    );

    // Text, by the Stripe id.
    let run = apexctl(
        &stores,
        None,
        None,
        &["dunning", "status", "--customer", &customer.stripe_id],
    )
    .ok();
    assert!(
        run.out.starts_with(&format!(
            "customer {} (Status Studio) matched by its Stripe customer id:",
            customer.id
        )),
        "{}",
        run.out
    );
    assert!(run.out.contains(invoice), "{}", run.out);

    // JSON, by our id.
    let status = apexctl(
        &stores,
        None,
        None,
        &["dunning", "status", "--customer", &customer.id, "--json"],
    )
    .ok()
    .json();
    assert_eq!(status["matched"], "customer_id", "{status}");
    assert_eq!(status["customer"]["id"], customer.id.as_str());
    assert_eq!(status["customer"]["status"], "active");
    assert_eq!(
        status["customer"]["stripe_customer_id"],
        customer.stripe_id.as_str()
    );
    assert_eq!(status["customer"]["dunning_exempt"], false);
    assert_eq!(status["subscription"]["id"], customer.subscription);
    assert_eq!(status["subscription"]["status"], "past_due");
    assert_eq!(
        status["subscription"]["stripe_subscription_id"],
        customer.stripe_subscription.as_str()
    );
    assert_eq!(status["rows"].as_array().unwrap().len(), 2, "{status}");
    let case = row(&status, invoice, 0);
    assert_eq!(case["status"], "failed", "{case}");
    assert_eq!(case["customer_id"], customer.id.as_str());
    assert_eq!(case["subscription_id"], customer.subscription);
    assert_eq!(case["amount_due_cents"], 4900);
    assert_eq!(case["currency"], "usd");
    assert_eq!(case["update_payment_url"], "https://invoice.stripe.com/i/x");
    assert_eq!(
        time(&case["failed_at"]),
        day0,
        "Day 0 is the event's created"
    );
    assert!(case["resolution"].is_null(), "{case}");
    let retry = row(&status, invoice, 1);
    assert_eq!(retry["status"], "pending", "{retry}");
    assert_eq!(time(&retry["next_retry_at"]), day3, "00:00 UTC of Day 3");

    // JSON, by the Stripe id; --limit.
    let status = apexctl(
        &stores,
        None,
        None,
        &[
            "dunning",
            "status",
            "--customer",
            &customer.stripe_id,
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(status["matched"], "stripe_customer_id", "{status}");
    assert_eq!(status["customer"]["id"], customer.id.as_str());
    assert_eq!(status["rows"].as_array().unwrap().len(), 2, "{status}");
    let limited = apexctl(
        &stores,
        None,
        None,
        &[
            "dunning",
            "status",
            "--customer",
            &customer.id,
            "--limit",
            "1",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(limited["rows"].as_array().unwrap().len(), 1, "{limited}");

    // A customer without a case.
    let (other, _) = signup(&stores, "Quiet Studio").await;
    let run = apexctl(
        &stores,
        None,
        None,
        &["dunning", "status", "--customer", &other],
    )
    .ok();
    assert!(
        run.out
            .contains("matched by our customer id: status active;"),
        "{}",
        run.out
    );
    assert!(
        run.out.trim_end().ends_with("no dunning case"),
        "{}",
        run.out
    );

    // An unknown id.
    for args in [
        vec!["dunning", "status", "--customer", "cus_nobody"],
        vec!["dunning", "status", "--customer", "cus_nobody", "--json"],
    ] {
        let run = apexctl(&stores, None, None, &args);
        assert_ne!(run.code, 0, "{args:?}: {}", run.out);
        assert!(
            run.err
                .contains("no customer has the id or the Stripe customer id \"cus_nobody\""),
            "{args:?}: {}",
            run.err
        );
        assert!(run.out.is_empty(), "{args:?}: {}", run.out);
    }
}

/// The `/pay` requests the stand-in received for `invoice`, as their idempotency keys.
fn pay_keys(standin: &StripeStandIn, invoice: &str) -> Vec<String> {
    let path = format!("/v1/invoices/{invoice}/pay");
    standin
        .requests()
        .iter()
        .filter(|r| r["method"] == "POST" && r["path"] == path.as_str())
        .map(|r| r["idempotency_key"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn process_makes_each_retry_once_on_its_day_through_stripe() {
    let stores = TestStores::migrated().await;
    let standin = StripeStandIn::start();
    let stripe =
        StripeClient::new(&standin.base_url(), TEST_KEY, ClientSettings::default()).unwrap();
    sync_catalog(&stores.pool, &stripe).await.unwrap();
    let (id, subscription) = signup(&stores, "Retry Games").await;
    let report = sync_customers(&stores.pool, &stripe, Some(&id))
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let stripe_id: String =
        sqlx::query_scalar("SELECT stripe_customer_id FROM customers WHERE id = $1")
            .bind(&id)
            .fetch_one(&stores.pool)
            .await
            .unwrap();

    // A finalized $49.00 invoice in Stripe, and a card that is declined.
    standin.post_json("/v1/invoices", &json!({"customer": stripe_id}));
    let invoice = standin
        .invoices()
        .iter()
        .rev()
        .find(|i| i["customer"] == stripe_id.as_str() && i["status"] == "draft")
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .expect("the draft invoice");
    standin.post_json(
        "/v1/invoiceitems",
        &json!({"customer": stripe_id, "invoice": invoice, "amount": 4900, "currency": "usd"}),
    );
    standin.post_json(&format!("/v1/invoices/{invoice}/finalize"), &json!({}));
    standin.set_card(&stripe_id, CardOutcome::Decline("card_declined"));
    let day0 = day0();
    payment_failed(&stores, &invoice, &stripe_id, day0).await;

    // Without a key nothing runs, and it says why.
    let run = apexctl(&stores, None, Some(at(day0, 3, 3)), &["dunning", "process"]);
    assert_eq!(run.code, 1, "{}", run.out);
    assert!(
        run.err.contains("STRIPE_SECRET_KEY is not set"),
        "{}",
        run.err
    );
    assert_eq!(retry_statuses(&stores, &invoice).await, ["pending"]);

    // Day 2 at 03:00 and just before Day 3: nothing is due; Day 2's run sends the
    // "Payment retry 1 of 3" notice.
    let summary = apexctl(
        &stores,
        Some(&standin),
        Some(at(day0, 2, 3)),
        &["dunning", "process", "--json"],
    )
    .ok()
    .json();
    assert_eq!(summary["attempts"], json!([]), "{summary}");
    assert_eq!(summary["notices"], 1, "{summary}");
    assert_eq!(summary["stripe_unreachable"], false);
    assert_eq!(summary["open_cases"], json!([1, 0]), "{summary}");
    let just_before = at(day0, 3, 0) - Duration::seconds(30);
    let summary = apexctl(
        &stores,
        Some(&standin),
        Some(just_before),
        &["dunning", "process", "--json"],
    )
    .ok()
    .json();
    assert_eq!(summary["attempts"], json!([]), "{summary}");
    assert_eq!(summary["notices"], 0, "the notice went once: {summary}");
    assert!(pay_keys(&standin, &invoice).is_empty());

    // Day 3: attempt 1 is made, declined, and attempt 2 is due at 00:00 of Day 4.
    let summary = apexctl(
        &stores,
        Some(&standin),
        Some(at(day0, 3, 3)),
        &["dunning", "process", "--json"],
    )
    .ok()
    .json();
    let attempts = summary["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{summary}");
    assert_eq!(attempts[0]["customer_id"], id.as_str());
    assert_eq!(attempts[0]["invoice_id"], invoice.as_str());
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[0]["outcome"], "failed", "{summary}");
    assert_eq!(time(&attempts[0]["next_retry_at"]), at(day0, 4, 0));
    assert!(
        attempts[0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("card_declined: "),
        "{summary}"
    );
    assert_eq!(summary["notices"], 1, "retry 2's notice: {summary}");
    assert_eq!(summary["open_cases"], json!([1, 0]), "{summary}");
    assert_eq!(
        pay_keys(&standin, &invoice),
        [format!("apex-dunning-{invoice}-1")]
    );
    assert_eq!(
        retry_statuses(&stores, &invoice).await,
        ["failed", "pending"]
    );

    // The same run again at the same time makes nothing: each attempt is made once.
    let summary = apexctl(
        &stores,
        Some(&standin),
        Some(at(day0, 3, 3)),
        &["dunning", "process", "--json"],
    )
    .ok()
    .json();
    assert_eq!(summary["attempts"], json!([]), "{summary}");
    assert_eq!(summary["notices"], 0, "{summary}");
    assert_eq!(pay_keys(&standin, &invoice).len(), 1);

    // Day 4, in text: attempt 2 fails.
    let run = apexctl(
        &stores,
        Some(&standin),
        Some(at(day0, 4, 3)),
        &["dunning", "process"],
    )
    .ok();
    assert!(
        run.out.contains(&format!(
            "{id} {invoice} attempt 2: failed (card_declined: "
        )),
        "{}",
        run.out
    );
    assert!(
        run.out.contains("1 retries made (0 put off)"),
        "{}",
        run.out
    );
    assert!(
        run.out.contains("open cases: 1 retrying, 0 suspended"),
        "{}",
        run.out
    );

    // Day 7: the last attempt fails and the customer is suspended.
    let summary = apexctl(
        &stores,
        Some(&standin),
        Some(at(day0, 7, 3)),
        &["dunning", "process", "--json"],
    )
    .ok()
    .json();
    let attempts = summary["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{summary}");
    assert_eq!(attempts[0]["attempt"], 3);
    assert_eq!(attempts[0]["outcome"], "suspended", "{summary}");
    assert_eq!(summary["open_cases"], json!([0, 1]), "{summary}");
    assert_eq!(
        pay_keys(&standin, &invoice),
        (1..=3)
            .map(|n| format!("apex-dunning-{invoice}-{n}"))
            .collect::<Vec<_>>()
    );
    let status = apexctl(
        &stores,
        None,
        Some(at(day0, 7, 4)),
        &["dunning", "status", "--customer", &stripe_id, "--json"],
    )
    .ok()
    .json();
    assert_eq!(status["matched"], "stripe_customer_id");
    assert_eq!(status["customer"]["status"], "suspended", "{status}");
    assert_eq!(status["subscription"]["id"], subscription);
    assert_eq!(status["subscription"]["status"], "suspended", "{status}");
    let case = row(&status, &invoice, 0);
    assert_eq!(case["status"], "suspended", "{case}");
    assert_near(time(&case["suspended_at"]), at(day0, 7, 3));
    for n in 1..=3 {
        let retry = row(&status, &invoice, n);
        assert_eq!(retry["status"], "failed", "{retry}");
        assert_eq!(retry["failure_code"], "card_declined", "{retry}");
    }
    // Nothing is left to make.
    let summary = apexctl(
        &stores,
        Some(&standin),
        Some(at(day0, 8, 3)),
        &["dunning", "process", "--json"],
    )
    .ok()
    .json();
    assert_eq!(summary["attempts"], json!([]), "{summary}");
    assert_eq!(pay_keys(&standin, &invoice).len(), 3);
}

#[tokio::test]
async fn reactivate_restores_a_suspended_customer_and_records_who_and_why() {
    let stores = TestStores::migrated().await;
    let day0 = day0();
    let a = suspended_customer(&stores, "Suspended A", "in_reactivatea", day0).await;
    let b = suspended_customer(&stores, "Suspended B", "in_reactivateb", day0).await;
    let day8 = at(day0, 8, 10);

    // A subscription that is not the customer's live one is refused, naming the live one.
    let b_subscription = b.subscription.to_string();
    for wrong in [
        "sub_wrong",
        b.stripe_subscription.as_str(),
        b_subscription.as_str(),
    ] {
        let run = apexctl(
            &stores,
            None,
            Some(day8),
            &[
                "dunning",
                "reactivate",
                "--customer",
                &a.id,
                "--subscription",
                wrong,
                "--by",
                "alice",
            ],
        );
        assert_eq!(run.code, 1, "{wrong}: {}", run.out);
        assert!(
            run.err.contains(&format!(
                "{wrong} is not the live subscription of {} (that is {}, {} in Stripe)",
                a.id, a.subscription, a.stripe_subscription
            )),
            "{wrong}: {}",
            run.err
        );
    }
    let run = apexctl(
        &stores,
        None,
        Some(day8),
        &["dunning", "reactivate", "--customer", &a.id],
    );
    assert_eq!(run.code, 2, "clap wants --subscription: {}", run.err);
    let run = apexctl(
        &stores,
        None,
        Some(day8),
        &[
            "dunning",
            "reactivate",
            "--customer",
            "cus_nobody",
            "--subscription",
            "1",
        ],
    );
    assert_eq!(run.code, 1);
    assert!(
        run.err
            .contains("no customer has the id or the Stripe customer id"),
        "{}",
        run.err
    );
    assert_eq!(customer_status(&stores, &a.id).await, "suspended");
    assert_eq!(case_row(&stores, "in_reactivatea").await.0, "suspended");

    // A: by its Stripe ids, in JSON.
    let done = apexctl(
        &stores,
        None,
        Some(day8),
        &[
            "dunning",
            "reactivate",
            "--customer",
            &a.stripe_id,
            "--subscription",
            &a.stripe_subscription,
            "--reason",
            "paid by wire",
            "--by",
            "alice",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(done["customer_id"], a.id.as_str(), "{done}");
    assert_eq!(done["matched"], "stripe_customer_id");
    assert_eq!(done["by"], "alice");
    assert_eq!(done["reason"], "paid by wire");
    assert_eq!(done["result"]["customer_reactivated"], true, "{done}");
    assert_eq!(done["result"]["cases_closed"], json!(["in_reactivatea"]));
    assert_eq!(done["result"]["subscription_status"], "active");
    assert_eq!(customer_status(&stores, &a.id).await, "active");
    assert_eq!(subscription_status(&stores, a.subscription).await, "active");
    assert_eq!(
        case_row(&stores, "in_reactivatea").await,
        (
            "canceled".to_owned(),
            Some("reactivated".to_owned()),
            Some("alice".to_owned()),
            Some("paid by wire".to_owned())
        )
    );
    let resolved_at: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT resolved_at FROM dunning_attempts WHERE invoice_id = 'in_reactivatea' AND attempt_number = 0",
    )
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_near(resolved_at.unwrap(), day8);
    let audit: Vec<Value> = sqlx::query_scalar(
        "SELECT data FROM events WHERE event_type = 'audit.dunning_reactivated' AND data ->> 'customer_id' = $1",
    )
    .bind(&a.id)
    .fetch_all(&stores.pool)
    .await
    .unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["by"], "alice");
    assert_eq!(audit[0]["reason"], "paid by wire");
    // B is untouched.
    assert_eq!(customer_status(&stores, &b.id).await, "suspended");

    // `status` shows it.
    let run = apexctl(
        &stores,
        None,
        Some(day8),
        &["dunning", "status", "--customer", &a.id],
    )
    .ok();
    assert!(run.out.contains("status active;"), "{}", run.out);
    assert!(
        run.out
            .contains(&format!("subscription {} active", a.subscription)),
        "{}",
        run.out
    );
    let case_line = run
        .out
        .lines()
        .find(|l| l.contains("in_reactivatea") && l.contains("canceled"))
        .unwrap_or_else(|| panic!("{}", run.out));
    assert!(
        case_line.contains(&format!(
            "closed {} (reactivated by alice: paid by wire)",
            day8.format("%Y-%m-%d %H:%M")
        )),
        "{case_line}"
    );

    // B: by our ids, in text, by whoever runs it ($USER).
    let run = apexctl(
        &stores,
        None,
        Some(day8),
        &[
            "dunning",
            "reactivate",
            "--customer",
            &b.id,
            "--subscription",
            &b.subscription.to_string(),
        ],
    )
    .ok();
    assert_eq!(
        run.out.trim_end(),
        format!(
            "{} reactivated by ops-test: 1 suspending case(s) closed (in_reactivateb); subscription active",
            b.id
        )
    );
    assert_eq!(customer_status(&stores, &b.id).await, "active");
    assert_eq!(
        case_row(&stores, "in_reactivateb").await,
        (
            "canceled".to_owned(),
            Some("reactivated".to_owned()),
            Some("ops-test".to_owned()),
            None
        )
    );

    // Again: nothing to do, and it says so.
    let run = apexctl(
        &stores,
        None,
        Some(day8),
        &[
            "dunning",
            "reactivate",
            "--customer",
            &b.id,
            "--subscription",
            &b.stripe_subscription,
        ],
    )
    .ok();
    assert!(
        run.out.contains(&format!(
            "{} was not suspended (status active); nothing to reactivate",
            b.id
        )),
        "{}",
        run.out
    );
}

#[tokio::test]
async fn exempt_and_close_end_open_cases_by_hand() {
    let stores = TestStores::migrated().await;
    let day0 = day0();
    let day1 = at(day0, 1, 9);

    // Exempt closes the open case as `exempt`, with who and why.
    let a = mapped_customer(&stores, "Exempt Co").await;
    payment_failed(&stores, "in_exempta", &a.stripe_id, day0).await;
    assert_eq!(
        subscription_status(&stores, a.subscription).await,
        "past_due"
    );
    let done = apexctl(
        &stores,
        None,
        Some(day1),
        &[
            "dunning",
            "exempt",
            "--customer",
            &a.stripe_id,
            "--reason",
            "enterprise contract",
            "--by",
            "bob",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(done["customer_id"], a.id.as_str(), "{done}");
    assert_eq!(done["exempt"], true);
    assert_eq!(done["by"], "bob");
    assert_eq!(done["cases_closed"], json!(["in_exempta"]));
    assert_eq!(
        case_row(&stores, "in_exempta").await,
        (
            "canceled".to_owned(),
            Some("exempt".to_owned()),
            Some("bob".to_owned()),
            Some("enterprise contract".to_owned())
        )
    );
    assert_eq!(retry_statuses(&stores, "in_exempta").await, ["canceled"]);
    assert_eq!(subscription_status(&stores, a.subscription).await, "active");
    let (exempt, note): (bool, Option<String>) =
        sqlx::query_as("SELECT dunning_exempt, dunning_exempt_note FROM customers WHERE id = $1")
            .bind(&a.id)
            .fetch_one(&stores.pool)
            .await
            .unwrap();
    assert!(exempt);
    assert_eq!(note.as_deref(), Some("bob: enterprise contract"));
    let run = apexctl(
        &stores,
        None,
        Some(day1),
        &["dunning", "status", "--customer", &a.id],
    )
    .ok();
    assert!(
        run.out
            .contains("exempt from dunning (bob: enterprise contract)"),
        "{}",
        run.out
    );
    assert!(
        run.out.contains("(exempt by bob: enterprise contract)"),
        "{}",
        run.out
    );
    // Exempt again: nothing open, nothing closed.
    let run = apexctl(
        &stores,
        None,
        Some(day1),
        &["dunning", "exempt", "--customer", &a.id, "--by", "bob"],
    )
    .ok();
    assert!(
        run.out.contains(&format!(
            "{} is exempt from dunning (0 open case(s) closed)",
            a.id
        )),
        "{}",
        run.out
    );

    // --off ends the exemption.
    let run = apexctl(
        &stores,
        None,
        Some(day1),
        &[
            "dunning",
            "exempt",
            "--customer",
            &a.id,
            "--off",
            "--by",
            "bob",
        ],
    )
    .ok();
    assert_eq!(run.out.trim_end(), format!("{} is dunned again", a.id));
    let exempt: bool = sqlx::query_scalar("SELECT dunning_exempt FROM customers WHERE id = $1")
        .bind(&a.id)
        .fetch_one(&stores.pool)
        .await
        .unwrap();
    assert!(!exempt);
    let status = apexctl(
        &stores,
        None,
        Some(day1),
        &["dunning", "status", "--customer", &a.id, "--json"],
    )
    .ok()
    .json();
    assert_eq!(status["customer"]["dunning_exempt"], false, "{status}");
    let run = apexctl(
        &stores,
        None,
        Some(day1),
        &["dunning", "status", "--customer", &a.id],
    )
    .ok();
    assert!(
        !run.out
            .lines()
            .next()
            .unwrap()
            .contains("exempt from dunning"),
        "{}",
        run.out
    );
    // An unknown customer.
    let run = apexctl(
        &stores,
        None,
        Some(day1),
        &["dunning", "exempt", "--customer", "cus_nobody"],
    );
    assert_eq!(run.code, 1, "{}", run.out);
    assert!(
        run.err
            .contains("no customer has the id or the Stripe customer id \"cus_nobody\""),
        "{}",
        run.err
    );

    // Close: the open case closes as `closed`, with who and why; retries are canceled.
    let b = mapped_customer(&stores, "Close Co").await;
    payment_failed(&stores, "in_closeb", &b.stripe_id, day0).await;
    let done = apexctl(
        &stores,
        None,
        Some(day1),
        &[
            "dunning",
            "close",
            "--invoice",
            "in_closeb",
            "--reason",
            "written off",
            "--by",
            "carol",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(
        done,
        json!({"invoice_id": "in_closeb", "closed": true, "by": "carol", "customer_reactivated": false})
    );
    assert_eq!(
        case_row(&stores, "in_closeb").await,
        (
            "canceled".to_owned(),
            Some("closed".to_owned()),
            Some("carol".to_owned()),
            Some("written off".to_owned())
        )
    );
    assert_eq!(retry_statuses(&stores, "in_closeb").await, ["canceled"]);
    assert_eq!(subscription_status(&stores, b.subscription).await, "active");
    let status = apexctl(
        &stores,
        None,
        Some(day1),
        &["dunning", "status", "--customer", &b.id, "--json"],
    )
    .ok()
    .json();
    let case = row(&status, "in_closeb", 0);
    assert_eq!(case["resolution"], "closed", "{case}");
    assert_eq!(case["resolved_by"], "carol");
    assert_eq!(case["resolution_note"], "written off");
    assert_near(time(&case["resolved_at"]), day1);
    // A second close, and an invoice with no case, are refused.
    let run = apexctl(
        &stores,
        None,
        Some(day1),
        &[
            "dunning",
            "close",
            "--invoice",
            "in_closeb",
            "--by",
            "carol",
        ],
    );
    assert_eq!(run.code, 1, "{}", run.out);
    assert!(run.out.is_empty(), "{}", run.out);
    assert!(
        run.err
            .contains("the dunning case of invoice in_closeb is closed already (closed)"),
        "{}",
        run.err
    );
    assert_eq!(
        case_row(&stores, "in_closeb").await.2.as_deref(),
        Some("carol")
    );
    let run = apexctl(
        &stores,
        None,
        Some(day1),
        &["dunning", "close", "--invoice", "in_nocase"],
    );
    assert_eq!(run.code, 1, "{}", run.out);
    assert!(
        run.err
            .contains("dunning case of invoice in_nocase not found"),
        "{}",
        run.err
    );

    // Closing the case that alone suspended a customer reactivates it; by default by $USER.
    let c = suspended_customer(&stores, "Suspended Close Co", "in_closec", day0).await;
    let run = apexctl(
        &stores,
        None,
        Some(at(day0, 8, 9)),
        &["dunning", "close", "--invoice", "in_closec"],
    )
    .ok();
    assert_eq!(
        run.out.trim_end(),
        "the dunning case of in_closec is closed; the customer is reactivated"
    );
    assert_eq!(customer_status(&stores, &c.id).await, "active");
    assert_eq!(subscription_status(&stores, c.subscription).await, "active");
    assert_eq!(
        case_row(&stores, "in_closec").await,
        (
            "canceled".to_owned(),
            Some("closed".to_owned()),
            Some("ops-test".to_owned()),
            None
        )
    );

    // Exempting a suspended customer lifts the suspension too.
    let d = suspended_customer(&stores, "Suspended Exempt Co", "in_exemptd", day0).await;
    let run = apexctl(
        &stores,
        None,
        Some(at(day0, 8, 9)),
        &[
            "dunning",
            "exempt",
            "--customer",
            &d.id,
            "--reason",
            "goodwill",
            "--by",
            "dan",
        ],
    )
    .ok();
    assert!(
        run.out.contains(&format!(
            "{} is exempt from dunning (1 open case(s) closed)",
            d.id
        )),
        "{}",
        run.out
    );
    assert_eq!(customer_status(&stores, &d.id).await, "active");
    assert_eq!(
        case_row(&stores, "in_exemptd").await.1.as_deref(),
        Some("exempt")
    );
}

#[test]
fn dunning_help_lists_the_six_subcommands() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_apexctl"))
        .args(["dunning", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        commands,
        [
            "status",
            "pending",
            "process",
            "reactivate",
            "exempt",
            "close",
            "help"
        ],
        "{help}"
    );
}

/// The guide's SQL snippet `file` (a fixture of apex-billing's guide test), without its
/// trailing `;`, to run as a subquery.
fn guide_sql(file: &str) -> String {
    let path = apex_core::testing::package_dir()
        .join("../core/tests/fixtures/ops-guide-sql")
        .join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .trim_end_matches(';')
        .to_owned()
}

#[tokio::test]
async fn pending_lists_what_the_guides_pending_retries_query_finds() {
    let stores = TestStores::migrated().await;
    let (id, _) = signup(&stores, "Pending Games").await;
    let now = Utc::now();
    // Due: a pending retry and a retrying one whose run died. Not due: one for tomorrow, a
    // failed one, and the cases themselves.
    sqlx::query(
        "INSERT INTO dunning_attempts (customer_id, invoice_id, attempt_number, status, \
             next_retry_at) VALUES \
           ($1, 'in_a', 0, 'failed', NULL), ($1, 'in_a', 1, 'pending', $2), \
           ($1, 'in_b', 0, 'failed', NULL), ($1, 'in_b', 1, 'retrying', $3), \
           ($1, 'in_c', 0, 'failed', NULL), ($1, 'in_c', 1, 'failed', $3), \
           ($1, 'in_c', 2, 'pending', $4)",
    )
    .bind(&id)
    .bind(now - Duration::hours(2))
    .bind(now - Duration::days(1))
    .bind(now + Duration::days(1))
    .execute(&stores.pool)
    .await
    .unwrap();
    let listed = |run: Run| -> Vec<(String, i64)> {
        run.ok().json()["retries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["invoice_id"].as_str().unwrap().to_owned(),
                    r["attempt_number"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    let pending = listed(apexctl(
        &stores,
        None,
        None,
        &["dunning", "pending", "--json"],
    ));
    assert_eq!(pending, [("in_b".to_owned(), 1), ("in_a".to_owned(), 1)]);
    // The guide's own query, verbatim, finds the same rows in the same order.
    let guide: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT invoice_id, attempt_number::bigint FROM ({}) AS q",
        guide_sql("08_pending_dunning_retries.sql")
    )))
    .fetch_all(&stores.pool)
    .await
    .unwrap();
    assert_eq!(pending, guide);

    // Two days on (the simulated clock), tomorrow's is due too.
    let later = listed(apexctl(
        &stores,
        None,
        Some(now + Duration::days(2)),
        &["dunning", "pending", "--json"],
    ));
    assert_eq!(later.len(), 3, "{later:?}");
    assert_eq!(later[2], ("in_c".to_owned(), 2));
    // `--limit` cuts the rows, not the total.
    let limited = apexctl(
        &stores,
        None,
        None,
        &["dunning", "pending", "--limit", "1", "--json"],
    )
    .ok()
    .json();
    assert_eq!(limited["total"], 2, "{limited}");
    assert_eq!(limited["retries"].as_array().unwrap().len(), 1, "{limited}");

    let text = apexctl(&stores, None, None, &["dunning", "pending"])
        .ok()
        .out;
    assert!(text.contains(&id) && text.contains("in_a"), "{text}");
    assert!(text.contains("next_retry_at (UTC)"), "{text}");
    let text = apexctl(&stores, None, None, &["dunning", "pending", "--limit", "1"])
        .ok()
        .out;
    assert!(text.contains("... 1 more (--limit)"), "{text}");
    let bad = apexctl(&stores, None, None, &["dunning", "pending", "--limit", "0"]);
    assert_eq!(bad.code, 1);
    assert!(
        bad.err.starts_with("apexctl: --limit must be"),
        "{}",
        bad.err
    );
}
