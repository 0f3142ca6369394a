//! Polling of a queue thread after it interrupts the driver (as QEMU's IOThread
//! `poll-max-ns` and vhost's busy loop do).
//!
//! After an interrupt, a busy driver answers with new requests within tens of microseconds:
//! it takes the used buffers and makes new ones available. A thread that sleeps in the
//! meantime costs a doorbell (an ioreq the vCPU waits on) and two thread wakeups; one that
//! polls the driver ring with doorbells off picks the requests up at once.
//!
//! The window is all or nothing, and it follows the driver: it stays open while the driver
//! answers within it; after [`MISSES_TO_STOP`] interrupts in a row that the driver did not
//! answer in time, polling stops, and one interrupt in [`PROBE_EVERY`] then polls again to
//! see whether the driver has become fast; an answer in time turns polling back on. An idle
//! or slow guest thus costs a few windows and then almost nothing. (QEMU grows its window
//! from a few microseconds while its event loop's blocking times stay short; here a driver
//! that is not polled for answers only through a doorbell, whose own cost is above any
//! sensible window, so the time to its answer says nothing about the window it needs.)

use std::time::{Duration, Instant};

/// Interrupts in a row the driver did not answer within the window before polling stops.
pub const MISSES_TO_STOP: u32 = 8;
/// While polling is off, one interrupt in this many polls anyway.
pub const PROBE_EVERY: u32 = 64;

/// The polling window of one queue thread.
#[derive(Debug, Clone)]
pub struct PollWindow {
    max: Duration,
    on: bool,
    misses: u32,
    /// Interrupts since polling stopped (for the probes).
    skipped: u32,
    /// The interrupt the driver has not answered yet, and the window it was given.
    pending: Option<(Instant, Duration)>,
}

impl PollWindow {
    /// A window of `max` (zero: never poll); polling starts on.
    pub fn new(max: Duration) -> PollWindow {
        PollWindow {
            max,
            on: !max.is_zero(),
            misses: 0,
            skipped: 0,
            pending: None,
        }
    }

    /// Whether interrupts are followed by polling now.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Whether the next interrupt may open a window (to keep doorbells off across it).
    pub fn may_poll(&self) -> bool {
        !self.max.is_zero()
    }

    /// An interrupt went to the driver at `now`: returns until when to poll, if at all.
    pub fn interrupted(&mut self, now: Instant) -> Option<Instant> {
        if self.max.is_zero() {
            return None;
        }
        if let Some((t0, w)) = self.pending {
            // Not answered yet: the window runs from the first unanswered interrupt.
            return (!w.is_zero()).then(|| t0 + w).filter(|end| *end > now);
        }
        let window = if self.on {
            self.max
        } else {
            self.skipped += 1;
            if self.skipped >= PROBE_EVERY {
                self.skipped = 0;
                self.max
            } else {
                Duration::ZERO
            }
        };
        self.pending = Some((now, window));
        (!window.is_zero()).then(|| now + window)
    }

    /// The driver made requests available at `now`.
    pub fn driver_work(&mut self, now: Instant) {
        let Some((t0, window)) = self.pending.take() else {
            return;
        };
        if window.is_zero() {
            return; // not polled: nothing learnt
        }
        if now.saturating_duration_since(t0) <= window {
            self.on = true;
            self.misses = 0;
        } else {
            self.misses += 1;
            if self.misses >= MISSES_TO_STOP {
                self.on = false;
                self.skipped = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// One interrupt at `t` answered after `answer` µs; returns the window it got.
    fn cycle(w: &mut PollWindow, t: Instant, answer: u64) -> Option<Duration> {
        let end = w.interrupted(t);
        w.driver_work(t + us(answer));
        end.map(|e| e - t)
    }

    #[test]
    fn test_zero_max_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        let t = Instant::now();
        assert_eq!(cycle(&mut w, t, 1), None);
        assert!(!w.is_on() && !w.may_poll());
    }

    #[test]
    fn test_stays_on_while_the_driver_answers_in_time() {
        let mut w = PollWindow::new(us(100));
        let t = Instant::now();
        for i in 0..100 {
            assert_eq!(cycle(&mut w, t + us(1000 * i), 60), Some(us(100)));
        }
        assert!(w.is_on());
    }

    #[test]
    fn test_a_slow_driver_stops_polling_then_probes_turn_it_back_on() {
        let mut w = PollWindow::new(us(100));
        let mut t = Instant::now();
        let mut windows = 0;
        for _ in 0..MISSES_TO_STOP {
            windows += u32::from(cycle(&mut w, t, 5_000).is_some());
            t += us(10_000);
        }
        assert_eq!(windows, MISSES_TO_STOP);
        assert!(!w.is_on());
        // Off: one probe in PROBE_EVERY interrupts.
        let mut probes = 0;
        for _ in 0..PROBE_EVERY * 3 {
            probes += u32::from(cycle(&mut w, t, 5_000).is_some());
            t += us(10_000);
        }
        assert_eq!(probes, 3);
        assert!(!w.is_on());
        // The driver got fast: the next probe catches it.
        let mut n = 0;
        while !w.is_on() {
            cycle(&mut w, t, 50);
            t += us(1_000);
            n += 1;
            assert!(n <= PROBE_EVERY, "no probe in {n} interrupts");
        }
        assert_eq!(cycle(&mut w, t, 50), Some(us(100)));
    }

    #[test]
    fn test_one_late_answer_does_not_stop_polling() {
        let mut w = PollWindow::new(us(100));
        let t = Instant::now();
        for i in 0..50 {
            let late = if i % 4 == 0 { 500 } else { 50 };
            cycle(&mut w, t + us(1000 * i), late);
        }
        assert!(w.is_on());
    }

    #[test]
    fn test_the_window_runs_from_the_first_unanswered_interrupt() {
        let mut w = PollWindow::new(us(100));
        let t = Instant::now();
        assert_eq!(w.interrupted(t), Some(t + us(100)));
        assert_eq!(w.interrupted(t + us(90)), Some(t + us(100)));
        assert_eq!(w.interrupted(t + us(150)), None);
    }

    #[test]
    fn test_driver_work_without_an_interrupt_changes_nothing() {
        let mut w = PollWindow::new(us(100));
        w.driver_work(Instant::now());
        assert!(w.is_on());
    }
}
