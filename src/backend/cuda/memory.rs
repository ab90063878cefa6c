//! Device buffers, views, a caching allocator (free lists by size class) and host <-> device
//! copies.
//!
//! A [`Buf`] owns device memory and gives it back to the pool when dropped; the pool hands it out
//! again to a later allocation of the same size class. All work runs on the device's one stream,
//! so reuse is ordered after earlier users (the pattern of PyTorch's single-stream caching
//! allocator). Blocks go back to the driver only on [`super::Device::empty_cache`], on an
//! out-of-memory retry, or when the last buffer and the device are gone.

use super::Device;
use crate::error::{Error, Result};
use cudarc::driver::{result as drv, CudaContext};
use half::bf16;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

/// Element types that live in device buffers (plain old data, any bit pattern valid).
pub trait DeviceType: Copy + Default + Send + Sync + 'static {
    const NAME: &'static str;
}
macro_rules! device_type {
    ($($t:ty),*) => { $(impl DeviceType for $t { const NAME: &'static str = stringify!($t); })* };
}
device_type!(f32, f64, bf16, u32, i32, u64, u8);

/// Small blocks round up to this many bytes (cuMemAlloc's own alignment is 256).
const SMALL_ROUND: usize = 512;
/// Blocks above this size round up to a multiple of it, so that nearby sizes share a free list.
const LARGE_ROUND: usize = 2 << 20;

fn size_class(bytes: usize) -> usize {
    if bytes <= LARGE_ROUND {
        bytes.div_ceil(SMALL_ROUND) * SMALL_ROUND
    } else {
        bytes.div_ceil(LARGE_ROUND) * LARGE_ROUND
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes held by live buffers (size classes, not requested sizes).
    pub in_use: usize,
    /// Bytes in the free lists.
    pub cached: usize,
    /// Allocations served from the free lists.
    pub hits: u64,
    /// Allocations that went to the driver.
    pub misses: u64,
    /// The most bytes live buffers held at once, and the most the pool held from the driver
    /// (live and cached) at once, since the pool began or [`Pool::reset_peak`].
    pub peak_in_use: usize,
    pub peak_reserved: usize,
}

impl PoolStats {
    fn note_peak(&mut self) {
        self.peak_in_use = self.peak_in_use.max(self.in_use);
        self.peak_reserved = self.peak_reserved.max(self.in_use + self.cached);
    }
}

pub(crate) struct Pool {
    ctx: Arc<CudaContext>,
    inner: Mutex<PoolInner>,
}

#[derive(Default)]
struct PoolInner {
    free: HashMap<usize, Vec<u64>>,
    stats: PoolStats,
}

impl Pool {
    pub(crate) fn new(ctx: Arc<CudaContext>) -> Self {
        Pool {
            ctx,
            inner: Mutex::new(PoolInner::default()),
        }
    }

    pub(crate) fn stats(&self) -> PoolStats {
        self.inner.lock().unwrap().stats
    }

    /// A block of `class` bytes (a size class).
    fn alloc(&self, class: usize) -> Result<u64> {
        {
            let mut g = self.inner.lock().unwrap();
            if let Some(p) = g.free.get_mut(&class).and_then(|v| v.pop()) {
                g.stats.cached -= class;
                g.stats.in_use += class;
                g.stats.hits += 1;
                g.stats.note_peak();
                return Ok(p);
            }
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: plain allocation in the bound context.
        let p = match unsafe { drv::malloc_sync(class) } {
            Ok(p) => p,
            Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                // Give the cached blocks back and try once more.
                self.ctx.synchronize()?;
                self.release_cached()?;
                unsafe { drv::malloc_sync(class) }.map_err(|e| {
                    Error(format!(
                        "CUDA out of memory allocating {class} bytes: {}",
                        Error::from(e)
                    ))
                })?
            }
            Err(e) => return Err(e.into()),
        };
        let mut g = self.inner.lock().unwrap();
        g.stats.in_use += class;
        g.stats.misses += 1;
        g.stats.note_peak();
        Ok(p)
    }

    fn release(&self, ptr: u64, class: usize) {
        let mut g = self.inner.lock().unwrap();
        g.stats.in_use -= class;
        g.stats.cached += class;
        g.free.entry(class).or_default().push(ptr);
    }

    /// Start the peaks afresh from what is held now.
    pub(crate) fn reset_peak(&self) {
        let mut g = self.inner.lock().unwrap();
        g.stats.peak_in_use = g.stats.in_use;
        g.stats.peak_reserved = g.stats.in_use + g.stats.cached;
    }

    pub(crate) fn release_cached(&self) -> Result<()> {
        let blocks: Vec<u64> = {
            let mut g = self.inner.lock().unwrap();
            g.stats.cached = 0;
            g.free.drain().flat_map(|(_, v)| v).collect()
        };
        self.ctx.bind_to_thread()?;
        for p in blocks {
            // SAFETY: the block came from malloc_sync and no live buffer refers to it.
            unsafe { drv::free_sync(p) }?;
        }
        Ok(())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Every Buf holds the pool, so none is alive: wait for queued work, then free.
        let _ = self.ctx.synchronize();
        let _ = self.release_cached();
    }
}

/// An owned device buffer of `len` elements of `T`.
pub struct Buf<T: DeviceType> {
    ptr: u64,
    len: usize,
    class: usize,
    pool: Arc<Pool>,
    _t: PhantomData<T>,
}

impl<T: DeviceType> Drop for Buf<T> {
    fn drop(&mut self) {
        if self.class > 0 {
            self.pool.release(self.ptr, self.class);
        }
    }
}

impl<T: DeviceType> std::fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf<{}>[{}]@{:#x}", T::NAME, self.len, self.ptr)
    }
}

/// A read-only window into a buffer.
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T> {
    ptr: u64,
    len: usize,
    _l: PhantomData<&'a T>,
}

/// A writable window into a buffer.
#[derive(Debug)]
pub struct ViewMut<'a, T> {
    ptr: u64,
    len: usize,
    _l: PhantomData<&'a mut T>,
}

/// Anything a kernel may read: a [`Buf`], a [`View`] or a [`ViewMut`].
pub trait DeviceRead<T> {
    /// Device address of the first element.
    fn dptr(&self) -> u64;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Anything a kernel may write: a [`Buf`] or a [`ViewMut`] (taken by `&mut`).
pub trait DeviceWrite<T>: DeviceRead<T> {}

impl<T: DeviceType> DeviceRead<T> for Buf<T> {
    fn dptr(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}
impl<T: DeviceType> DeviceWrite<T> for Buf<T> {}
impl<T> DeviceRead<T> for View<'_, T> {
    fn dptr(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}
impl<T> DeviceRead<T> for ViewMut<'_, T> {
    fn dptr(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}
impl<T> DeviceWrite<T> for ViewMut<'_, T> {}

fn bounds(r: impl RangeBounds<usize>, len: usize) -> (usize, usize) {
    let start = match r.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match r.end_bound() {
        Bound::Included(&e) => e + 1,
        Bound::Excluded(&e) => e,
        Bound::Unbounded => len,
    };
    assert!(
        start <= end && end <= len,
        "device view {start}..{end} out of a buffer of {len}"
    );
    (start, end)
}

impl<T: DeviceType> Buf<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The whole buffer, read-only.
    pub fn as_view(&self) -> View<'_, T> {
        View {
            ptr: self.ptr,
            len: self.len,
            _l: PhantomData,
        }
    }
    /// Elements `range`, read-only.
    pub fn view(&self, range: impl RangeBounds<usize>) -> View<'_, T> {
        let (s, e) = bounds(range, self.len);
        View {
            ptr: self.ptr + (s * std::mem::size_of::<T>()) as u64,
            len: e - s,
            _l: PhantomData,
        }
    }
    /// Elements `range`, writable.
    pub fn view_mut(&mut self, range: impl RangeBounds<usize>) -> ViewMut<'_, T> {
        let (s, e) = bounds(range, self.len);
        ViewMut {
            ptr: self.ptr + (s * std::mem::size_of::<T>()) as u64,
            len: e - s,
            _l: PhantomData,
        }
    }
}

impl<'a, T: DeviceType> View<'a, T> {
    pub fn view(&self, range: impl RangeBounds<usize>) -> View<'a, T> {
        let (s, e) = bounds(range, self.len);
        View {
            ptr: self.ptr + (s * std::mem::size_of::<T>()) as u64,
            len: e - s,
            _l: PhantomData,
        }
    }
}

impl Device {
    /// An uninitialised buffer of `len` elements (its contents are whatever the last user left).
    pub fn alloc<T: DeviceType>(&self, len: usize) -> Result<Buf<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error(format!("device buffer of {len} {} overflows", T::NAME)))?;
        let (ptr, class) = if bytes == 0 {
            (0, 0)
        } else {
            let class = size_class(bytes);
            (self.pool.alloc(class)?, class)
        };
        Ok(Buf {
            ptr,
            len,
            class,
            pool: self.pool.clone(),
            _t: PhantomData,
        })
    }

    /// A buffer of `len` zero bytes.
    pub fn zeros<T: DeviceType>(&self, len: usize) -> Result<Buf<T>> {
        let mut b = self.alloc(len)?;
        self.memset_zero(&mut b)?;
        Ok(b)
    }

    /// Set every byte of `x` to zero (stream-ordered).
    pub fn memset_zero<T: DeviceType>(&self, x: &mut impl DeviceWrite<T>) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: the range lies inside x's allocation; the stream belongs to this context.
        unsafe {
            drv::memset_d8_async(
                x.dptr(),
                0,
                x.len() * std::mem::size_of::<T>(),
                self.stream.cu_stream(),
            )
        }?;
        Ok(())
    }

    /// Copy `data` into a new buffer.
    pub fn upload<T: DeviceType>(&self, data: &[T]) -> Result<Buf<T>> {
        let mut b = self.alloc(data.len())?;
        self.copy_to_device(data, &mut b)?;
        Ok(b)
    }

    /// Copy `data` into `dst` (same length).
    pub fn copy_to_device<T: DeviceType>(
        &self,
        data: &[T],
        dst: &mut impl DeviceWrite<T>,
    ) -> Result<()> {
        if data.len() != dst.len() {
            return Err(Error(format!(
                "upload of {} {} into a buffer of {}",
                data.len(),
                T::NAME,
                dst.len()
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: sizes checked above. From pageable memory the call returns once the source has
        // been staged, so `data` may be released afterwards.
        unsafe { drv::memcpy_htod_async(dst.dptr(), data, self.stream.cu_stream()) }?;
        Ok(())
    }

    /// Copy a device buffer to the host (synchronises the stream).
    pub fn download<T: DeviceType>(&self, src: &impl DeviceRead<T>) -> Result<Vec<T>> {
        let mut out = vec![T::default(); src.len()];
        if !out.is_empty() {
            self.ctx.bind_to_thread()?;
            // SAFETY: `out` holds exactly src.len() elements and lives until the sync below.
            unsafe { drv::memcpy_dtoh_async(&mut out, src.dptr(), self.stream.cu_stream()) }?;
        }
        self.synchronize()?;
        Ok(out)
    }

    /// Device-to-device copy of equal lengths (stream-ordered).
    pub fn copy<T: DeviceType>(
        &self,
        src: &impl DeviceRead<T>,
        dst: &mut impl DeviceWrite<T>,
    ) -> Result<()> {
        if src.len() != dst.len() {
            return Err(Error(format!(
                "device copy of {} {} into {}",
                src.len(),
                T::NAME,
                dst.len()
            )));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: both ranges lie inside their allocations.
        unsafe {
            drv::memcpy_dtod_async(
                dst.dptr(),
                src.dptr(),
                src.len() * std::mem::size_of::<T>(),
                self.stream.cu_stream(),
            )
        }?;
        Ok(())
    }

    /// f32 host values rounded to bf16 (round to nearest even) on the host, then uploaded.
    pub fn upload_f32_as_bf16(&self, data: &[f32]) -> Result<Buf<bf16>> {
        let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
        self.upload(&v)
    }

    /// A bf16 buffer downloaded and widened to f32.
    pub fn download_bf16_as_f32(&self, src: &impl DeviceRead<bf16>) -> Result<Vec<f32>> {
        Ok(self
            .download(src)?
            .into_iter()
            .map(|x| x.to_f32())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_round_up() {
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(2 << 20), 2 << 20);
        assert_eq!(size_class((2 << 20) + 1), 4 << 20);
    }
}
