//! Where the machine's CPU went during a run: every process that shares it
//! with Herald (broker, database, sinks, the load generator), from `/proc`.
//!
//! Everything runs on one machine, so a rate is bounded by the sum of all
//! of them, not by Herald alone: this row shows whether the machine was
//! saturated and by whom.

use std::collections::HashMap;

/// USER_HZ: the unit of the CPU times in `/proc` (100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU ticks of every process, and of the whole machine, at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// pid → (command name, user + system ticks).
    processes: HashMap<u32, (String, u64)>,
    /// (busy, idle) ticks of all CPUs together, from `/proc/stat`.
    machine: (u64, u64),
}

/// CPU seconds per group of processes over a window, and the machine's idle time.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// (group, CPU seconds), largest first.
    pub groups: Vec<(String, f64)>,
    /// CPU seconds no process used (all cores together).
    pub idle_seconds: f64,
    /// All cores over the window, in CPU seconds (busy + idle).
    pub capacity_seconds: f64,
}

impl Snapshot {
    /// Reads `/proc` now. Unreadable entries (processes that just exited) are skipped.
    pub fn take() -> Snapshot {
        let mut processes = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                    continue;
                };
                if let Some(p) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| parse_stat(&s))
                {
                    processes.insert(pid, p);
                }
            }
        }
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_cpu_line(&s))
            .unwrap_or_default();
        Snapshot { processes, machine }
    }

    /// CPU used from `self` to `later`, grouped: `herald serve` is `serve`,
    /// this process is `bench`, the rest by command name. A process that
    /// started in between counts from zero; one that exited is not counted.
    pub fn usage_until(&self, later: &Snapshot, serve: u32) -> Usage {
        let mut groups: HashMap<String, u64> = HashMap::new();
        let bench = std::process::id();
        for (pid, (name, ticks)) in &later.processes {
            let before = self.processes.get(pid).map_or(0, |p| p.1);
            let used = ticks.saturating_sub(before);
            if used == 0 {
                continue;
            }
            let group = match *pid {
                p if p == serve => "herald serve".to_string(),
                p if p == bench => "bench (load and reader)".to_string(),
                _ => name.clone(),
            };
            *groups.entry(group).or_default() += used;
        }
        let mut groups: Vec<(String, f64)> = groups
            .into_iter()
            .map(|(g, t)| (g, t as f64 / TICKS_PER_SECOND))
            .collect();
        groups.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let busy = later.machine.0.saturating_sub(self.machine.0) as f64 / TICKS_PER_SECOND;
        let idle = later.machine.1.saturating_sub(self.machine.1) as f64 / TICKS_PER_SECOND;
        Usage {
            groups,
            idle_seconds: idle,
            capacity_seconds: busy + idle,
        }
    }
}

impl Usage {
    /// One line: the largest groups (under 0.1 s folded into "other"),
    /// then the idle share.
    pub fn render(&self) -> String {
        let mut parts = Vec::new();
        let mut other = 0.0;
        for (g, s) in &self.groups {
            if *s >= 0.1 {
                parts.push(format!("{g} {s:.1}"));
            } else {
                other += s;
            }
        }
        if other > 0.0 {
            parts.push(format!("other {other:.1}"));
        }
        let idle_share = if self.capacity_seconds > 0.0 {
            100.0 * self.idle_seconds / self.capacity_seconds
        } else {
            0.0
        };
        format!(
            "CPU s: {}; machine idle {:.1} of {:.1} CPU s ({idle_share:.0}%)",
            parts.join(", "),
            self.idle_seconds,
            self.capacity_seconds
        )
    }
}

/// CPU seconds (user + system) process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, ticks)| ticks as f64 / TICKS_PER_SECOND)
}

/// (command name, user + system ticks) from the text of `/proc/PID/stat`.
fn parse_stat(s: &str) -> Option<(String, u64)> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let name = s.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = s.get(close + 2..)?.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

/// (busy, idle) ticks from the `cpu` line of `/proc/stat`; iowait counts as idle.
fn parse_cpu_line(s: &str) -> Option<(u64, u64)> {
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user)
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let idle = get(3) + get(4);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    Some((busy, idle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_the_name_and_cpu_ticks_even_with_spaces_in_the_name() {
        let s = "42 (tokio rt) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 10 0 0";
        assert_eq!(parse_stat(s), Some(("tokio rt".to_string(), 300)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn the_cpu_line_splits_busy_from_idle() {
        let s = "cpu  100 5 20 300 7 0 3 2 0 0\ncpu0 50 2 10 150 3 0 1 1 0 0\n";
        assert_eq!(parse_cpu_line(s), Some((130, 307)));
    }

    #[test]
    fn usage_groups_by_process_and_counts_new_processes_from_zero() {
        let serve = 10;
        let before = Snapshot {
            processes: HashMap::from([
                (serve, ("herald".to_string(), 100)),
                (20, ("postgres".to_string(), 50)),
                (21, ("postgres".to_string(), 10)),
                (30, ("tansu".to_string(), 0)),
            ]),
            machine: (1000, 1000),
        };
        let after = Snapshot {
            processes: HashMap::from([
                (serve, ("herald".to_string(), 400)),
                (20, ("postgres".to_string(), 150)),
                (22, ("postgres".to_string(), 50)),
                (30, ("tansu".to_string(), 250)),
                (31, ("sleep".to_string(), 1)),
            ]),
            machine: (1800, 1200),
        };
        let u = before.usage_until(&after, serve);
        assert_eq!(
            u.groups,
            vec![
                ("herald serve".to_string(), 3.0),
                ("tansu".to_string(), 2.5),
                ("postgres".to_string(), 1.5),
                ("sleep".to_string(), 0.01),
            ]
        );
        assert_eq!(u.idle_seconds, 2.0);
        assert_eq!(u.capacity_seconds, 10.0);
        assert_eq!(
            u.render(),
            "CPU s: herald serve 3.0, tansu 2.5, postgres 1.5, other 0.0; machine idle 2.0 of 10.0 CPU s (20%)"
        );
    }
}
