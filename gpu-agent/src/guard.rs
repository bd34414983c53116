//! The guard's decisions, free of I/O so they are tested exhaustively: when a job's memory is
//! over its budget long enough to kill it ([`Guard`]), and which guard samples are worth
//! sending to the coordinator ([`SampleThrottle`]). Times are seconds on a monotonic clock.
//!
//! Semantics are the seed's `run-script-with-guard`: a sample is over when `pid_mem > limit`;
//! the job is killed when it has been over for at least `over_secs` without a sample under in
//! between, so `over_secs = 0` kills at the first sample over and never otherwise.

/// The limits one job runs under.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardPolicy {
    /// Budget in bytes; over means strictly more than this.
    pub limit_bytes: u64,
    /// Seconds over budget before the kill (0 = at the first sample over).
    pub over_secs: f64,
    /// Seconds between polls.
    pub poll_secs: f64,
}

impl GuardPolicy {
    /// The policy of a job: its own values where set (> 0), the agent's defaults otherwise. A
    /// budget of 0 means "the slot's capacity".
    pub fn for_job(
        budget_bytes: u64,
        job_over_secs: f64,
        job_poll_secs: f64,
        agent_over_secs: f64,
        agent_poll_secs: f64,
        slot_capacity: u64,
    ) -> Self {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        Self {
            limit_bytes: if budget_bytes > 0 {
                budget_bytes
            } else {
                slot_capacity
            },
            over_secs: if positive(job_over_secs) {
                job_over_secs
            } else {
                agent_over_secs.max(0.0)
            },
            poll_secs: if positive(job_poll_secs) {
                job_poll_secs
            } else {
                agent_poll_secs
            },
        }
    }
}

/// What the guard decided about one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Within budget.
    Under,
    /// Over budget for this many seconds, not yet long enough to kill.
    Over {
        /// Seconds since the first sample of this over-budget stretch.
        for_secs: f64,
    },
    /// Kill the job now.
    Kill,
}

/// Per-job guard state: the current over-budget stretch and the exact peak.
#[derive(Debug, Clone)]
pub struct Guard {
    policy: GuardPolicy,
    /// Start of the current stretch of samples over the limit (None while under).
    over_since: Option<f64>,
    /// Highest memory seen in any sample.
    peak: u64,
}

impl Guard {
    /// A guard for one job.
    pub fn new(policy: GuardPolicy) -> Self {
        Self {
            policy,
            over_since: None,
            peak: 0,
        }
    }

    /// The policy.
    pub fn policy(&self) -> GuardPolicy {
        self.policy
    }

    /// The highest memory any sample showed (exact, not downsampled).
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// Feeds one sample of the job's memory taken at `now` (seconds, monotonic).
    pub fn observe(&mut self, now: f64, mem: u64) -> Verdict {
        self.peak = self.peak.max(mem);
        if mem <= self.policy.limit_bytes {
            self.over_since = None;
            return Verdict::Under;
        }
        let since = *self.over_since.get_or_insert(now);
        let for_secs = (now - since).max(0.0);
        debug_assert!(self.over_since.is_some(), "over implies a stretch start");
        if for_secs >= self.policy.over_secs {
            Verdict::Kill
        } else {
            Verdict::Over { for_secs }
        }
    }
}

/// Downsamples the guard's time series for the coordinator: a sample is sent when it is the
/// first, when `min_interval_secs` passed since the last one sent, or when it differs from the
/// last one sent by more than `rel_change` (a fraction). Kills are always sent (see `force`).
#[derive(Debug, Clone)]
pub struct SampleThrottle {
    min_interval_secs: f64,
    rel_change: f64,
    last: Option<(f64, u64)>,
}

impl Default for SampleThrottle {
    /// At most one per second, or sooner on a change of more than 5%.
    fn default() -> Self {
        Self::new(1.0, 0.05)
    }
}

impl SampleThrottle {
    /// A throttle with these bounds.
    pub fn new(min_interval_secs: f64, rel_change: f64) -> Self {
        Self {
            min_interval_secs,
            rel_change,
            last: None,
        }
    }

    /// Whether to send a sample of `value` taken at `now`; records it when yes.
    pub fn should_send(&mut self, now: f64, value: u64) -> bool {
        let send = match self.last {
            None => true,
            Some((t, v)) => {
                let change = value.abs_diff(v) as f64;
                now - t >= self.min_interval_secs || change > self.rel_change * (v.max(1) as f64)
            }
        };
        if send {
            self.last = Some((now, value));
        }
        send
    }

    /// Records a sample that is sent regardless (the one at a kill).
    pub fn force(&mut self, now: f64, value: u64) {
        self.last = Some((now, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(limit: u64, over_secs: f64) -> Guard {
        Guard::new(GuardPolicy {
            limit_bytes: limit,
            over_secs,
            poll_secs: 0.5,
        })
    }

    #[test]
    fn over_secs_zero_kills_at_first_sample_over_and_never_under() {
        let mut g = guard(100, 0.0);
        // At or under the limit never kills (the seed's unconditional-kill bug).
        for (t, m) in [(0.0, 0), (0.5, 50), (1.0, 100), (1.5, 99)] {
            assert_eq!(g.observe(t, m), Verdict::Under);
        }
        assert_eq!(g.observe(2.0, 101), Verdict::Kill);
        assert_eq!(g.peak(), 101);
    }

    #[test]
    fn over_secs_window_must_be_continuous() {
        let mut g = guard(100, 1.0);
        assert_eq!(g.observe(0.0, 150), Verdict::Over { for_secs: 0.0 });
        assert_eq!(g.observe(0.5, 150), Verdict::Over { for_secs: 0.5 });
        assert_eq!(g.observe(0.9, 150), Verdict::Over { for_secs: 0.9 });
        // Dipping under resets the stretch.
        assert_eq!(g.observe(1.0, 90), Verdict::Under);
        assert_eq!(g.observe(1.2, 150), Verdict::Over { for_secs: 0.0 });
        assert!(matches!(g.observe(2.1, 150), Verdict::Over { .. }));
        assert_eq!(g.observe(2.2, 150), Verdict::Kill);
        assert_eq!(g.peak(), 150);
    }

    #[test]
    fn a_single_long_gap_between_samples_counts() {
        // One sample over, then the next poll comes late: the stretch is measured in time.
        let mut g = guard(100, 2.0);
        assert!(matches!(g.observe(10.0, 101), Verdict::Over { .. }));
        assert_eq!(g.observe(12.5, 101), Verdict::Kill);
    }

    #[test]
    fn policy_prefers_job_values_and_falls_back_to_agent_defaults() {
        let p = GuardPolicy::for_job(0, 0.0, 0.0, 3.0, 0.5, 80);
        assert_eq!(
            p,
            GuardPolicy {
                limit_bytes: 80,
                over_secs: 3.0,
                poll_secs: 0.5
            }
        );
        let p = GuardPolicy::for_job(10, 1.5, 0.1, 3.0, 0.5, 80);
        assert_eq!(
            p,
            GuardPolicy {
                limit_bytes: 10,
                over_secs: 1.5,
                poll_secs: 0.1
            }
        );
        let p = GuardPolicy::for_job(10, f64::NAN, -1.0, 0.0, 0.5, 80);
        assert_eq!((p.over_secs, p.poll_secs), (0.0, 0.5));
    }

    #[test]
    fn throttle_sends_first_then_per_second_or_on_big_change() {
        let mut t = SampleThrottle::default();
        assert!(t.should_send(0.0, 1000));
        assert!(!t.should_send(0.1, 1010)); // 1%: held back
        assert!(!t.should_send(0.5, 1049)); // 4.9%
        assert!(t.should_send(0.6, 1060)); // 6% over the last sent (1000)
        assert!(!t.should_send(1.0, 1060));
        assert!(t.should_send(1.6, 1060)); // a second after the last sent
        t.force(1.7, 5000);
        assert!(!t.should_send(1.8, 5001));
        // From zero, any growth beyond 5% of one byte counts as a change.
        let mut z = SampleThrottle::default();
        assert!(z.should_send(0.0, 0));
        assert!(!z.should_send(0.1, 0));
        assert!(z.should_send(0.2, 4096));
    }
}
