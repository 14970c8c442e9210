//! Threads that take their work in batches, and how the kernel should schedule them.

use log::debug;

/// Have the kernel schedule the calling thread as `SCHED_BATCH`: the same share of the CPU
/// at the same nice value, but when woken it does not preempt the thread that woke it.
///
/// It suits the threads that take whatever others queued for them: the dispatcher, and a
/// fleet node's Redis writer and reader. A connection thread that queues a message wakes
/// the dispatcher; preempted at once, it would run again only to read what its client sent
/// next and wake the dispatcher again. Left to run, it reads on until it blocks, and the
/// dispatcher then takes all it queued in one go: one context switch instead of two. With
/// the server on one core this gave one-to-one chat 15-18% more deliveries/s and a p50
/// 10 µs lower, fan-out unchanged. The Redis writer, likewise, then sends more messages per
/// entry, and the reader, woken by Redis, waits for the dispatcher to finish writing rather
/// than preempt it: a fleet node's fan-out at 8 messages in flight went from 0.64–0.73× of
/// a lone node's to 0.74–0.82×. The backlog writers the dispatcher starts inherit the
/// policy, which suits them too: they move bulk data to clients that read slowly.
///
/// `who` names the thread for the log, should the kernel refuse. (On Linux, process id 0
/// means the calling thread, not the process.)
pub(crate) fn run_as_batch(who: &str) {
    if scheduler::set_self_policy(scheduler::Policy::Batch, 0).is_err() {
        let why = std::io::Error::last_os_error();
        debug!("the {who} runs as a normal thread: SCHED_BATCH was refused ({why})");
    }
}
