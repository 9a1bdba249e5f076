//! Bounds-checked access to packet bytes: the one place that does pointer arithmetic on
//! the packet, so that every read and write elsewhere is checked against `data_end` in a
//! shape the verifier accepts.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

/// A pointer to a `T` at `offset` bytes into the packet, or `None` if the packet ends first.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    ptr_at_mut(ctx, offset).map(|p| p as *const T)
}

/// Like [`ptr_at`], for writing.
#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Writes `value` at `offset` bytes into the packet, or returns `None` if the packet ends
/// first.
#[inline(always)]
pub fn write<T: Copy>(ctx: &XdpContext, offset: usize, value: T) -> Option<()> {
    let at = ptr_at_mut::<T>(ctx, offset)?;
    // SAFETY: ptr_at_mut checked that the `T` lies inside the packet.
    unsafe { at.write(value) };
    Some(())
}

/// Copies `N` bytes (an even number) within the packet, from offset `from` to offset `to`
/// (both even), 16 bits at a time: the L2 header moves in 7 copies instead of 14.
///
/// Volatile reads on purpose: LLVM turns an ordinary packet-to-packet copy at a variable
/// distance into a call to memmove, whose packet accesses the verifier cannot follow. 16-bit
/// words because the packet's start is 2-byte aligned, as every header struct here assumes
/// (their 16-bit fields); wider words would need more than the program can know.
#[inline(always)]
pub fn copy_within<const N: usize>(ctx: &XdpContext, from: usize, to: usize) -> Option<()> {
    const { assert!(N.is_multiple_of(2)) };
    let src = ptr_at::<[u8; N]>(ctx, from)? as *const u16;
    let dst = ptr_at_mut::<[u8; N]>(ctx, to)? as *mut u16;
    let mut i = 0;
    while i < N / 2 {
        // SAFETY: both ranges of N bytes were checked against the packet's end above; the
        // offsets are even.
        unsafe { *dst.add(i) = core::ptr::read_volatile(src.add(i)) };
        i += 1;
    }
    Some(())
}

/// `x`, which the compiler may no longer reason about. A length check against the IP
/// datagram (itself checked against the frame) lets the compiler prove a later read inside
/// the frame and drop its bounds check, which the verifier cannot do without: an offset
/// passed through here keeps it.
#[inline(always)]
pub fn opaque(x: usize) -> usize {
    // SAFETY: a volatile read of a local.
    unsafe { core::ptr::read_volatile(&x) }
}
