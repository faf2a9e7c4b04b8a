//! SDK update notices: `sdk_update` emails for customers whose recent telemetry shows an SDK
//! older than a release, once per customer and version.
//!
//! The telemetry itself (ClickHouse `usage_events.metadata`, read by `apexctl notify
//! sdk-update`) arrives here as [`Sighting`]s: one per customer and `sdk_version` text seen on
//! the release's platform. Everything else is here: the pure rules, then the Postgres side.
//!
//! # Rules
//!
//! - **Platforms** are `ios` and `android`, matched without regard to case (the SDKs send
//!   `iOS` and `Android`; `IOS`, `ios` are the same); blanks around the flag's value are
//!   ignored ([`Platform::parse`]), but telemetry's own value must be the name alone (a
//!   `" iOS"` in metadata is not read as iOS).
//! - **Versions** compare as versions, with semver's precedence ([`SdkVersion`]): numerically
//!   per component (`1.10.0` is newer than `1.9.2`), a missing patch is 0 (`1.2` is `1.2.0`),
//!   a pre-release sorts before its release (`1.10.0-beta.1` < `1.10.0-rc.1` < `1.10.0`),
//!   build metadata (`+…`) is ignored. The parser is ours, not the `semver` crate's: semver
//!   refuses `1.2` and `v1.2`, which SDKs and release tags do send, and we want one lenient,
//!   total rule (a small comparator, fully unit-tested here) rather than a strict parser
//!   plus fix-ups. Accepted: optional blanks around, one optional leading `v`/`V`, then
//!   `MAJOR.MINOR` or `MAJOR.MINOR.PATCH` (ASCII digits), then optionally `-PRE` and
//!   `+BUILD` (dot-separated identifiers of letters, digits and `-`), at most 64 characters.
//!   Anything else (`garbage`, empty, missing, `1`, `1.2.3.4`, `1.x`, a number instead of a
//!   string) is **unknown**: never an error, never notified.
//! - **Several versions** (several devices or apps): a customer is judged by its **oldest
//!   known** version on the platform; unknown versions beside known ones are ignored, and a
//!   customer with only unknown versions is not notified (it is counted apart).
//! - **Who**: a customer is due when its oldest known version is older than the release's
//!   version and, with `--min-version-below V2`, also older than `V2`: due iff
//!   `oldest < min(version, V2)`. `V2` newer than the version is refused (it would not
//!   narrow anything).
//! - **Once per customer and version**: the event's dedup key is
//!   `sdk_update:<customer>:<platform>:<version>` with the version in its canonical form
//!   (`v1.10` and `1.10.0` are the same release), so a second run enqueues nothing new.
//! - Only **active** customers with an email get it; customers who opted out of `sdk_update`
//!   (`email_opt_outs`) are skipped here (the queue would drop them too); suppressed
//!   addresses are left to the queue, which logs them for an operator.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::{PgConnection, PgExecutor};

use crate::error::BillingError;
use crate::events;

/// The event type of the email.
pub const EMAIL_EVENT_TYPE: &str = "email.sdk_update";
/// The opt-out category of the email (`email_opt_outs.category`).
pub const OPT_OUT_CATEGORY: &str = "sdk_update";
/// Longest version text considered (longer is unknown).
pub const MAX_VERSION_LEN: usize = 64;

/// An SDK platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// The iOS SDK.
    Ios,
    /// The Android SDK.
    Android,
}

impl Platform {
    /// Both platforms.
    pub const ALL: [Platform; 2] = [Platform::Ios, Platform::Android];

    /// `ios` or `android` in any case, blanks around ignored; anything else is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(text))
    }

    /// Whether telemetry's `platform` text names this platform (any case).
    pub fn matches(self, sent: &str) -> bool {
        Self::parse(sent) == Some(self)
    }

    /// `ios` or `android`: the email's `sdk`, the dedup key's part and what telemetry is
    /// matched against, lowercased.
    pub const fn as_str(self) -> &'static str {
        match self {
            Platform::Ios => "ios",
            Platform::Android => "android",
        }
    }

    /// `iOS` or `Android`, for people.
    pub const fn label(self) -> &'static str {
        match self {
            Platform::Ios => "iOS",
            Platform::Android => "Android",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).ok_or_else(|| format!("unknown platform {s:?}: expected ios or android"))
    }
}

/// One pre-release identifier: numeric ones sort numerically and before alphanumeric ones,
/// which sort in ASCII order (semver's rule; the derived order follows the variants).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum PreId {
    Numeric(u64),
    Alpha(String),
}

/// An SDK version, compared with semver's precedence (see the module's rules); build
/// metadata is not kept, so `1.2.0+7` equals `1.2.0`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SdkVersion {
    major: u64,
    minor: u64,
    patch: u64,
    pre: Vec<PreId>,
}

fn is_ident_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

fn number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl SdkVersion {
    /// Parses a version leniently (the module's rules); `None` is an unknown version.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.is_empty() || text.len() > MAX_VERSION_LEN {
            return None;
        }
        let text = text
            .strip_prefix('v')
            .or_else(|| text.strip_prefix('V'))
            .unwrap_or(text);
        let (text, build) = match text.split_once('+') {
            Some((rest, build)) => (rest, Some(build)),
            None => (text, None),
        };
        if let Some(build) = build
            && !build
                .split('.')
                .all(|id| !id.is_empty() && id.bytes().all(is_ident_char))
        {
            return None;
        }
        let (core, pre) = match text.split_once('-') {
            Some((core, pre)) => (core, Some(pre)),
            None => (text, None),
        };
        let parts: Vec<&str> = core.split('.').collect();
        let (major, minor, patch) = match parts[..] {
            [major, minor] => (number(major)?, number(minor)?, 0),
            [major, minor, patch] => (number(major)?, number(minor)?, number(patch)?),
            _ => return None,
        };
        let pre = match pre {
            None => Vec::new(),
            Some(pre) => pre
                .split('.')
                .map(|id| {
                    if id.is_empty() || !id.bytes().all(is_ident_char) {
                        None
                    } else if id.bytes().all(|b| b.is_ascii_digit()) {
                        number(id).map(PreId::Numeric)
                    } else {
                        Some(PreId::Alpha(id.to_owned()))
                    }
                })
                .collect::<Option<Vec<_>>>()?,
        };
        Some(Self {
            major,
            minor,
            patch,
            pre,
        })
    }

    /// Whether it is a pre-release (`1.10.0-beta.1`).
    pub fn is_prerelease(&self) -> bool {
        !self.pre.is_empty()
    }
}

impl Ord for SdkVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                // A release is newer than any of its pre-releases.
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                // Identifier by identifier; a longer list wins when one is a prefix.
                (false, false) => self.pre.cmp(&other.pre),
            })
    }
}

impl PartialOrd for SdkVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The canonical form: `MAJOR.MINOR.PATCH[-PRE]` (no `v`, no build metadata).
impl fmt::Display for SdkVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        for (i, id) in self.pre.iter().enumerate() {
            f.write_str(if i == 0 { "-" } else { "." })?;
            match id {
                PreId::Numeric(n) => write!(f, "{n}")?,
                PreId::Alpha(s) => f.write_str(s)?,
            }
        }
        Ok(())
    }
}

impl FromStr for SdkVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).ok_or_else(|| {
            format!(
                "{s:?} is not a version: expected MAJOR.MINOR[.PATCH] with an optional \
                 -PRERELEASE (e.g. 1.10.0 or 2.0.0-beta.1)"
            )
        })
    }
}

impl Serialize for SdkVersion {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// What telemetry showed of one customer on the release's platform: one `sdk_version` text
/// (as sent; empty when absent), the last time it was seen and how many records carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    /// The customer.
    pub customer_id: String,
    /// The `sdk_version` text as sent (empty when absent or not a string).
    pub version: String,
    /// The newest record with it.
    pub last_seen: DateTime<Utc>,
    /// Records with it.
    pub records: u64,
}

/// A customer's SDK on one platform, from its sightings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CustomerSdk {
    /// The customer.
    pub customer_id: String,
    /// Its oldest known version.
    pub oldest: SdkVersion,
    /// The newest record with the oldest version (still in use then).
    pub oldest_last_seen: DateTime<Utc>,
    /// The newest record on the platform, any version.
    pub last_seen: DateTime<Utc>,
    /// Every known version, oldest first.
    pub versions: Vec<SdkVersion>,
    /// Records on the platform whose version was unknown.
    pub unknown_records: u64,
}

/// The customers seen on a platform: those with a known version, by id, and those with
/// unknown versions only (never notified).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fleet {
    /// Customers with at least one known version, by id.
    pub known: Vec<CustomerSdk>,
    /// Customers whose every version was unknown, by id.
    pub unknown_only: Vec<String>,
}

/// Groups sightings per customer: its oldest known version (unknown texts ignored).
pub fn fleet(sightings: &[Sighting]) -> Fleet {
    #[derive(Default)]
    struct Acc {
        known: BTreeMap<SdkVersion, DateTime<Utc>>,
        last_seen: Option<DateTime<Utc>>,
        unknown_records: u64,
    }
    let mut per_customer: BTreeMap<&str, Acc> = BTreeMap::new();
    for s in sightings {
        let acc = per_customer.entry(&s.customer_id).or_default();
        acc.last_seen = acc.last_seen.max(Some(s.last_seen));
        match SdkVersion::parse(&s.version) {
            // `1.2` and `1.2.0` are one version: the latest sighting of either.
            Some(v) => {
                let seen = acc.known.entry(v).or_insert(s.last_seen);
                *seen = (*seen).max(s.last_seen);
            }
            None => acc.unknown_records += s.records,
        }
    }
    let mut fleet = Fleet::default();
    for (customer, acc) in per_customer {
        match acc.known.first_key_value() {
            Some((oldest, seen)) => fleet.known.push(CustomerSdk {
                customer_id: customer.to_owned(),
                oldest: oldest.clone(),
                oldest_last_seen: *seen,
                last_seen: acc.last_seen.unwrap_or(*seen),
                versions: acc.known.keys().cloned().collect(),
                unknown_records: acc.unknown_records,
            }),
            None => fleet.unknown_only.push(customer.to_owned()),
        }
    }
    fleet
}

/// A release to tell customers about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Release {
    /// The platform.
    pub platform: Platform,
    /// The new version.
    pub version: SdkVersion,
    /// Customers whose oldest version is below this are due: the version, or the lower
    /// `--min-version-below`.
    pub below: SdkVersion,
    /// The release notes (the email's button).
    pub release_notes_url: String,
    /// Optional text for the email.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

/// The default release notes link: `https://docs.apexmediation.com/sdk/<platform>/releases/<version>`
/// (the shape of the `sdk_update` template's sample).
pub fn default_release_notes_url(platform: Platform, version: &SdkVersion) -> String {
    format!("https://docs.apexmediation.com/sdk/{platform}/releases/{version}")
}

/// Whether `url` is an `http(s)://` link without blanks or control characters (what the
/// `sdk_update` template accepts).
pub fn is_link(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"));
    rest.is_some_and(|r| !r.is_empty()) && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

impl Release {
    /// A release of `version` on `platform`; `min_version_below` narrows to customers below
    /// it and must not be newer than `version`; the release notes default to
    /// [`default_release_notes_url`]; blank notes are none.
    pub fn new(
        platform: Platform,
        version: SdkVersion,
        min_version_below: Option<SdkVersion>,
        release_notes_url: Option<String>,
        notes: Option<String>,
    ) -> Result<Self, BillingError> {
        let below = match min_version_below {
            Some(below) if below > version => {
                return Err(BillingError::Invalid(format!(
                    "--min-version-below {below} is newer than --version {version}: it narrows \
                     the customers below --version, so it must not be newer"
                )));
            }
            Some(below) => below,
            None => version.clone(),
        };
        let release_notes_url = match release_notes_url {
            Some(url) => {
                let url = url.trim().to_owned();
                if !is_link(&url) {
                    return Err(BillingError::Invalid(format!(
                        "--release-notes-url {url:?} is not an http:// or https:// link"
                    )));
                }
                url
            }
            None => default_release_notes_url(platform, &version),
        };
        Ok(Self {
            platform,
            below,
            release_notes_url,
            notes: notes.filter(|n| !n.trim().is_empty()),
            version,
        })
    }

    /// Whether `customer` should hear of this release: its oldest known version is older than
    /// [`Release::below`].
    pub fn is_due(&self, customer: &CustomerSdk) -> bool {
        customer.oldest < self.below
    }

    /// The event's dedup key: `sdk_update:<customer>:<platform>:<version>`.
    pub fn dedup_key(&self, customer_id: &str) -> String {
        format!(
            "sdk_update:{customer_id}:{}:{}",
            self.platform.as_str(),
            self.version
        )
    }

    /// The `email.sdk_update` event's data for `recipient`, on `current` (its oldest version,
    /// kept for the record; the template does not use it).
    pub fn email_data(&self, recipient: &Recipient, current: &SdkVersion) -> serde_json::Value {
        let mut data = json!({
            "to": recipient.email,
            "customer_id": recipient.customer_id,
            "name": recipient.name,
            "sdk": self.platform.as_str(),
            "version": self.version.to_string(),
            "release_notes_url": self.release_notes_url,
            "current_version": current.to_string(),
        });
        if let Some(notes) = &self.notes {
            data["notes"] = json!(notes);
        }
        data
    }
}

/// A due customer as Postgres knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Recipient {
    /// The customer.
    pub customer_id: String,
    /// Its name.
    pub name: String,
    /// Its billing contact.
    pub email: String,
    /// `active`, `suspended` or `canceled`.
    pub status: String,
    /// Opted out of `sdk_update`.
    pub opted_out: bool,
    /// An `sdk_update` event of this release exists for it (its dedup key).
    pub already_notified: bool,
}

/// The Postgres side of `customers` (one query for all): each one's contact, status, opt-out
/// of `sdk_update` and whether this release's event exists. Customers unknown to Postgres are
/// absent from the answer.
pub async fn recipients(
    db: impl PgExecutor<'_>,
    release: &Release,
    customers: &[String],
) -> Result<Vec<Recipient>, BillingError> {
    let keys: Vec<String> = customers.iter().map(|c| release.dedup_key(c)).collect();
    Ok(sqlx::query_as(
        "SELECT c.id AS customer_id, c.name, c.email, c.status, \
             EXISTS (SELECT 1 FROM email_opt_outs o \
                     WHERE o.customer_id = c.id AND o.category = $3) AS opted_out, \
             EXISTS (SELECT 1 FROM events e WHERE e.dedup_key = t.dedup_key) AS already_notified \
         FROM unnest($1::text[], $2::text[]) AS t (customer_id, dedup_key) \
         JOIN customers c ON c.id = t.customer_id \
         ORDER BY c.id",
    )
    .bind(customers)
    .bind(&keys)
    .bind(OPT_OUT_CATEGORY)
    .fetch_all(db)
    .await?)
}

/// What became of a due customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeStatus {
    /// Its email was enqueued now.
    Enqueued,
    /// A dry run: it would be enqueued.
    WouldEnqueue,
    /// This release's email was enqueued for it before: nothing new.
    AlreadyNotified,
    /// It opted out of `sdk_update`.
    OptedOut,
    /// Not active (suspended or canceled).
    Inactive,
    /// No email address.
    NoEmail,
    /// Telemetry names a customer Postgres does not have.
    UnknownCustomer,
}

impl NoticeStatus {
    /// Its name, as in JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            NoticeStatus::Enqueued => "enqueued",
            NoticeStatus::WouldEnqueue => "would_enqueue",
            NoticeStatus::AlreadyNotified => "already_notified",
            NoticeStatus::OptedOut => "opted_out",
            NoticeStatus::Inactive => "inactive",
            NoticeStatus::NoEmail => "no_email",
            NoticeStatus::UnknownCustomer => "unknown_customer",
        }
    }
}

/// Whether a due customer gets the email (`Enqueued`/`WouldEnqueue` by `dry_run`) or why not.
pub fn decide(recipient: Option<&Recipient>, dry_run: bool) -> NoticeStatus {
    match recipient {
        None => NoticeStatus::UnknownCustomer,
        Some(r) if r.status != "active" => NoticeStatus::Inactive,
        Some(r) if r.email.trim().is_empty() => NoticeStatus::NoEmail,
        Some(r) if r.already_notified => NoticeStatus::AlreadyNotified,
        Some(r) if r.opted_out => NoticeStatus::OptedOut,
        Some(_) if dry_run => NoticeStatus::WouldEnqueue,
        Some(_) => NoticeStatus::Enqueued,
    }
}

/// A due customer and what became of it.
#[derive(Debug, Clone, Serialize)]
pub struct Notice {
    /// Its SDK on the platform.
    #[serde(flatten)]
    pub customer: CustomerSdk,
    /// Its name, when Postgres knows it.
    pub name: Option<String>,
    /// Its billing contact, when Postgres knows it.
    pub email: Option<String>,
    /// What became of it.
    pub status: NoticeStatus,
    /// The `events` row enqueued now.
    pub event_id: Option<i64>,
}

/// Decides and (unless `dry_run`) enqueues `release`'s email for each of `due` at `now`, in
/// one transaction: every due customer's row is read, then each that gets it is enqueued once
/// ([`events::enqueue_once`] with [`Release::dedup_key`]). Runs are serialized by a
/// transaction-level advisory lock, so two at once cannot both count the same customer as new
/// (the dedup key alone already keeps them from enqueuing it twice). A dry run writes nothing.
pub async fn notify(
    conn: &mut PgConnection,
    release: &Release,
    due: Vec<CustomerSdk>,
    dry_run: bool,
    now: DateTime<Utc>,
) -> Result<Vec<Notice>, BillingError> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    if !dry_run {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('apex.sdk_update'))")
            .execute(&mut *tx)
            .await?;
    }
    let ids: Vec<String> = due.iter().map(|c| c.customer_id.clone()).collect();
    let found: BTreeMap<String, Recipient> = recipients(&mut *tx, release, &ids)
        .await?
        .into_iter()
        .map(|r| (r.customer_id.clone(), r))
        .collect();
    let mut notices = Vec::with_capacity(due.len());
    for customer in due {
        let recipient = found.get(&customer.customer_id);
        let status = decide(recipient, dry_run);
        let mut event_id = None;
        if let (NoticeStatus::Enqueued, Some(r)) = (status, recipient) {
            event_id = Some(
                events::enqueue_once(
                    &mut *tx,
                    EMAIL_EVENT_TYPE,
                    &release.email_data(r, &customer.oldest),
                    &release.dedup_key(&r.customer_id),
                    now,
                )
                .await?,
            );
        }
        notices.push(Notice {
            name: recipient.map(|r| r.name.clone()),
            email: recipient.map(|r| r.email.clone()),
            customer,
            status,
            event_id,
        });
    }
    if dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(notices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> SdkVersion {
        SdkVersion::parse(text).unwrap_or_else(|| panic!("{text:?} should parse"))
    }

    #[test]
    fn versions_compare_numerically_not_as_text() {
        assert!(v("1.10.0") > v("1.9.2"));
        assert!(v("1.9.10") > v("1.9.9"));
        assert!(v("2.0.0") > v("1.99.99"));
        assert!(v("10.0") > v("9.0"));
        assert!(v("0.0.1") < v("0.1.0"));
    }

    #[test]
    fn a_missing_patch_is_zero_and_build_metadata_is_ignored() {
        assert_eq!(v("1.2"), v("1.2.0"));
        assert_eq!(v("1.2").cmp(&v("1.2.0")), Ordering::Equal);
        assert_eq!(v("1.2.0+build.7"), v("1.2.0"));
        assert_eq!(v("v1.2"), v("1.2.0"));
        assert_eq!(v("V1.2.0"), v("1.2.0"));
        assert_eq!(v("  1.2.3 "), v("1.2.3"));
        assert_eq!(v("01.02.03"), v("1.2.3"));
        assert_eq!(v("1.2-beta"), v("1.2.0-beta"));
    }

    #[test]
    fn pre_releases_sort_before_their_release_by_semver_rules() {
        // semver.org's own example chain.
        let chain = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
        ];
        for pair in chain.windows(2) {
            assert!(v(pair[0]) < v(pair[1]), "{} < {}", pair[0], pair[1]);
        }
        assert!(v("1.10.0-beta.1") < v("1.10.0"));
        assert!(v("1.10.0-beta.1") > v("1.9.2"));
        assert!(v("2.0.0-beta.1") > v("1.1.2"));
        assert!(v("1.0.0-1") < v("1.0.0-a"));
        assert!(v("1.0.0-Z") < v("1.0.0-a"), "ASCII order");
        assert!(v("1.10.0-beta.1").is_prerelease());
        assert!(!v("1.10.0").is_prerelease());
    }

    #[test]
    fn what_is_not_a_version_is_unknown() {
        for text in [
            "",
            "   ",
            "garbage",
            "1",
            "v",
            "1.",
            ".1",
            "1..2",
            "1.2.3.4",
            "1.x",
            "1.2.x",
            "1.2.3-",
            "1.2.3+",
            "1.2.3-beta..1",
            "1.2.3-beta!",
            "1.2.3+build+again",
            "-1.2.3",
            "1.-2.3",
            "vv1.2",
            "1,2,3",
            "1.2.3 beta",
            "１.２.３",
            "99999999999999999999.0.0",
            "null",
            "\"1.2.3\"",
            &"9".repeat(70),
        ] {
            assert_eq!(SdkVersion::parse(text), None, "{text:?}");
            assert!(text.parse::<SdkVersion>().is_err());
        }
    }

    #[test]
    fn the_canonical_form_drops_the_v_and_the_build() {
        assert_eq!(v("v1.10").to_string(), "1.10.0");
        assert_eq!(v("1.10.0-beta.01+sha.5").to_string(), "1.10.0-beta.1");
        assert_eq!(
            serde_json::to_value(v("2.0-rc.1")).unwrap(),
            json!("2.0.0-rc.1")
        );
        let err = "1.x".parse::<SdkVersion>().unwrap_err();
        assert!(err.contains("not a version"), "{err}");
    }

    #[test]
    fn platforms_match_without_regard_to_case() {
        for text in ["ios", "iOS", "IOS", " iOs "] {
            assert_eq!(Platform::parse(text), Some(Platform::Ios), "{text}");
            assert!(Platform::Ios.matches(text));
            assert!(!Platform::Android.matches(text));
        }
        for text in ["android", "Android", "ANDROID"] {
            assert_eq!(Platform::parse(text), Some(Platform::Android), "{text}");
        }
        for text in ["", "windows", "ios1", "apple", "i os"] {
            assert_eq!(Platform::parse(text), None, "{text}");
        }
        let err = "windows".parse::<Platform>().unwrap_err();
        assert!(err.contains("ios or android"), "{err}");
        assert_eq!(Platform::Ios.label(), "iOS");
        assert_eq!(Platform::Android.to_string(), "android");
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_760_000_000 + secs, 0).unwrap()
    }

    fn seen(customer: &str, version: &str, secs: i64) -> Sighting {
        Sighting {
            customer_id: customer.into(),
            version: version.into(),
            last_seen: at(secs),
            records: 2,
        }
    }

    #[test]
    fn a_customer_is_judged_by_its_oldest_known_version() {
        let fleet = fleet(&[
            seen("cus_a", "1.10.0", 50),
            seen("cus_a", "1.9.2", 10),
            seen("cus_a", "garbage", 70),
            seen("cus_b", "", 5),
            seen("cus_b", "not.a.version", 6),
            seen("cus_c", "1.2", 1),
            seen("cus_c", "1.2.0", 3),
            seen("cus_c", "v1.2.0+9", 2),
        ]);
        assert_eq!(fleet.unknown_only, ["cus_b"]);
        assert_eq!(fleet.known.len(), 2);
        let a = &fleet.known[0];
        assert_eq!(a.customer_id, "cus_a");
        assert_eq!(a.oldest, v("1.9.2"));
        assert_eq!(a.oldest_last_seen, at(10));
        assert_eq!(a.last_seen, at(70));
        assert_eq!(a.versions, [v("1.9.2"), v("1.10.0")]);
        assert_eq!(a.unknown_records, 2);
        let c = &fleet.known[1];
        assert_eq!(c.versions, [v("1.2.0")]);
        assert_eq!(c.oldest_last_seen, at(3));
    }

    fn release(version: &str, below: Option<&str>) -> Release {
        Release::new(Platform::Ios, v(version), below.map(v), None, None).unwrap()
    }

    #[test]
    fn due_means_older_than_the_release_and_the_narrowing_bound() {
        let fleet = fleet(&[
            seen("cus_a", "1.9.2", 1),
            seen("cus_b", "1.10.0", 1),
            seen("cus_c", "1.10.0-beta.1", 1),
            seen("cus_d", "1.4.9", 1),
            seen("cus_e", "1.11.0", 1),
            seen("cus_f", "1.11.0", 1),
            seen("cus_f", "1.0.0", 1),
        ]);
        let due = |r: &Release| -> Vec<String> {
            fleet
                .known
                .iter()
                .filter(|c| r.is_due(c))
                .map(|c| c.customer_id.clone())
                .collect()
        };
        assert_eq!(
            due(&release("1.10.0", None)),
            ["cus_a", "cus_c", "cus_d", "cus_f"]
        );
        assert_eq!(due(&release("1.10.0", Some("1.5.0"))), ["cus_d", "cus_f"]);
        assert_eq!(
            due(&release("1.10.0", Some("1.10.0"))),
            due(&release("1.10.0", None))
        );
        // A customer on the release itself (or newer) is never due, even as `1.10`.
        assert_eq!(due(&release("1.10", None)), due(&release("1.10.0", None)));
    }

    #[test]
    fn a_narrowing_bound_newer_than_the_release_and_bad_links_are_refused() {
        let err = Release::new(Platform::Ios, v("1.0.0"), Some(v("2.0.0")), None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--min-version-below 2.0.0"), "{err}");
        for url in ["ftp://x", "docs.example.com", "https://", "https://a b", ""] {
            let err = Release::new(Platform::Ios, v("1.0"), None, Some(url.into()), None)
                .unwrap_err()
                .to_string();
            assert!(err.contains("--release-notes-url"), "{err}");
        }
        let ok = Release::new(
            Platform::Android,
            v("v2.1"),
            None,
            Some(" https://example.com/notes ".into()),
            Some("  ".into()),
        )
        .unwrap();
        assert_eq!(ok.release_notes_url, "https://example.com/notes");
        assert_eq!(ok.notes, None);
    }

    #[test]
    fn the_email_and_its_dedup_key_name_the_canonical_version() {
        let r = Release::new(
            Platform::Ios,
            v("v1.10"),
            None,
            None,
            Some("Faster start-up.".into()),
        )
        .unwrap();
        assert_eq!(r.dedup_key("cus_a"), "sdk_update:cus_a:ios:1.10.0");
        assert_eq!(
            r.release_notes_url,
            "https://docs.apexmediation.com/sdk/ios/releases/1.10.0"
        );
        let recipient = Recipient {
            customer_id: "cus_a".into(),
            name: "Acme".into(),
            email: "dev@acme.example".into(),
            status: "active".into(),
            opted_out: false,
            already_notified: false,
        };
        assert_eq!(
            r.email_data(&recipient, &v("1.9.2")),
            json!({
                "to": "dev@acme.example",
                "customer_id": "cus_a",
                "name": "Acme",
                "sdk": "ios",
                "version": "1.10.0",
                "release_notes_url": "https://docs.apexmediation.com/sdk/ios/releases/1.10.0",
                "current_version": "1.9.2",
                "notes": "Faster start-up.",
            })
        );
    }

    #[test]
    fn only_active_customers_not_yet_told_and_not_opted_out_get_it() {
        let base = Recipient {
            customer_id: "cus_a".into(),
            name: "Acme".into(),
            email: "dev@acme.example".into(),
            status: "active".into(),
            opted_out: false,
            already_notified: false,
        };
        assert_eq!(decide(Some(&base), false), NoticeStatus::Enqueued);
        assert_eq!(decide(Some(&base), true), NoticeStatus::WouldEnqueue);
        assert_eq!(decide(None, false), NoticeStatus::UnknownCustomer);
        let with = |f: &dyn Fn(&mut Recipient)| {
            let mut r = base.clone();
            f(&mut r);
            decide(Some(&r), false)
        };
        assert_eq!(
            with(&|r| r.status = "suspended".into()),
            NoticeStatus::Inactive
        );
        assert_eq!(
            with(&|r| r.status = "canceled".into()),
            NoticeStatus::Inactive
        );
        assert_eq!(with(&|r| r.email = " ".into()), NoticeStatus::NoEmail);
        assert_eq!(
            with(&|r| r.already_notified = true),
            NoticeStatus::AlreadyNotified
        );
        assert_eq!(with(&|r| r.opted_out = true), NoticeStatus::OptedOut);
        assert_eq!(NoticeStatus::WouldEnqueue.as_str(), "would_enqueue");
    }
}
