//! A counting allocator, so targets can assert that decoding allocates within its stated
//! limits whatever a length field claims.
//!
//! Linking `relay-fuzz` installs it as the global allocator (in the CI test binary and in the
//! libFuzzer binaries alike). It passes every call on to the system allocator and, on the
//! thread inside [`measure`], records the largest single request and the peak of bytes live.
//! Counting is per thread, so targets measured on parallel test threads do not see each
//! other; memory freed on another thread than the one that allocated it is not followed (no
//! code under test does that). It does not limit anything: the targets compare what it saw
//! with their bounds.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// What one [`measure`]d call allocated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// The largest single allocation or reallocation requested, bytes.
    pub largest: usize,
    /// The most bytes allocated inside the call and live at once.
    pub peak: usize,
}

struct Counting;

#[global_allocator]
static COUNTING: Counting = Counting;

thread_local! {
    // Const-initialised `Cell`s without destructors: reading them never allocates, which the
    // allocator itself relies on.
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn grew(size: usize) {
    let _ = ARMED.try_with(|armed| {
        if !armed.get() {
            return;
        }
        LARGEST.with(|l| l.set(l.get().max(size)));
        LIVE.with(|live| {
            let now = live.get().saturating_add_unsigned(size);
            live.set(now);
            PEAK.with(|p| p.set(p.get().max(now)));
        });
    });
}

fn shrank(size: usize) {
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            LIVE.with(|live| live.set(live.get().saturating_sub_unsigned(size)));
        }
    });
}

// SAFETY: every call is passed on unchanged to `System`; the bookkeeping around it touches
// only const-initialised thread locals, which neither allocate nor unwind.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: the caller's contract for `alloc` is `System::alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        // SAFETY: `ptr` came from `System` with this layout (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        shrank(layout.size());
        grew(new_size);
        // SAFETY: as for `dealloc`, and the caller's contract for `realloc` is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` and reports what it allocated on this thread. Not reentrant: a nested call
/// reports for itself and ends the outer measurement.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    LIVE.with(|c| c.set(0));
    PEAK.with(|c| c.set(0));
    LARGEST.with(|c| c.set(0));
    ARMED.with(|c| c.set(true));
    // Disarmed again even when `f` panics, so a finding's report does not count.
    struct Disarm;
    impl Drop for Disarm {
        fn drop(&mut self) {
            ARMED.with(|c| c.set(false));
        }
    }
    let disarm = Disarm;
    let result = f();
    drop(disarm);
    let usage = Usage {
        largest: LARGEST.with(Cell::get),
        peak: usize::try_from(PEAK.with(Cell::get)).unwrap_or(0),
    };
    (result, usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_the_largest_request_and_the_peak() {
        let ((), usage) = measure(|| {
            let a = vec![0u8; 1000];
            let b = vec![0u8; 3000];
            drop((a, b));
            let c = vec![0u8; 2000];
            drop(c);
        });
        assert_eq!(usage.largest, 3000);
        assert_eq!(usage.peak, 4000);
        let ((), usage) = measure(|| {});
        assert_eq!(usage, Usage::default());
    }
}
