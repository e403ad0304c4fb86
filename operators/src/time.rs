//! Event-time limits and arithmetic that cannot overflow.
//!
//! Event time is a `u64` of milliseconds since the Unix epoch, but no record may carry a time
//! past [`MAX_EVENT_TIME`] (the last millisecond of the year 9999): decoders refuse it, so
//! that every deadline, window end and timer an operator derives from a record's time
//! (`t + timeout`, `end + window`) stays far below `u64::MAX`. Sources further refuse times
//! too far ahead of the wall clock (`max_future`, see [`FutureBound`]).

use crate::EventTime;

/// The latest event time a record may carry: 9999-12-31T23:59:59.999Z.
pub const MAX_EVENT_TIME: EventTime = 253_402_300_799_999;

/// Default of a source's `max_future`: how far ahead of the wall clock an event time may be.
pub const DEFAULT_MAX_FUTURE_MS: u64 = 5 * 60 * 1000;

/// An event time a record may not carry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    /// Past [`MAX_EVENT_TIME`].
    #[error(
        "`{field}` is {time}, past the latest event time {max} (9999-12-31T23:59:59.999Z); event time is milliseconds since the Unix epoch",
        max = MAX_EVENT_TIME
    )]
    PastLatest {
        /// The field that holds it.
        field: &'static str,
        /// The time.
        time: EventTime,
    },
    /// Further ahead of the wall clock than a source's `max_future`.
    #[error(
        "event time {time} is {ahead} ms ahead of the wall clock {now}, more than max_future ({max_ahead} ms); hint: fix the sender's clock, or raise the source's `max_future`"
    )]
    Future {
        /// The time.
        time: EventTime,
        /// How far ahead, ms.
        ahead: u64,
        /// The wall clock.
        now: EventTime,
        /// The source's `max_future`, ms.
        max_ahead: u64,
    },
}

/// Checks that `time` is a representable event time; the error says what was wrong.
pub fn check_event_time(field: &'static str, time: EventTime) -> Result<(), TimeError> {
    if time > MAX_EVENT_TIME {
        return Err(TimeError::PastLatest { field, time });
    }
    Ok(())
}

/// Milliseconds since the Unix epoch by the wall clock.
pub fn wall_clock_ms() -> EventTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
}

/// Refuses records whose event time is too far ahead of the wall clock: one such record
/// would otherwise move its source's watermark into the future, so that every later good
/// record is late, and make windowed operators wait for (or walk through) a span of time
/// that no data fills.
///
/// The limit is taken from the wall clock when [`FutureBound::refresh`] is called (once per
/// poll of a source), so checking a record is one comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FutureBound {
    max_ahead: u64,
    limit: EventTime,
}

impl FutureBound {
    /// A bound of `max_ahead` ms past the wall clock (refreshed now).
    pub fn new(max_ahead: u64) -> Self {
        let mut bound = Self { max_ahead, limit: 0 };
        bound.refresh();
        bound
    }

    /// A bound with an explicit wall clock, for tests.
    pub const fn at(max_ahead: u64, now: EventTime) -> Self {
        Self { max_ahead, limit: now.saturating_add(max_ahead) }
    }

    /// Re-reads the wall clock.
    pub fn refresh(&mut self) {
        self.limit = wall_clock_ms().saturating_add(self.max_ahead);
    }

    /// Checks one event time; the error is the dead letter's reason.
    pub fn check(&self, time: EventTime) -> Result<(), TimeError> {
        if time <= self.limit {
            return Ok(());
        }
        let now = self.limit - self.max_ahead;
        Err(TimeError::Future { time, ahead: time - now, now, max_ahead: self.max_ahead })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn future_bound_refuses_only_past_the_limit() {
        let bound = FutureBound::at(1_000, 5_000);
        assert!(bound.check(6_000).is_ok());
        let err = bound.check(6_001).unwrap_err().to_string();
        assert!(err.starts_with("event time 6001 is 1001 ms ahead of the wall clock 5000"), "{err}");
        assert!(FutureBound::at(u64::MAX, 5).check(u64::MAX).is_ok(), "a saturated bound admits everything");
    }

    #[test]
    fn event_times_past_year_9999_are_refused() {
        assert!(check_event_time("timestamp", MAX_EVENT_TIME).is_ok());
        let err = check_event_time("timestamp", u64::MAX).unwrap_err().to_string();
        assert!(err.contains("past the latest event time"), "{err}");
    }
}
