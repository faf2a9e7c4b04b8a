//! The SDK telemetry `apexctl notify sdk-update` reads: which `sdk_version` each customer's
//! records carried on a platform, from ClickHouse `usage_events.metadata` (the metadata
//! object the SDK sent with each record, stored by the edge as the JSON text it received,
//! blanks included, or empty when none was sent).
//!
//! One query, grouped in ClickHouse by customer and version text, so what comes back is a few
//! rows per customer whatever the number of records; the versions are parsed and compared in
//! Rust ([`apex_billing::sdk_notices`]), where an unreadable one is merely unknown.
//!
//! The keys are read with `extract(metadata, '"platform"[[:space:]]*:[[:space:]]*"([^"]*)"')`
//! (a re2 regular expression), which runs on ClickHouse 18.16 (the version tested here, which
//! has no `JSONExtract*`) and on current releases alike. Not `visitParamExtractString`: it only
//! finds `"platform":"iOS"` written without a blank after the colon, and the edge stores the
//! metadata as sent, so the guide's own example `{"platform": "iOS", ...}` would read as
//! empty (checked on 18.16). On a current ClickHouse `JSONExtractString(metadata, 'platform')`
//! would be the exact reading; the regular expression differs from it only for keys nested in
//! inner objects (it takes the first `"platform": "…"` at any depth, as `visitParam*` does)
//! and for values with escaped characters (`\"`, `\u…`), which are then cut short or left
//! escaped and so read as unknown versions or another platform: neither is something an SDK
//! sends. A value that is not a string (`"sdk_version": 2`) reads as empty: unknown.
//! Version texts that are not 1 to 64 printable ASCII characters come back empty (unknown),
//! which also keeps bytes that are not UTF-8 out of the answer.

use apex_billing::sdk_notices::{Platform, Sighting};
use apex_core::stores::StoreConfig;
use chrono::{DateTime, Duration, Utc};

/// How far ahead of the clock a record's time may be (the edge accepts 5 minutes of skew).
const FUTURE_SKEW: Duration = Duration::minutes(5);

/// Per customer and `sdk_version` text seen on the platform between two times: the newest
/// record's time and the number of records. Binds: since and until (unix seconds), the
/// platform in lower case.
const SIGHTINGS_SQL: &str = "\
SELECT customer_id, sdk_version, toUInt32(max(ts)) AS last_seen, count() AS records \
FROM ( \
    SELECT customer_id, ts, \
        extract(metadata, '\"platform\"[[:space:]]*:[[:space:]]*\"([^\"]*)\"') AS sdk_platform, \
        extract(metadata, '\"sdk_version\"[[:space:]]*:[[:space:]]*\"([^\"]*)\"') AS raw_version, \
        if(match(raw_version, '^[ -~]{1,64}$'), raw_version, '') AS sdk_version \
    FROM usage_events \
    WHERE ts >= toDateTime(?) AND ts <= toDateTime(?) \
      AND positionCaseInsensitive(metadata, 'platform') > 0 \
) \
WHERE lower(sdk_platform) = ? \
GROUP BY customer_id, sdk_version \
ORDER BY customer_id, sdk_version";

/// The window of "recent" telemetry: the `days` days before `now`, up to the edge's clock
/// skew after it.
pub(crate) fn window(now: DateTime<Utc>, days: u32) -> (DateTime<Utc>, DateTime<Utc>) {
    (now - Duration::days(i64::from(days)), now + FUTURE_SKEW)
}

/// What `usage_events` shows of `platform` between `since` and `until`: one [`Sighting`] per
/// customer and version text (empty: none or unreadable).
pub(crate) async fn sightings(
    stores: &StoreConfig,
    platform: Platform,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> anyhow::Result<Vec<Sighting>> {
    let rows: Vec<(String, String, u32, u64)> = stores
        .clickhouse()
        .query(SIGHTINGS_SQL)
        .bind(since.timestamp())
        .bind(until.timestamp())
        .bind(platform.as_str())
        .fetch_all()
        .await?;
    Ok(rows
        .into_iter()
        .map(|(customer_id, version, last_seen, records)| Sighting {
            customer_id,
            version,
            last_seen: DateTime::from_timestamp(i64::from(last_seen), 0).unwrap_or_default(),
            records,
        })
        .collect())
}
