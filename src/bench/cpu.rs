//! CPU time per operation: the CPU seconds that the nodes and the bench client spent during
//! a run, divided by its operations. Far less noisy than ops/s on a shared machine, so a
//! change is judged by it. The shell reads `/proc/PID/stat`; this module parses it
//! and does the arithmetic.

use serde::Serialize;

/// User plus system CPU time of a process, in clock ticks, from the text of its
/// `/proc/PID/stat` (fields 14 and 15, counted after the command name, which may itself hold
/// spaces and parentheses). `None` if the text is not such a line.
pub fn cpu_ticks_of_stat(text: &str) -> Option<u64> {
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(user + system)
}

/// CPU spent during a run, and per operation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CpuReport {
    /// Node processes measured (those whose pid the dev directory names).
    pub nodes: usize,
    pub node_cpu_seconds: f64,
    pub client_cpu_seconds: f64,
    pub node_us_per_op: f64,
    pub client_us_per_op: f64,
    pub total_us_per_op: f64,
}

impl CpuReport {
    /// From the ticks each side spent (`ticks_per_second` from `sysconf(_SC_CLK_TCK)`).
    pub fn new(
        nodes: usize,
        node_ticks: u64,
        client_ticks: u64,
        ticks_per_second: u64,
        operations: u64,
    ) -> CpuReport {
        let seconds = |ticks: u64| ticks as f64 / ticks_per_second.max(1) as f64;
        let per_op = |ticks: u64| seconds(ticks) * 1e6 / operations.max(1) as f64;
        CpuReport {
            nodes,
            node_cpu_seconds: seconds(node_ticks),
            client_cpu_seconds: seconds(client_ticks),
            node_us_per_op: per_op(node_ticks),
            client_us_per_op: per_op(client_ticks),
            total_us_per_op: per_op(node_ticks + client_ticks),
        }
    }

    pub fn render(&self) -> String {
        format!(
            "cpu: {:.1} µs/op ({:.1} in {} nodes, {:.1} in the client); {:.2} s node CPU, {:.2} s client CPU\n",
            self.total_us_per_op,
            self.node_us_per_op,
            self.nodes,
            self.client_us_per_op,
            self.node_cpu_seconds,
            self.client_cpu_seconds
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_user_plus_system_ticks() {
        let line = "4242 (dynkv) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 3 0 99 1 2";
        assert_eq!(cpu_ticks_of_stat(line), Some(325));
        // A command name with spaces and a parenthesis does not shift the fields.
        let odd = "7 (a b) c) R 1 7 7 0 -1 0 0 0 0 0 10 5 0 0 20 0 1 0 5 1 2";
        assert_eq!(cpu_ticks_of_stat(odd), Some(15));
        assert_eq!(cpu_ticks_of_stat("garbage"), None);
        assert_eq!(cpu_ticks_of_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn per_operation_figures() {
        let report = CpuReport::new(3, 300, 100, 100, 1_000_000);
        assert_eq!(report.node_cpu_seconds, 3.0);
        assert_eq!(report.client_cpu_seconds, 1.0);
        assert!((report.total_us_per_op - 4.0).abs() < 1e-9);
        assert!((report.node_us_per_op - 3.0).abs() < 1e-9);
    }
}
