//! Waiting for work: signals can race the data they announce, so look again shortly
//! after an empty wake-up before falling back to the idle poll.

/// After a wake-up that found nothing, look again a few times shortly after (the event
/// can come before the commit is visible, and the writer may be descheduled in between),
/// then fall back to the idle poll.
#[derive(Debug, Default)]
pub struct Recheck {
    step: usize,
}

impl Recheck {
    const STEPS_MS: [u64; 4] = [1, 4, 16, 64];

    /// A wake-up arrived: start the schedule.
    pub fn woken(&mut self) {
        self.step = 1;
    }

    /// Work was found: no re-checks needed.
    pub fn found(&mut self) {
        self.step = 0;
    }

    /// How long to wait before looking again.
    pub fn next_wait(&mut self, idle: std::time::Duration) -> std::time::Duration {
        match Self::STEPS_MS.get(self.step.wrapping_sub(1)) {
            Some(ms) if self.step > 0 => {
                self.step += 1;
                std::time::Duration::from_millis(*ms).min(idle)
            }
            _ => {
                self.step = 0;
                idle
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Recheck;
    use std::time::Duration;

    #[test]
    fn recheck_backs_off_then_idles() {
        let idle = Duration::from_millis(100);
        let mut r = Recheck::default();
        assert_eq!(r.next_wait(idle), idle);
        r.woken();
        let waits: Vec<u64> = (0..6)
            .map(|_| r.next_wait(idle).as_millis() as u64)
            .collect();
        assert_eq!(waits, vec![1, 4, 16, 64, 100, 100]);
        r.woken();
        r.found();
        assert_eq!(r.next_wait(idle), idle);
    }
}
