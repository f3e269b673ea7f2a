//! [`TcpRing`]: collectives on CPU tensors over TCP, as a bandwidth-optimal ring.
//!
//! # Wiring
//! Rank `r` connects to `next = (r+1) % W` and accepts from `prev = (r-1+W) % W`. It only ever sends on the
//! first connection and only ever receives on the second. Each link is authenticated both ways with the run
//! secret (`auth`: the acceptor challenges the connector, then the connector challenges the acceptor, each
//! side telling the other its verdict), and the two ends then exchange (rank, world). A process of another
//! run, or a miswired peer, is refused with [`CommError::Setup`] before any tensor data flows. A world of one
//! opens no sockets; its collectives are the identity or local copies.
//!
//! # Algorithms
//! - `all_reduce`: the tensor's flat data is cut into W balanced segments (sizes differ by at most one
//!   element; some are empty when `numel < W`). Reduce-scatter (W-1 steps: in step `t` rank `r` sends
//!   segment `r-t-1` and receives segment `r-t-2`, combining it into its own) leaves segment `r` fully
//!   reduced on rank `r`; all-gather (W-1 steps: send `r-a`, receive `r-a-1`, copied) spreads the finished
//!   segments. Every rank moves `2(W-1)/W` of the tensor each way, whatever W is.
//! - `reduce_scatter` and `all_gather` are those two halves, with equal segments `k` (the trait's chunks).
//! - `broadcast`: one pass around the ring from the root; every rank but the last forwards what it receives.
//! - `barrier`: an all-reduce of W integers, one per segment, so every rank's completion depends on every
//!   rank having entered.
//! - `Avg` is `Sum` followed by a division by W of the finished segment (before it is gathered), `Max`
//!   propagates NaN like `torch.max`. Integers (`Int64`) support `Sum` (wrapping) and `Max`.
//!
//! # Pipelining: one thread, non-blocking sockets, `poll(2)`
//! A collective is laid out as two byte streams: what this rank sends to `next` (a header, then one segment
//! per step) and what it receives from `prev` (a header, then one segment per step, each copied or reduced
//! into place). The segment sent in step `t+1` is the one received in step `t`, so the send stream may run
//! up to the byte that the receive stream has processed: a chunk that arrives is reduced and forwarded at
//! once, without waiting for the rest of its step. The loop sends whatever is allowed (at most [`CHUNK`]
//! bytes per call), receives whatever has arrived (reductions go through a [`CHUNK`]-sized staging buffer
//! that stays in cache; copies land directly in the tensor), and sleeps in `poll` only when both would
//! block. Sending and receiving therefore proceed together, and a message far larger than the kernel's
//! socket buffers cannot deadlock. A persistent sender thread was the alternative; it was not chosen
//! because the tensor's memory is borrowed only for the call (a thread would need raw pointers handed
//! across with a completion handshake on every exit path), and on small machines a second busy thread per
//! rank competes with the reductions for cores. Socket buffer sizes are left to the kernel's autotuning:
//! fixed sizes (256 KiB to 16 MiB) measured no better on loopback and would cap the window on long links.
//!
//! # Deadlines and abort
//! Each call gets `deadline = now + timeout` ([`Communicator::set_timeout`]; initially the `connect`
//! timeout). The loop checks the deadline and the abort flag on every turn, and `poll` never sleeps past the
//! deadline or longer than [`POLL_SLICE`], so a blocked call wakes to notice both. [`AbortHandle::abort`]
//! sets the flag and shuts both sockets down (through `try_clone`d handles); that wakes a pending `poll`
//! here, so the local call fails with [`CommError::Aborted`], and it ends the peers' connections, so their
//! pending calls see end-of-file and fail with [`CommError::PeerLost`] at once instead of at their deadline.
//! Any failure of a collective on the wire (timeout, lost peer, mismatched header) aborts the ring the same
//! way: the byte streams are out of step once a call has given up half-way, so the ring cannot be reused,
//! and closing it makes the failure travel around the ring in milliseconds. After that every call fails
//! immediately with `Aborted`. A call rejected before any I/O (`Invalid`: wrong dtype, device, layout or
//! sizes) leaves the ring as it was.
//!
//! # Framing and determinism
//! Every collective starts with a 32-byte header (operation, dtype, reduce op, sequence number, numel,
//! root). A rank that receives a header unlike its own fails with `Invalid` naming both calls, so ranks that
//! call different collectives, or the same one with different tensors, are told so instead of exchanging
//! garbage. (A broadcast's root only sends, so it cannot see a mismatch itself; its successor does, and the
//! closed ring fails the root's next call.) Segment `j` is accumulated along the fixed path `j+1, j+2, …,
//! j`, so a given world size gives bit-identical results run to run, and the all-gather copies the finished
//! bits to every rank.
//!
//! # Tensors
//! Tensors must be dense, contiguous CPU tensors of dtype `Float`, `Double` or `Int64`; anything else is
//! refused with `Invalid` rather than silently copied (a hidden copy of a non-contiguous gradient would
//! double its memory and hide a layout bug). The data is read and written in place through `data_ptr`.
//!
//! # Layout
//! This file owns the [`TcpRing`] itself and the collectives: the call plan, the framing headers and the
//! non-blocking I/O loop. Connecting the ring and the per-link handshakes live in `setup`.

mod setup;

use super::{AbortHandle, CommError, Communicator, ReduceOp};
use setup::link_up;
use std::io;
use std::mem::size_of;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// The most bytes handed to one `send`/`recv`, and the size of the staging buffer for reductions: large
/// enough to amortise the system calls, small enough to stay in L2 while it is reduced.
pub const CHUNK: usize = 256 << 10;

/// The longest a blocked call sleeps before it looks at its deadline and the abort flag again.
pub const POLL_SLICE: Duration = Duration::from_millis(100);

/// How far away "no deadline" is, for timeouts too large to add to `Instant::now()`.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

#[cfg(target_os = "linux")]
const POLLRDHUP: libc::c_short = libc::POLLRDHUP;
#[cfg(not(target_os = "linux"))]
const POLLRDHUP: libc::c_short = 0;
#[cfg(target_os = "linux")]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(target_os = "linux"))]
const SEND_FLAGS: libc::c_int = 0;

/// A ring of `world` processes over TCP; see the module documentation.
pub struct TcpRing {
    rank: usize,
    world: usize,
    seq: u64,
    timeout: Duration,
    /// The two connections; `None` for a world of one.
    links: Option<Links>,
    abort: AbortHandle,
    /// Clones of the two sockets, shut down by the abort handle. Emptied (closed) when the ring is dropped,
    /// so an abort handle that outlives the ring neither keeps its connections open nor touches other sockets.
    clones: Arc<Mutex<Option<[TcpStream; 2]>>>,
    /// Where received chunks wait to be reduced into place (`u64` so any element type is aligned).
    staging: Vec<u64>,
    /// Where each call publishes its number as it starts, for heartbeats ([`Communicator::watch`]).
    entered: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// The connected sockets (non-blocking): `next` only sends, `prev` only receives.
struct Links {
    next: TcpStream,
    prev: TcpStream,
    next_rank: usize,
    prev_rank: usize,
}

impl TcpRing {
    /// Connects rank `rank` of `world` into the ring: connects to rank `(rank+1) % world` at
    /// `peers[rank+1]` (retrying until it listens) and accepts rank `(rank-1) % world` on `listener` (this
    /// rank's own, already bound, listening at `peers[rank]`). `timeout` bounds the whole set-up and is
    /// each collective's initial deadline.
    ///
    /// # Errors
    /// [`CommError::Setup`] when the arguments disagree, a peer cannot be reached or does not connect in
    /// time (naming its address), a peer fails authentication ("wrong run secret"), or a peer reports
    /// another rank or world size than expected.
    pub fn connect(
        rank: usize,
        world: usize,
        listener: TcpListener,
        peers: &[SocketAddr],
        secret: &[u8],
        timeout: Duration,
    ) -> Result<TcpRing, CommError> {
        if rank >= world {
            return Err(CommError::Setup(format!("rank {rank} is outside a world of {world}")));
        }
        if peers.len() != world {
            return Err(CommError::Setup(format!("{} peer addresses for a world of {world}", peers.len())));
        }
        let links = if world == 1 { None } else { Some(link_up(rank, world, &listener, peers, secret, timeout)?) };
        drop(listener);
        let clones = match &links {
            None => None,
            Some(l) => {
                let clone = |s: &TcpStream| {
                    s.try_clone().map_err(|e| CommError::Setup(format!("rank {rank}: cloning a socket: {e}")))
                };
                Some([clone(&l.next)?, clone(&l.prev)?])
            }
        };
        let clones = Arc::new(Mutex::new(clones));
        let on_abort = {
            let clones = clones.clone();
            Arc::new(move || {
                if let Some(sockets) = lock(&clones).as_ref() {
                    for s in sockets {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                }
            })
        };
        Ok(TcpRing {
            rank,
            world,
            seq: 0,
            timeout,
            staging: if links.is_some() { vec![0; CHUNK / 8] } else { Vec::new() },
            links,
            abort: AbortHandle::new(Arc::new(AtomicBool::new(false)), on_abort),
            clones,
            entered: None,
        })
    }

    /// All `world` ranks of a ring in this process, joined on loopback (each connects on a thread of its
    /// own, as separate processes would): for checks and tests that run a gang in one process.
    ///
    /// # Errors
    /// As [`TcpRing::connect`], or [`CommError::Setup`] when loopback cannot be listened on.
    pub fn on_loopback(world: usize, secret: &[u8], timeout: Duration) -> Result<Vec<TcpRing>, CommError> {
        let listeners = (0..world)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| CommError::Setup(format!("cannot listen on loopback: {e}")))?;
        let addrs = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| CommError::Setup(e.to_string()))?;
        std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let addrs = &addrs;
                    s.spawn(move || TcpRing::connect(rank, world, l, addrs, secret, timeout))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(CommError::Setup("a rank panicked connecting".into()))))
                .collect()
        })
    }

    /// Numbers the call and gives it its deadline; fails at once if the ring was aborted.
    fn begin(&mut self, op: &'static str) -> Result<Call, CommError> {
        let seq = self.seq;
        self.seq += 1;
        if let Some(e) = &self.entered {
            e.store(self.seq, std::sync::atomic::Ordering::Relaxed);
        }
        if self.abort.is_aborted() {
            return Err(CommError::Aborted { op, seq });
        }
        let now = Instant::now();
        let deadline = now.checked_add(self.timeout).unwrap_or(now + FOREVER);
        Ok(Call { op, seq, timeout: self.timeout, deadline })
    }

    /// Ends the ring after a failure on the wire (see the module doc) and returns `err`, or `Aborted` when
    /// the failure was this rank's own abort shutting the sockets.
    fn fail(&self, call: &Call, err: CommError) -> CommError {
        if self.abort.is_aborted() {
            return CommError::Aborted { op: call.op, seq: call.seq };
        }
        self.abort.abort();
        err
    }

    fn lost(&self, call: &Call, peer: usize, reason: String) -> CommError {
        self.fail(call, CommError::PeerLost { op: call.op, seq: call.seq, peer, reason })
    }

    /// All-reduce of `n` elements of `T` at `base` (also the barrier, with `code`).
    fn ring_all_reduce<T: Elem>(
        &mut self,
        call: &Call,
        code: u8,
        base: *mut u8,
        n: usize,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let (w, r, size) = (self.world, self.rank, size_of::<T>());
        let header = header(code, T::KIND, op, call.seq, n, 0);
        // Segment j (mod w) in bytes: (offset, length), balanced to within one element.
        let seg = |j: usize| {
            let (j, q, rem) = (j % w, n / w, n % w);
            ((j * q + j.min(rem)) * size, (q + usize::from(j < rem)) * size)
        };
        let mut out = vec![Outgoing { src: header.as_ptr(), len: header.len(), after: None }];
        let mut inc = vec![Incoming { len: header.len(), sink: Sink::Header }];
        for t in 0..2 * (w - 1) {
            // Reduce-scatter steps, then all-gather steps (`a`); indices are kept non-negative mod w.
            let (send, recv) = if t < w - 1 {
                (r + 2 * w - t - 1, r + 2 * w - t - 2)
            } else {
                (r + 2 * w - (t - (w - 1)), r + 2 * w - (t - (w - 1)) - 1)
            };
            let ((so, sl), (ro, rl)) = (seg(send), seg(recv));
            // Step t forwards what step t-1 received, which is `inc[t]` (inc[0] is the header).
            out.push(Outgoing { src: base.wrapping_add(so), len: sl, after: (t > 0).then_some(t) });
            let dst = base.wrapping_add(ro);
            let sink = if t < w - 1 { Sink::Reduce { dst, last: t == w - 2 } } else { Sink::Copy(dst) };
            inc.push(Incoming { len: rl, sink });
        }
        self.exchange::<T>(call, &header, op, &out, &inc)
    }

    /// Moves the two byte streams of one collective; see "Pipelining" in the module doc.
    ///
    /// `out[i].after = Some(g)` means that segment is the one `inc[g]` receives: byte `b` of it may be sent
    /// once `inc[g]` has processed `b+1` bytes. Pointers in `out` and `inc` must be valid for their lengths
    /// for the whole call, and a byte is never written by `inc` while an `out` segment may still read it (the
    /// gating and the ring's causality guarantee this: a segment is received again only after its bytes have
    /// travelled the ring, which needs this rank to have sent them).
    fn exchange<T: Elem>(
        &mut self,
        call: &Call,
        header: &[u8; HEADER_LEN],
        op: ReduceOp,
        out: &[Outgoing],
        inc: &[Incoming],
    ) -> Result<(), CommError> {
        let staging = self.staging.as_mut_ptr().cast::<u8>();
        let staging_len = self.staging.len() * size_of::<u64>();
        let links = self.links.as_ref().expect("exchange runs only in a world of two or more");
        let (next_fd, prev_fd) = (links.next.as_raw_fd(), links.prev.as_raw_fd());
        let size = size_of::<T>();
        // starts[i]: offset of inc[i] in the whole receive stream.
        let mut starts = vec![0];
        for s in inc {
            starts.push(starts[starts.len() - 1] + s.len);
        }
        let mut theirs = [0u8; HEADER_LEN];
        let (mut oi, mut sent) = (0, 0); // outgoing segment, bytes of it sent
        let (mut ii, mut read, mut done) = (0, 0, 0); // incoming segment, bytes of it read, processed
        loop {
            while oi < out.len() && sent == out[oi].len {
                (oi, sent) = (oi + 1, 0);
            }
            while ii < inc.len() && done == inc[ii].len {
                if matches!(inc[ii].sink, Sink::Header) && theirs != *header {
                    let reason = mismatch(header, &theirs, links.prev_rank);
                    return Err(self.fail(call, CommError::Invalid { op: call.op, seq: call.seq, reason }));
                }
                (ii, read, done) = (ii + 1, 0, 0);
            }
            if oi == out.len() && ii == inc.len() {
                return Ok(());
            }
            if self.abort.is_aborted() {
                return Err(CommError::Aborted { op: call.op, seq: call.seq });
            }
            let now = Instant::now();
            if now >= call.deadline {
                let err = CommError::Timeout { op: call.op, seq: call.seq, timeout: call.timeout };
                return Err(self.fail(call, err));
            }

            let mut progress = false;
            let processed = starts[ii] + done;
            let sendable = out.get(oi).map_or(0, |o| {
                let limit = o.after.map_or(o.len, |g| processed.saturating_sub(starts[g]).min(o.len));
                limit.saturating_sub(sent)
            });
            if sendable > 0 {
                match send_some(next_fd, out[oi].src.wrapping_add(sent), sendable.min(CHUNK)) {
                    Ok(k) => (sent, progress) = (sent + k, true),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(self.lost(call, links.next_rank, format!("sending failed: {e}"))),
                }
            }
            if let Some(seg) = inc.get(ii) {
                let (dst, room) = match seg.sink {
                    Sink::Header => (theirs.as_mut_ptr().wrapping_add(read), seg.len - read),
                    Sink::Copy(dst) => (dst.wrapping_add(read), (seg.len - read).min(CHUNK)),
                    Sink::Reduce { .. } => {
                        let pending = read - done;
                        (staging.wrapping_add(pending), (seg.len - read).min(staging_len - pending))
                    }
                };
                match recv_some(prev_fd, dst, room) {
                    Ok(0) => {
                        let reason = "the connection was closed".to_string();
                        return Err(self.lost(call, links.prev_rank, reason));
                    }
                    Ok(k) => {
                        (read, progress) = (read + k, true);
                        match seg.sink {
                            Sink::Header | Sink::Copy(_) => done = read,
                            Sink::Reduce { dst, last } => {
                                let pending = read - done;
                                let whole = pending / size * size;
                                if whole > 0 {
                                    // SAFETY: `dst + done .. + whole` lies inside this segment of a tensor
                                    // (or scratch buffer) of T that the caller checked is contiguous, on the
                                    // CPU, of T's dtype and at least that long; `done` and `whole` are
                                    // multiples of size_of::<T>() and the base is aligned for T, so the
                                    // slice is aligned. No other reference to these bytes exists while the
                                    // slice lives: sends go through raw pointers, and only over bytes below
                                    // `processed`, which these are not yet.
                                    let acc = unsafe {
                                        std::slice::from_raw_parts_mut(dst.add(done).cast::<T>(), whole / size)
                                    };
                                    // SAFETY: the first `whole` bytes of the staging buffer (u64-aligned, so
                                    // aligned for T) were just filled by `recv`; any bit pattern is a valid
                                    // f32, f64 or i64.
                                    let got = unsafe { std::slice::from_raw_parts(staging.cast::<T>(), whole / size) };
                                    T::combine(op, acc, got);
                                    if last {
                                        T::finish(op, acc, self.world);
                                    }
                                    done += whole;
                                    if pending > whole {
                                        // SAFETY: both ranges lie in the staging buffer; `copy` allows overlap.
                                        unsafe { std::ptr::copy(staging.add(whole), staging, pending - whole) };
                                    }
                                }
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(self.lost(call, links.prev_rank, format!("receiving failed: {e}"))),
                }
            }
            if progress {
                continue;
            }

            // Both sides would block: sleep until one can move, the deadline, or the next slice.
            let mut fds =
                [libc::pollfd { fd: -1, events: 0, revents: 0 }, libc::pollfd { fd: -1, events: 0, revents: 0 }];
            if oi < out.len() {
                // POLLRDHUP: `next` never sends, so end-of-file there means it is gone.
                fds[0] = libc::pollfd {
                    fd: next_fd,
                    events: POLLRDHUP | if sendable > 0 { libc::POLLOUT } else { 0 },
                    revents: 0,
                };
            }
            if ii < inc.len() {
                fds[1] = libc::pollfd { fd: prev_fd, events: libc::POLLIN, revents: 0 };
            }
            let wait = (call.deadline - now).min(POLL_SLICE);
            let ms = wait.as_micros().div_ceil(1000).clamp(1, i32::MAX as u128) as libc::c_int;
            // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(self.lost(call, links.next_rank, format!("poll failed: {e}")));
                }
            } else if fds[0].revents & (libc::POLLERR | libc::POLLHUP | POLLRDHUP) != 0 {
                let reason = "the connection was closed".to_string();
                return Err(self.lost(call, links.next_rank, reason));
            }
        }
    }

    /// Checks `t` and returns its dtype, or why it cannot be used.
    fn check(&self, t: &Tensor, what: &str) -> Result<Kind, String> {
        if !t.defined() {
            return Err(format!("{what} is undefined"));
        }
        if t.device() != Device::Cpu {
            return Err(format!("{what} is on {:?}; the TCP ring moves CPU tensors only", t.device()));
        }
        if t.is_sparse() || t.is_mkldnn() {
            return Err(format!("{what} is not a dense (strided) tensor"));
        }
        if !t.is_contiguous() {
            return Err(format!("{what} is not contiguous (pass `.contiguous()` and copy the result back)"));
        }
        match t.f_kind() {
            Ok(k @ (Kind::Float | Kind::Double | Kind::Int64)) => Ok(k),
            Ok(k) => Err(format!("{what} has dtype {k:?}; the TCP ring handles Float, Double and Int64")),
            Err(e) => Err(format!("{what} has an unknown dtype: {e}")),
        }
    }
}

/// Combines `op` with a dtype, or says why they do not go together.
fn supports(kind: Kind, op: ReduceOp) -> Result<Kind, String> {
    if kind == Kind::Int64 && op == ReduceOp::Avg {
        return Err("Avg of Int64 tensors is not supported (integer division would truncate)".into());
    }
    Ok(kind)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for TcpRing {
    fn drop(&mut self) {
        lock(&self.clones).take();
    }
}

/// One collective in flight.
struct Call {
    op: &'static str,
    seq: u64,
    timeout: Duration,
    deadline: Instant,
}

impl Call {
    fn invalid(&self, reason: String) -> CommError {
        CommError::Invalid { op: self.op, seq: self.seq, reason }
    }
}

/// A stretch of the send stream: `len` bytes at `src`, gated on `inc[after]` when set.
struct Outgoing {
    src: *const u8,
    len: usize,
    after: Option<usize>,
}

/// A stretch of the receive stream and where it goes.
struct Incoming {
    len: usize,
    sink: Sink,
}

#[derive(Clone, Copy)]
enum Sink {
    /// The peer's header, checked against ours.
    Header,
    /// Copied to the address.
    Copy(*mut u8),
    /// Combined into the elements at the address; `last` marks the final reduce-scatter step, where `Avg`
    /// divides by the world size.
    Reduce { dst: *mut u8, last: bool },
}

/// The element types the ring reduces.
trait Elem: Copy + Default + 'static {
    const KIND: Kind;
    /// `acc[i] = op(acc[i], got[i])`, in a fixed order per element.
    fn combine(op: ReduceOp, acc: &mut [Self], got: &[Self]);
    /// Finishes a fully reduced segment (`Avg`: divide by the world size).
    fn finish(op: ReduceOp, acc: &mut [Self], world: usize);
}

macro_rules! float_elem {
    ($t:ty, $kind:expr) => {
        impl Elem for $t {
            const KIND: Kind = $kind;
            fn combine(op: ReduceOp, acc: &mut [Self], got: &[Self]) {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => acc.iter_mut().zip(got).for_each(|(a, b)| *a += *b),
                    ReduceOp::Max => acc.iter_mut().zip(got).for_each(|(a, b)| {
                        if *b > *a || b.is_nan() {
                            *a = *b
                        }
                    }),
                }
            }
            fn finish(op: ReduceOp, acc: &mut [Self], world: usize) {
                if op == ReduceOp::Avg {
                    let w = world as $t;
                    acc.iter_mut().for_each(|a| *a /= w);
                }
            }
        }
    };
}
float_elem!(f32, Kind::Float);
float_elem!(f64, Kind::Double);

impl Elem for i64 {
    const KIND: Kind = Kind::Int64;
    fn combine(op: ReduceOp, acc: &mut [Self], got: &[Self]) {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => acc.iter_mut().zip(got).for_each(|(a, b)| *a = a.wrapping_add(*b)),
            ReduceOp::Max => acc.iter_mut().zip(got).for_each(|(a, b)| *a = (*a).max(*b)),
        }
    }
    fn finish(_op: ReduceOp, _acc: &mut [Self], _world: usize) {}
}

/// Runs `$body` with `$t` bound to the Rust type of `$kind` (checked to be one of the three).
macro_rules! with_elem {
    ($kind:expr, $t:ident => $body:expr) => {
        match $kind {
            Kind::Float => {
                type $t = f32;
                $body
            }
            Kind::Double => {
                type $t = f64;
                $body
            }
            _ => {
                type $t = i64;
                $body
            }
        }
    };
}

impl Communicator for TcpRing {
    fn overlaps_compute(&self) -> bool {
        true
    }

    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }
    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
    fn sever(&mut self) {
        if let Some(sockets) = lock(&self.clones).as_ref() {
            for s in sockets {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
    fn watch(&mut self, entered: Arc<std::sync::atomic::AtomicU64>) {
        self.entered = Some(entered);
    }

    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        let call = self.begin("all_reduce")?;
        let kind = self.check(t, "the tensor").and_then(|k| supports(k, op)).map_err(|e| call.invalid(e))?;
        if self.world == 1 {
            return Ok(());
        }
        let (base, n) = (t.data_ptr().cast::<u8>(), t.numel());
        with_elem!(kind, T => self.ring_all_reduce::<T>(&call, OP_ALL_REDUCE, base, n, op))
    }

    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        let call = self.begin("reduce_scatter")?;
        let (kind, k) = self.check_pair(input, output, op).map_err(|e| call.invalid(e))?;
        let (w, r) = (self.world, self.rank);
        with_elem!(kind, T => {
            // The reduction works in a scratch copy: `input` is not ours to overwrite.
            let mut scratch = vec![T::default(); w * k];
            if k > 0 {
                // SAFETY: `input` is a contiguous CPU tensor of T with w·k elements (checked); `scratch`
                // holds w·k elements and is a separate allocation.
                unsafe { std::ptr::copy_nonoverlapping(input.data_ptr().cast::<T>(), scratch.as_mut_ptr(), w * k) };
            }
            if w > 1 {
                let base = scratch.as_mut_ptr().cast::<u8>();
                let header = header(OP_REDUCE_SCATTER, kind, op, call.seq, w * k, 0);
                let seg = k * size_of::<T>();
                let mut out = vec![Outgoing { src: header.as_ptr(), len: HEADER_LEN, after: None }];
                let mut inc = vec![Incoming { len: HEADER_LEN, sink: Sink::Header }];
                for t in 0..w - 1 {
                    let (send, recv) = ((r + 2 * w - t - 1) % w, (r + 2 * w - t - 2) % w);
                    out.push(Outgoing { src: base.wrapping_add(send * seg), len: seg, after: (t > 0).then_some(t) });
                    let sink = Sink::Reduce { dst: base.wrapping_add(recv * seg), last: t == w - 2 };
                    inc.push(Incoming { len: seg, sink });
                }
                self.exchange::<T>(&call, &header, op, &out, &inc)?;
            }
            if k > 0 {
                // SAFETY: `output` is a contiguous CPU tensor of T with k elements (checked); the source is
                // chunk r of `scratch`, a separate allocation.
                unsafe { std::ptr::copy_nonoverlapping(scratch.as_ptr().add(r * k), output.data_ptr().cast::<T>(), k) };
            }
            Ok(())
        })
    }

    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        let call = self.begin("all_gather")?;
        let (kind, k) = self.check_pair(output, input, ReduceOp::Sum).map_err(|e| call.invalid(e))?;
        let (w, r) = (self.world, self.rank);
        let size = with_elem!(kind, T => size_of::<T>());
        let (base, seg) = (output.data_ptr().cast::<u8>(), k * size);
        if k > 0 {
            // SAFETY: `input` has k elements and `output` w·k of the same dtype, both contiguous on the CPU
            // (checked); `copy` is a memmove, so `input` may be a view of chunk r of `output`.
            unsafe { std::ptr::copy(input.data_ptr().cast::<u8>(), base.add(r * seg), seg) };
        }
        if w == 1 {
            return Ok(());
        }
        let header = header(OP_ALL_GATHER, kind, ReduceOp::Sum, call.seq, w * k, 0);
        let mut out = vec![Outgoing { src: header.as_ptr(), len: HEADER_LEN, after: None }];
        let mut inc = vec![Incoming { len: HEADER_LEN, sink: Sink::Header }];
        for a in 0..w - 1 {
            let (send, recv) = ((r + w - a) % w, (r + 2 * w - a - 1) % w);
            out.push(Outgoing { src: base.wrapping_add(send * seg), len: seg, after: (a > 0).then_some(a) });
            inc.push(Incoming { len: seg, sink: Sink::Copy(base.wrapping_add(recv * seg)) });
        }
        with_elem!(kind, T => self.exchange::<T>(&call, &header, ReduceOp::Sum, &out, &inc))
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
        let call = self.begin("broadcast")?;
        let kind = self.check(t, "the tensor").map_err(|e| call.invalid(e))?;
        let w = self.world;
        if root >= w {
            return Err(call.invalid(format!("root {root} is outside a world of {w}")));
        }
        if w == 1 {
            return Ok(());
        }
        let size = with_elem!(kind, T => size_of::<T>());
        let (base, len) = (t.data_ptr().cast::<u8>(), t.numel() * size);
        let header = header(OP_BROADCAST, kind, ReduceOp::Sum, call.seq, t.numel(), root);
        // Position along the pass: the root is 0, its successor 1, …; the last one does not forward.
        let pos = (self.rank + w - root) % w;
        let mut out = vec![];
        let mut inc = vec![];
        if pos != 0 {
            inc.push(Incoming { len: HEADER_LEN, sink: Sink::Header });
            inc.push(Incoming { len, sink: Sink::Copy(base) });
        }
        if pos != w - 1 {
            out.push(Outgoing { src: header.as_ptr(), len: HEADER_LEN, after: None });
            out.push(Outgoing { src: base, len, after: (pos != 0).then_some(1) });
        }
        with_elem!(kind, T => self.exchange::<T>(&call, &header, ReduceOp::Sum, &out, &inc))
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        let call = self.begin("barrier")?;
        if self.world == 1 {
            return Ok(());
        }
        let mut token = vec![0i64; self.world];
        let base = token.as_mut_ptr().cast::<u8>();
        self.ring_all_reduce::<i64>(&call, OP_BARRIER, base, token.len(), ReduceOp::Max)
    }
}

impl TcpRing {
    /// Checks a (`big`: W·k elements, `small`: k elements) pair of the same dtype; returns (dtype, k).
    fn check_pair(&self, big: &Tensor, small: &Tensor, op: ReduceOp) -> Result<(Kind, usize), String> {
        let kind = self.check(big, "the W·k tensor").and_then(|k| supports(k, op))?;
        let small_kind = self.check(small, "the k tensor")?;
        if small_kind != kind {
            return Err(format!("dtypes differ: {kind:?} and {small_kind:?}"));
        }
        let (n, k) = (big.numel(), small.numel());
        if n != self.world * k {
            return Err(format!("{n} elements are not world ({}) × {k}", self.world));
        }
        Ok((kind, k))
    }
}

// ---- Framing ----

const HEADER_LEN: usize = 32;
const MAGIC: &[u8; 4] = b"TSRG";
const OP_ALL_REDUCE: u8 = 1;
const OP_REDUCE_SCATTER: u8 = 2;
const OP_ALL_GATHER: u8 = 3;
const OP_BROADCAST: u8 = 4;
const OP_BARRIER: u8 = 5;

/// The header every collective starts with: magic, operation, dtype, reduce op, seq, numel, root.
fn header(code: u8, kind: Kind, op: ReduceOp, seq: u64, numel: usize, root: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4] = code;
    h[5] = match kind {
        Kind::Float => 1,
        Kind::Double => 2,
        _ => 3,
    };
    h[6] = match op {
        ReduceOp::Sum => 1,
        ReduceOp::Avg => 2,
        ReduceOp::Max => 3,
    };
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&(numel as u64).to_le_bytes());
    h[24..32].copy_from_slice(&(root as u64).to_le_bytes());
    h
}

/// Describes a header for an error message.
fn describe(h: &[u8; HEADER_LEN]) -> String {
    if &h[..4] != MAGIC {
        return format!("unrecognised bytes {:02x?}", &h[..8]);
    }
    let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    let op = ["?", "all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier"].get(h[4] as usize);
    let dtype = ["?", "Float", "Double", "Int64"].get(h[5] as usize);
    let reduce = ["?", "Sum", "Avg", "Max"].get(h[6] as usize);
    let mut s = format!("#{} ({}) of {} {} elements", word(8), op.unwrap_or(&"?"), word(16), dtype.unwrap_or(&"?"));
    match h[4] {
        OP_ALL_REDUCE | OP_REDUCE_SCATTER => s += &format!(" with {}", reduce.unwrap_or(&"?")),
        OP_BROADCAST => s += &format!(" from root {}", word(24)),
        _ => {}
    }
    s
}

fn mismatch(ours: &[u8; HEADER_LEN], theirs: &[u8; HEADER_LEN], peer: usize) -> String {
    format!(
        "rank {peer} called collective {} while this rank called {}; all ranks must call the same collectives \
         in the same order with matching tensors",
        describe(theirs),
        describe(ours)
    )
}

// ---- Non-blocking socket I/O ----

/// One non-blocking `send` of up to `len` bytes at `src`; `WouldBlock` when the socket buffer is full.
fn send_some(fd: RawFd, src: *const u8, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: the caller's plan guarantees `src .. src+len` is readable for the call.
        let k = unsafe { libc::send(fd, src.cast(), len, SEND_FLAGS | libc::MSG_DONTWAIT) };
        if k >= 0 {
            return Ok(k as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One non-blocking `recv` of up to `len` bytes into `dst`; `Ok(0)` is end-of-file.
fn recv_some(fd: RawFd, dst: *mut u8, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: the caller's plan guarantees `dst .. dst+len` is writable and not read meanwhile.
        let k = unsafe { libc::recv(fd, dst.cast(), len, libc::MSG_DONTWAIT) };
        if k >= 0 {
            return Ok(k as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits up to `wait` for `fd` to become readable (or fail).
fn wait_readable(fd: RawFd, wait: Duration) {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = wait.as_micros().div_ceil(1000).clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) };
}
