//! CPU time of this process (user + system, all threads), as getrusage(RUSAGE_SELF) reports
//! it, read from /proc/self/stat (fields utime and stime, in USER_HZ = 100 ticks per second
//! on every Linux architecture) so that no raw libc call is needed.

use std::time::Duration;

use anyhow::Context;

/// Ticks per second of /proc's utime/stime (USER_HZ, fixed by the kernel ABI).
const USER_HZ: u64 = 100;

/// CPU time used by this process so far.
pub fn process_cpu_time() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    parse_stat(&stat).context("parsing /proc/self/stat")
}

/// utime + stime of a /proc/PID/stat line (fields 14 and 15; the command name in field 2
/// may contain spaces and parentheses, so count from the last ')').
fn parse_stat(stat: &str) -> anyhow::Result<Duration> {
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("no ')' after the command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 -> index 11, stime index 12.
    let tick = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .context("too few fields")?
            .parse::<u64>()
            .context("not a number")
    };
    let ticks = tick(11)? + tick(12)?;
    Ok(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000 / USER_HZ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_stat_name_with_spaces_reads_utime_and_stime() {
        let line = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";

        let t = parse_stat(line).unwrap();

        assert_eq!(t, Duration::from_secs(3));
    }

    #[test]
    fn test_process_cpu_time_reads_own_process() {
        assert!(process_cpu_time().is_ok());
    }
}
