//! Durations written the way people write them in YAML: `250ms`, `30s`, `5m`, `2h`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration in whole milliseconds, written in YAML as a number with a unit
/// (`ms`, `s`, `m`, `h`, `d`), for example `30s` or `1500ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DurationMs(pub u64);

/// Why a duration string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration `{0}`: it is empty; write a number and a unit such as `30s`")]
    Empty(String),
    #[error("invalid duration `{input}`: unknown unit `{unit}`; use one of ms, s, m, h, d (for example `30s`)")]
    UnknownUnit { input: String, unit: String },
    #[error("invalid duration `{0}`: missing unit; write for example `{0}s` or `{0}ms`")]
    MissingUnit(String),
    #[error("invalid duration `{0}`: it must start with a whole number, for example `30s`")]
    BadNumber(String),
    #[error("invalid duration `{0}`: too large")]
    Overflow(String),
}

impl DurationMs {
    /// Milliseconds in this duration.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(secs * 1000)
    }
}

impl FromStr for DurationMs {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let text = input.trim();
        if text.is_empty() {
            return Err(DurationError::Empty(input.to_owned()));
        }
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        if number.is_empty() {
            return Err(DurationError::BadNumber(input.to_owned()));
        }
        let value: u64 = number.parse().map_err(|_| DurationError::Overflow(input.to_owned()))?;
        let factor = match unit.trim() {
            "ms" => 1,
            "s" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(DurationError::MissingUnit(input.to_owned())),
            other => return Err(DurationError::UnknownUnit { input: input.to_owned(), unit: other.to_owned() }),
        };
        value.checked_mul(factor).map(DurationMs).ok_or_else(|| DurationError::Overflow(input.to_owned()))
    }
}

impl fmt::Display for DurationMs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        if ms == 0 {
            write!(f, "0s")
        } else if ms.is_multiple_of(3_600_000) {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1_000) {
            write!(f, "{}s", ms / 1_000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for DurationMs {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DurationMs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for DurationMs {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[0-9]+(ms|s|m|min|h|d)$",
            "description": "A duration: a whole number and a unit (ms, s, m, h, d), e.g. `30s`."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!("250ms".parse::<DurationMs>().unwrap(), DurationMs(250));
        assert_eq!("30s".parse::<DurationMs>().unwrap(), DurationMs(30_000));
        assert_eq!("5m".parse::<DurationMs>().unwrap(), DurationMs(300_000));
        assert_eq!("2h".parse::<DurationMs>().unwrap(), DurationMs(7_200_000));
    }

    #[test]
    fn rejects_bad_units_with_a_hint() {
        let err = "30q".parse::<DurationMs>().unwrap_err().to_string();
        assert!(err.contains("unknown unit `q`"), "{err}");
        let err = "30".parse::<DurationMs>().unwrap_err().to_string();
        assert!(err.contains("missing unit"), "{err}");
        let err = "s".parse::<DurationMs>().unwrap_err().to_string();
        assert!(err.contains("whole number"), "{err}");
    }

    #[test]
    fn display_round_trips() {
        for text in ["250ms", "30s", "5m", "2h", "1500ms"] {
            let parsed: DurationMs = text.parse().unwrap();
            assert_eq!(parsed.to_string().parse::<DurationMs>().unwrap(), parsed);
        }
    }
}
