//! The wall clock as the request path reads it where a few milliseconds do not matter (a
//! frame's append time, the `Date` field): the kernel's coarse clock, one tick's resolution,
//! read from memory the kernel updates rather than from the hardware clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// UNIX milliseconds now, up to one kernel tick (a few ms) behind the precise clock.
pub fn coarse_unix_millis() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the whole call.
        if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
            return (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000;
        }
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_is_the_wall_clock_to_a_tick() {
        let precise = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let before = precise(SystemTime::now());
        let coarse = coarse_unix_millis();
        let after = precise(SystemTime::now());
        // A tick is at most 10 ms (HZ=100); allow a little more for a descheduled thread.
        assert!(
            coarse + 50 >= before && coarse <= after,
            "{before} {coarse} {after}"
        );
    }
}
