//! `postback:`: the limits and rules of postback requests, as written in the file.

use serde::de::{Deserializer, Error as _};
use serde::Deserialize;
use smart_default::SmartDefault;

use super::cookie::GlobalIdConfig;
use super::cors::CorsConfig;
use super::privacy::PrivacyConfig;
use super::redirect::RedirectConfig;
use crate::units::{ByteSize, HumanDuration};

/// `postback:`: limits and the behaviour of the special parameters.
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct PostbackConfig {
    #[default(ByteSize::kib(16))]
    pub max_url_bytes: ByteSize,
    #[default(ByteSize(1_048_064))]
    pub max_body_bytes: ByteSize,
    #[default(512)]
    pub max_columns: usize,
    pub record_time_window: TimeWindowConfig,
    pub redirect: RedirectConfig,
    pub global_id: GlobalIdConfig,
    /// Moved to the top-level `client_ip:`; refused here with a message that says so.
    #[serde(deserialize_with = "moved_to_client_ip")]
    pub client_ip: (),
    pub cors: CorsConfig,
    pub privacy: PrivacyConfig,
    pub rate_limit: RateLimitConfig,
}

/// `postback.rate_limit:`: postbacks per second allowed from one client address.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// None: no limit. Past it, `429` with `Retry-After: 1`.
    pub per_second: Option<u64>,
}

/// `postback.record_time_window:`: how far `td_record_time` may lie from the receive time.
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct TimeWindowConfig {
    #[default(HumanDuration::secs(7 * 86400))]
    pub past: HumanDuration,
    #[default(HumanDuration::secs(3 * 86400))]
    pub future: HumanDuration,
}

/// `postback.client_ip` was the old place of `client_ip:`: a file that still has it is refused at
/// parse time, with the line, rather than having its trusted proxies silently ignored.
fn moved_to_client_ip<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
    serde::de::IgnoredAny::deserialize(d)?;
    Err(D::Error::custom(
        "`postback.client_ip` has moved to the top-level `client_ip:` section \
         (`client_ip.trusted_proxies`, `client_ip.anonymize`)",
    ))
}
