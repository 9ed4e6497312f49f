//! The one timestamp format of records, answers, callbacks and the decision journal:
//! RFC 3339 in UTC with fixed milliseconds (`2026-01-10T14:20:00.123Z`). Fixed width, so
//! stored times sort as strings, and milliseconds keep the order of events that happen
//! within a second. Decoding accepts any RFC 3339 time (records written by earlier
//! releases carry nanoseconds or whole seconds) and converts it to UTC.
//!
//! Use `#[serde(with = "crate::domain::time")]` on a `DateTime<Utc>` field and
//! `#[serde(default, with = "crate::domain::time::option")]` on an
//! `Option<DateTime<Utc>>` one.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

/// `t` in the one format.
pub fn format(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Any RFC 3339 time, in UTC.
pub fn parse(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc))
}

/// Serializes `t` in the one format.
pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(t))
}

/// Deserializes any RFC 3339 time.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    let s = String::deserialize(d)?;
    parse(&s).map_err(|e| D::Error::custom(format!("{s:?} is not an RFC 3339 time: {e}")))
}

/// The same for `Option<DateTime<Utc>>` (`null` when absent).
pub mod option {
    use super::*;

    /// Serializes `t` in the one format, or `null`.
    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&format(t)),
            None => s.serialize_none(),
        }
    }

    /// Deserializes any RFC 3339 time, or `null`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => parse(&s)
                .map(Some)
                .map_err(|e| D::Error::custom(format!("{s:?} is not an RFC 3339 time: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Stamped {
        #[serde(with = "crate::domain::time")]
        at: DateTime<Utc>,
        #[serde(default, with = "crate::domain::time::option")]
        until: Option<DateTime<Utc>>,
    }

    #[test]
    fn writes_fixed_milliseconds_in_utc_and_reads_any_rfc_3339() {
        let at = parse("2026-01-10T14:20:00.123456789Z").unwrap_or_default();
        let v = serde_json::to_value(Stamped {
            at,
            until: Some(at),
        })
        .unwrap_or_default();
        assert_eq!(
            v,
            serde_json::json!({"at": "2026-01-10T14:20:00.123Z", "until": "2026-01-10T14:20:00.123Z"})
        );
        let whole = serde_json::json!({"at": "2026-01-10T16:20:00+02:00", "until": null});
        let s: Stamped = serde_json::from_value(whole).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(format(&s.at), "2026-01-10T14:20:00.000Z");
        assert_eq!(s.until, None);
        let missing: Stamped =
            serde_json::from_value(serde_json::json!({"at": "2026-01-10T14:20:00Z"}))
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(missing.until, None);
        let bad = serde_json::from_value::<Stamped>(serde_json::json!({"at": "yesterday"}));
        assert!(bad.is_err());
    }
}
