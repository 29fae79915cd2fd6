//! The binary's memory allocator: the C library's `malloc`, or mimalloc (built in) when
//! the environment says `FEDGATE_ALLOCATOR=mimalloc`.
//!
//! Measured side by side (BENCHMARKS.md, "Allocators"), mimalloc took about a tenth
//! off the time and CPU of a one-row lookup through a coordinator, gained nothing on a
//! 64 KiB answer, and held more memory: 57 against 44 MiB idle, and peaks about 30 MiB
//! higher while streaming ten million rows (a member at 239 of its 256 MiB target).
//! The C library's allocator stays the default, for the memory bounds; a gateway that
//! answers many small lookups can choose mimalloc. The switch is read once, at the
//! process's first allocation, so that the benchmark can compare allocators with one
//! binary and a deployment can choose without a build.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

use mimalloc::MiMalloc;

/// The environment variable that chooses the allocator.
pub const VARIABLE: &str = "FEDGATE_ALLOCATOR";

/// 0 until the first allocation decides; then [`MIMALLOC`] or [`SYSTEM`], for good.
static CHOICE: AtomicU8 = AtomicU8::new(0);
const MIMALLOC: u8 = 1;
const SYSTEM: u8 = 2;

/// The allocator the process uses. Every block is freed by the allocator that gave
/// it: the choice never changes once made, and threads that race to make it read the
/// same environment and make the same one.
pub struct Allocator;

#[inline]
fn choice() -> u8 {
    let c = CHOICE.load(Ordering::Relaxed);
    if c != 0 {
        return c;
    }
    // `getenv` allocates nothing, which matters inside the allocator; nothing sets
    // the environment before the first allocation.
    // SAFETY: the name is a NUL-terminated string, and the value is read before any
    // thread could change the environment.
    let mimalloc = unsafe {
        let v = libc::getenv(c"FEDGATE_ALLOCATOR".as_ptr());
        !v.is_null() && std::ffi::CStr::from_ptr(v).to_bytes() == b"mimalloc"
    };
    let c = if mimalloc { MIMALLOC } else { SYSTEM };
    CHOICE.store(c, Ordering::Relaxed);
    c
}

/// The allocator [`choice`] made.
#[inline]
fn backend() -> &'static dyn GlobalAlloc {
    match choice() {
        MIMALLOC => &MiMalloc,
        _ => &System,
    }
}

// SAFETY: each method forwards to one allocator, the same for the process's whole life
// (see `choice`), so every block is freed or resized by the allocator that made it.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { backend().alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { backend().alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { backend().dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe { backend().realloc(ptr, layout, new_size) }
    }
}

/// The allocator in use, as the gateway names it when it starts.
pub fn name() -> &'static str {
    match choice() {
        MIMALLOC => "mimalloc",
        _ => "system",
    }
}

/// Why the environment's choice of allocator is not one there is, if it is not.
pub fn problem() -> Option<String> {
    match std::env::var(VARIABLE) {
        Err(std::env::VarError::NotPresent) => None,
        Ok(v) if v == "system" || v == "mimalloc" => None,
        Ok(v) => Some(format!(
            "{VARIABLE}={v:?} names no allocator: use \"system\" (the default) or \"mimalloc\""
        )),
        Err(std::env::VarError::NotUnicode(v)) => Some(format!(
            "{VARIABLE}={v:?} names no allocator: use \"system\" (the default) or \"mimalloc\""
        )),
    }
}
