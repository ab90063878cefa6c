//! The CPU backend's buffers and their cache: a freed buffer goes back to a free list by
//! (element type, length) and the next allocation of that size takes it, as the CUDA
//! backend's caching allocator does. A training step allocates the same sizes every step, so
//! after the first one no buffer is zero-filled or faulted in again (a serial memset of every
//! fresh activation cost ~6% of a small MoE step on 2 cores).

use crate::backend::kernels::Elem;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// The most bytes the free lists hold; a buffer freed beyond it goes back to the allocator.
const MAX_CACHED: usize = 2 << 30;

#[derive(Default)]
struct Cache {
    free: HashMap<(TypeId, usize), Vec<Box<dyn Any + Send>>>,
    bytes: usize,
}

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

/// A host buffer of the CPU backend (given back to the cache when dropped).
pub struct HostVec<T: Elem> {
    v: Vec<T>,
}

impl<T: Elem> HostVec<T> {
    /// A buffer of `len` elements: a cached one of that length (holding what it held), or a
    /// new one of zeros.
    pub fn take(len: usize) -> HostVec<T> {
        if len > 0 {
            let mut guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
            let cache = guard.get_or_insert_with(Cache::default);
            if let Some(b) = cache
                .free
                .get_mut(&(TypeId::of::<T>(), len))
                .and_then(|l| l.pop())
            {
                cache.bytes -= len * std::mem::size_of::<T>();
                if let Ok(v) = b.downcast::<Vec<T>>() {
                    return HostVec { v: *v };
                }
            }
        }
        HostVec {
            v: vec![T::default(); len],
        }
    }

    pub fn from_vec(v: Vec<T>) -> HostVec<T> {
        HostVec { v }
    }
}

impl<T: Elem> Drop for HostVec<T> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.v);
        let bytes = v.len() * std::mem::size_of::<T>();
        if bytes == 0 {
            return;
        }
        let mut guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let cache = guard.get_or_insert_with(Cache::default);
        if cache.bytes + bytes <= MAX_CACHED {
            cache.bytes += bytes;
            cache
                .free
                .entry((TypeId::of::<T>(), v.len()))
                .or_default()
                .push(Box::new(v));
        }
    }
}

impl<T: Elem> Deref for HostVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.v
    }
}

impl<T: Elem> DerefMut for HostVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.v
    }
}

/// Give every cached buffer back to the allocator (after training, before other work).
pub fn release_cached() {
    let mut guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    *guard = None;
}

/// Bytes the free lists hold.
pub fn cached_bytes() -> usize {
    let guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    guard.as_ref().map_or(0, |c| c.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_buffers_are_reused_by_size_and_type() {
        let mut a = HostVec::<f32>::take(12347);
        a[3] = 7.0;
        let p = a.as_ptr();
        drop(a);
        // Another type or length does not take it.
        let b = HostVec::<u32>::take(12347);
        let c = HostVec::<f32>::take(12346);
        let d = HostVec::<f32>::take(12347);
        assert_eq!(d.as_ptr(), p);
        assert_eq!(d[3], 7.0, "a cached buffer keeps its contents");
        drop((b, c, d));
        assert!(cached_bytes() >= 4 * 12347);
    }
}
