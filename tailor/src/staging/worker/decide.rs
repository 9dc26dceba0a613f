//! What the end of one attempt means for the staging: a pure function, so every rule of retry,
//! backoff and deadline is in one place and tested without a database or a registry.
//!
//! One owner per kind of failure: the registry client has already retried what is safe at its
//! level, the blob transfer what failed mid-stream; what reaches here goes back to the queue
//! with a backoff that grows to minutes, or at the time the registry asked for
//! (`Retry-After`), for as long as the staging's deadline allows.

use std::time::Duration;

use super::super::queue::{Requeue, Waiting};
use crate::code::Code;
use crate::error::CopyError;

/// Why a copy was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    CancelRequested,
    LeaseLost,
    Draining,
    /// The staging's deadline passed.
    Deadline,
}

/// How an attempt ended.
#[derive(Debug)]
pub enum Attempt<'a> {
    Succeeded,
    Failed(&'a CopyError),
    Stopped(StopReason),
    /// The worker panicked (a bug): recorded, never silently lost.
    Panicked(&'a str),
    /// The staging's repository is held by the pruner.
    RepositoryBusy,
    /// The source registry's budget says wait until `after`.
    RateLimitWait(Duration),
    /// Claimed again after its workers kept vanishing, past `TAILOR_MAX_ATTEMPTS`.
    WornOut,
}

/// What to do with the staging.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Succeed,
    Fail {
        code: Code,
        message: String,
    },
    Cancel,
    Requeue(Requeue),
    /// The lease went to another worker: leave the staging alone.
    Abandon,
}

/// The facts `decide` weighs besides the outcome.
#[derive(Debug, Clone)]
pub struct Circumstances {
    /// Attempts so far, this one included.
    pub attempts: i32,
    pub max_attempts: i32,
    /// Until the staging's deadline.
    pub time_left: Duration,
    /// The longest backoff between attempts.
    pub max_backoff: Duration,
    /// How long to wait out an internal registry in maintenance.
    pub read_only_retry: Duration,
    /// A number in [0, 1) that spreads retries of many stagings apart.
    pub jitter: f64,
    /// Why the previous attempt failed, if it did (`code: message`).
    pub last_error: Option<String>,
}

/// The first backoff; it doubles per attempt up to [`Circumstances::max_backoff`].
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// How long the pruner's work in one repository is waited out.
const REPOSITORY_BUSY_RETRY: Duration = Duration::from_secs(5);

/// The backoff after `attempts` failed attempts: 5 s, 10 s, 20 s, ... up to `max`, with
/// "equal jitter" (between half and all of it), so that retries spread out but still grow.
pub fn backoff(attempts: i32, max: Duration, jitter: f64) -> Duration {
    let exponent = attempts.saturating_sub(1).clamp(0, 20) as u32;
    let ceiling = FIRST_BACKOFF
        .saturating_mul(1u32 << exponent.min(16))
        .min(max);
    ceiling / 2 + (ceiling / 2).mul_f64(jitter.clamp(0.0, 1.0))
}

pub fn decide(attempt: Attempt<'_>, c: &Circumstances) -> Next {
    match attempt {
        Attempt::Succeeded => Next::Succeed,
        Attempt::Stopped(StopReason::CancelRequested) => Next::Cancel,
        Attempt::Stopped(StopReason::LeaseLost) => Next::Abandon,
        Attempt::Stopped(StopReason::Draining) => Next::Requeue(Requeue {
            after: Duration::ZERO,
            counts: false,
            waiting: None,
            last_error: None,
        }),
        Attempt::Stopped(StopReason::Deadline) => Next::Fail {
            code: Code::Timeout,
            message: match &c.last_error {
                Some(last) => {
                    format!("the staging did not finish before its deadline (last error: {last})")
                }
                None => "the staging did not finish before its deadline".into(),
            },
        },
        Attempt::Panicked(what) => Next::Fail {
            code: Code::InternalError,
            message: format!("the worker failed unexpectedly: {what}"),
        },
        Attempt::RepositoryBusy => wait(
            REPOSITORY_BUSY_RETRY,
            Waiting::Maintenance,
            "the pruner is working in the app's repository".into(),
            c,
        ),
        Attempt::RateLimitWait(after) => wait(
            after,
            Waiting::RateLimit,
            "RATE_LIMITED: waiting for the source registry's rate-limit budget".into(),
            c,
        ),
        Attempt::WornOut => Next::Fail {
            code: Code::AttemptsExhausted,
            message: match &c.last_error {
                Some(last) => format!(
                    "gave up after {} attempts (last error: {last})",
                    c.attempts - 1
                ),
                None => format!(
                    "gave up after {} attempts: its workers kept vanishing",
                    c.attempts - 1
                ),
            },
        },
        Attempt::Failed(error) => failed(error, c),
    }
}

fn failed(error: &CopyError, c: &Circumstances) -> Next {
    let described = format!("{}: {error}", error.code());
    if error.is_read_only() {
        // A garbage collection window can outlast every retry: wait it out, uncounted.
        return wait(c.read_only_retry, Waiting::Maintenance, described, c);
    }
    if error.is_rate_limited() {
        let after = error
            .retry_after()
            .unwrap_or(super::super::budget::DEFAULT_BLOCK);
        return wait(after, Waiting::RateLimit, described, c);
    }
    if !error.is_transient() {
        return Next::Fail {
            code: error.code(),
            message: error.to_string(),
        };
    }
    if c.attempts >= c.max_attempts {
        return Next::Fail {
            code: Code::AttemptsExhausted,
            message: format!("gave up after {} attempts: {described}", c.attempts),
        };
    }
    // The registry's own word on when to come back beats our backoff.
    let after = error
        .retry_after()
        .unwrap_or_else(|| backoff(c.attempts, c.max_backoff, c.jitter));
    if after >= c.time_left {
        return Next::Fail {
            code: error.code(),
            message: format!("{error} (no retry fits before the staging's deadline)"),
        };
    }
    Next::Requeue(Requeue {
        after,
        counts: true,
        waiting: Some(Waiting::Retry),
        last_error: Some(described),
    })
}

/// Back to the queue for `after` without spending an attempt, unless the deadline comes first.
fn wait(after: Duration, waiting: Waiting, why: String, c: &Circumstances) -> Next {
    if after >= c.time_left {
        let code = match waiting {
            Waiting::RateLimit => Code::RateLimited,
            _ => Code::Timeout,
        };
        return Next::Fail {
            code,
            message: format!("{why}; the staging's deadline comes first"),
        };
    }
    Next::Requeue(Requeue {
        after,
        counts: false,
        waiting: Some(waiting),
        last_error: Some(why),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RegistryError;

    fn circumstances() -> Circumstances {
        Circumstances {
            attempts: 1,
            max_attempts: 20,
            time_left: Duration::from_secs(900),
            max_backoff: Duration::from_secs(300),
            read_only_retry: Duration::from_secs(15),
            jitter: 0.5,
            last_error: None,
        }
    }

    fn unreachable() -> CopyError {
        CopyError::Source(RegistryError::Unreachable {
            registry: "hub".into(),
            detail: "connection refused".into(),
        })
    }

    #[test]
    fn backoff_grows_to_minutes_and_stays_under_the_cap() {
        // Ceilings 5, 10, 20, 40, 80, 160 s, then the 300 s cap; equal jitter: half to all.
        let ceilings = [5, 10, 20, 40, 80, 160, 300, 300];
        for (attempts, ceiling) in (1..).zip(ceilings) {
            let ceiling = Duration::from_secs(ceiling);
            let max = Duration::from_secs(300);
            assert_eq!(
                backoff(attempts, max, 0.0),
                ceiling / 2,
                "attempt {attempts}"
            );
            assert_eq!(backoff(attempts, max, 1.0), ceiling, "attempt {attempts}");
        }
    }

    #[test]
    fn transient_failures_go_back_with_backoff_and_count() {
        let next = decide(
            Attempt::Failed(&unreachable()),
            &Circumstances {
                attempts: 3,
                ..circumstances()
            },
        );
        let Next::Requeue(requeue) = next else {
            panic!("{next:?}")
        };
        assert_eq!(requeue.after, Duration::from_secs(15));
        assert!(requeue.counts);
        assert_eq!(requeue.waiting, Some(Waiting::Retry));
        assert!(
            requeue
                .last_error
                .unwrap()
                .starts_with("UPSTREAM_UNREACHABLE: ")
        );
    }

    #[test]
    fn the_deadline_not_the_attempt_count_ends_retrying() {
        let tight = Circumstances {
            attempts: 5,
            time_left: Duration::from_secs(30),
            ..circumstances()
        };
        let next = decide(Attempt::Failed(&unreachable()), &tight);
        let Next::Fail { code, message } = next else {
            panic!("{next:?}")
        };
        assert_eq!(code, "UPSTREAM_UNREACHABLE");
        assert!(message.contains("deadline"), "{message}");
        let spent = Circumstances {
            attempts: 20,
            ..circumstances()
        };
        assert!(matches!(
            decide(Attempt::Failed(&unreachable()), &spent),
            Next::Fail {
                code: Code::AttemptsExhausted,
                ..
            }
        ));
    }

    #[test]
    fn retry_after_sets_the_next_run_and_rate_limits_do_not_count() {
        let limited = CopyError::Source(RegistryError::RateLimited {
            registry: "docker.io".into(),
            retry_after: Some(Duration::from_secs(30)),
        });
        let Next::Requeue(requeue) = decide(Attempt::Failed(&limited), &circumstances()) else {
            panic!()
        };
        assert_eq!(
            (requeue.after, requeue.counts, requeue.waiting),
            (Duration::from_secs(30), false, Some(Waiting::RateLimit))
        );
        let unavailable = CopyError::Source(RegistryError::Unavailable {
            registry: "hub".into(),
            detail: "503".into(),
            retry_after: Some(Duration::from_secs(120)),
        });
        let Next::Requeue(requeue) = decide(Attempt::Failed(&unavailable), &circumstances()) else {
            panic!()
        };
        assert_eq!(
            (requeue.after, requeue.counts),
            (Duration::from_secs(120), true)
        );
        let late = Circumstances {
            time_left: Duration::from_secs(10),
            ..circumstances()
        };
        assert!(matches!(
            decide(Attempt::Failed(&limited), &late),
            Next::Fail {
                code: Code::RateLimited,
                ..
            }
        ));
    }

    #[test]
    fn permanent_failures_fail_at_once_with_their_code() {
        let denied = CopyError::PlatformMismatch("windows/amd64".into());
        assert!(matches!(
            decide(Attempt::Failed(&denied), &circumstances()),
            Next::Fail {
                code: Code::PlatformMismatch,
                ..
            }
        ));
    }

    #[test]
    fn maintenance_and_draining_are_waited_out_uncounted() {
        let read_only = CopyError::Destination(RegistryError::ReadOnly {
            registry: "internal".into(),
        });
        let Next::Requeue(requeue) = decide(Attempt::Failed(&read_only), &circumstances()) else {
            panic!()
        };
        assert_eq!(
            (requeue.after, requeue.counts, requeue.waiting),
            (Duration::from_secs(15), false, Some(Waiting::Maintenance))
        );
        let Next::Requeue(requeue) =
            decide(Attempt::Stopped(StopReason::Draining), &circumstances())
        else {
            panic!()
        };
        assert_eq!(
            (requeue.after, requeue.counts, requeue.waiting),
            (Duration::ZERO, false, None)
        );
    }

    #[test]
    fn stops_cancel_abandon_or_time_out() {
        assert_eq!(
            decide(
                Attempt::Stopped(StopReason::CancelRequested),
                &circumstances()
            ),
            Next::Cancel
        );
        assert_eq!(
            decide(Attempt::Stopped(StopReason::LeaseLost), &circumstances()),
            Next::Abandon
        );
        assert!(matches!(
            decide(Attempt::Stopped(StopReason::Deadline), &circumstances()),
            Next::Fail {
                code: Code::Timeout,
                ..
            }
        ));
        let after_a_failure = Circumstances {
            last_error: Some("TIMEOUT: hub did not answer in time".into()),
            ..circumstances()
        };
        let Next::Fail { message, .. } =
            decide(Attempt::Stopped(StopReason::Deadline), &after_a_failure)
        else {
            panic!()
        };
        assert!(
            message.ends_with("(last error: TIMEOUT: hub did not answer in time)"),
            "{message}"
        );
        let worn = Circumstances {
            attempts: 21,
            ..circumstances()
        };
        let Next::Fail { code, message } = decide(Attempt::WornOut, &worn) else {
            panic!()
        };
        assert_eq!(code, "ATTEMPTS_EXHAUSTED");
        assert!(message.contains("after 20 attempts"), "{message}");
        assert!(matches!(
            decide(Attempt::Panicked("boom"), &circumstances()),
            Next::Fail {
                code: Code::InternalError,
                ..
            }
        ));
    }
}
