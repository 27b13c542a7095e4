//! Peak resident memory of work done in a fresh child process of the bench binary, so the
//! peak (`VmHWM` of `/proc/self/status`, Linux) measures that work alone and not the
//! benchmarks that ran before it. Shared by the benches through `#[path]`.

use std::process::Command;

/// The process's peak resident set size so far, in kB (`VmHWM`).
///
/// # Panics
/// When `/proc/self/status` cannot be read or has no `VmHWM` line (not Linux).
pub fn vm_hwm_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// The arguments after `flag` when this process was started as a child with it.
pub fn child_args(flag: &str) -> Option<Vec<String>> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == flag)?;
    Some(args[i + 1..].to_vec())
}

/// Run this executable again as `EXE flag args…` and return its stdout.
///
/// # Panics
/// When the child cannot start or fails (its stderr is in the message).
pub fn run_child(flag: &str, args: &[&str]) -> String {
    let out = Command::new(std::env::current_exe().expect("current exe"))
        .arg(flag)
        .args(args)
        .output()
        .expect("child");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Parse the `"{before} {after}"` line a child prints (kB).
pub fn parse_before_after(text: &str) -> (u64, u64) {
    let mut it = text
        .split_whitespace()
        .map(|x| x.parse::<u64>().expect("kB"));
    (it.next().expect("before"), it.next().expect("after"))
}
