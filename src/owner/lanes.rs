//! Where a sub-query's work runs at the data owner: on the gateway's own threads, or,
//! for an origin class the owner marks `priority = "low"` (`[[subquery_admission]]`),
//! on threads the operating system runs at a lower priority.
//!
//! Admission bounds how many sub-queries of a class run at once; it cannot stop the
//! few it admits from taking every core. On a busy owner the low lane's threads get a
//! small share of the CPU while others want it, and all of it when nobody else does,
//! so a county's lookup is not queued behind a city's heavy aggregates (the fairness
//! benchmark measures it). Everything a sub-query does runs on its lane: planning,
//! the engine's own tasks (DataFusion spawns on the runtime that polls it) and the
//! reading of its databases.

use std::sync::OnceLock;

use tokio::runtime::{Handle, Runtime};

/// The niceness of the low lane's threads (0 is normal, 19 the lowest). Linux weighs
/// a nice-10 thread at about a tenth of a nice-0 one when both want a core.
pub const LOW_NICE: i32 = 10;

static LOW: OnceLock<Runtime> = OnceLock::new();

/// The runtime a sub-query runs on: this gateway's own for normal priority (the
/// caller must be inside it), the process's low-priority lane otherwise.
pub fn handle(low: bool) -> Handle {
    if !low {
        return Handle::current();
    }
    LOW.get_or_init(|| {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("fedgate-low")
            .enable_all()
            .on_thread_start(lower_this_thread)
            .build()
            // Building a runtime fails only when threads cannot be created at all.
            .expect("the low-priority lane's threads")
    })
    .handle()
    .clone()
}

/// Lowers the calling thread's scheduling priority to [`LOW_NICE`]. On Linux
/// niceness belongs to each thread, so this changes only the lane's threads.
fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take plain integers, touch no memory of ours
        // and have no preconditions; a failure (not permitted) leaves the thread at
        // normal priority, which costs fairness, never correctness.
        let r = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, LOW_NICE)
        };
        if r != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "Could not lower the priority of a low-lane thread"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the calling thread's niceness from /proc (field 19 of its stat line).
    #[cfg(target_os = "linux")]
    fn my_nice() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // The command name may hold spaces; the fields after it start after ')'.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_low_lane_runs_at_lower_priority_and_the_normal_one_does_not() {
        let normal = my_nice();
        let low = handle(true).spawn(async { my_nice() }).await.unwrap();
        assert_eq!(low, LOW_NICE);
        let same = handle(false).spawn(async { my_nice() }).await.unwrap();
        assert_eq!(same, normal);
    }
}
