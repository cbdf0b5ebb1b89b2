//! The NCCL backend: collectives on CUDA tensors, queued on the context's
//! [`StreamKind::Comm`] stream.
//!
//! Joining: rank 0 makes NCCL's unique id and publishes it in the
//! [`TcpStore`] at `MASTER_ADDR:MASTER_PORT` (key `nccl/unique_id`); the
//! others read it; every rank meets at the store's barrier (so a missing
//! rank is an error naming the store, within the rendezvous timeout) and
//! then calls `ncclCommInitRank` on the context's GPU. A world of one needs
//! no store. NCCL is loaded at run time (`libnccl.so` on the library path).
//!
//! A collective does not block the host: the comm stream waits for the
//! compute work queued so far, the NCCL call is queued there, its tensors
//! are marked as used on the comm stream (so freeing them orders their
//! reuse after it), and the compute stream waits for the comm stream, so
//! the result is ordered like any op's. [`ProcessGroup::all_gather_start`]
//! leaves out that last wait and returns a [`Pending`] on the comm stream.
//! Work the caller queued on other streams (copy, stash) must be ordered
//! before the compute stream's first.
//!
//! Timeouts: NCCL calls return before the data moves, so a watchdog thread
//! checks each issued collective's completion event and
//! `ncclCommGetAsyncError`. When a collective has not completed
//! `cfg.timeout` after it was issued, or NCCL reports an error, the
//! watchdog prints why, marks the group poisoned ([`NcclGroup::poisoned`])
//! and aborts the communicator (`ncclCommAbort`; the peers' collectives
//! then fail too). Every later call fails with [`Error::Broken`] naming the
//! collective, its number and the timeout. [`NcclGroup::synchronize`] and
//! `barrier` block until the issued collectives are done, or fail the same
//! way. As with the CPU backend, a collective that fails on this rank (a
//! bad argument, an NCCL error) breaks a group of more than one process
//! and aborts the communicator, so the peers do not wait for their timeout.
//!
//! Differences from the CPU backend:
//! - bf16 and f16 sums are NCCL's: each step of its ring (or tree) rounds
//!   to the dtype, where the CPU backend accumulates in f32 and rounds once.
//!   The bits agree at a world of one or two (one addition, rounded once);
//!   from three ranks on they may differ in the last place. f32 sums of
//!   three or more ranks may be added in another order. Every rank still
//!   gets the same bits.
//! - NCCL does not check that the ranks pass the same sizes or call the
//!   same collectives; a mismatch hangs until the timeout (or worse).
//! - `all_gather` may work in place (the input is the output's slot
//!   `rank()`), and `reduce_scatter_sum` too (the output is the input's slot
//!   `rank()`); any other overlap is an error.
use std::collections::VecDeque;
use std::ffi::{c_void, CStr};
use std::os::raw::c_char;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent};
use cudarc::nccl::{result as nc, sys};
use llmft_tensor::cuda::CudaCtx;
use llmft_tensor::{Ctx, DType, Device, StreamKind, Tensor};

use crate::group::{Backend, GroupConfig, Pending, ProcessGroup};
use crate::{secs, Error, Result, TcpStore, WorldInfo};

const ID_KEY: &str = "nccl/unique_id";
/// `ncclGetLastError` came with 2.13; bf16 sums with 2.10.
const MIN_VERSION: i32 = 2_13_00;
/// How long the watchdog waits for a collective being issued on another
/// thread to return before it aborts the communicator anyway (to unblock it).
const ISSUE_GRACE: Duration = Duration::from_secs(2);
const MAX_POLL: Duration = Duration::from_millis(50);
/// The exit status of a process the watchdog ends
/// ([`GroupConfig::exit_after_abort`]): sysexits' EX_SOFTWARE.
pub const WATCHDOG_EXIT_STATUS: i32 = 70;
const MIN_POLL: Duration = Duration::from_millis(1);

/// An NCCL communicator handle.
struct Comm(sys::ncclComm_t);

// SAFETY: a communicator may be used from any thread. The calls that need
// one caller at a time are serialized by `Shared::issue`, and the handle is
// released only once (`State::aborted`) after every user is done with it.
unsafe impl Send for Comm {}
// SAFETY: as for Send.
unsafe impl Sync for Comm {}

/// A collective issued and not yet seen complete.
struct Work {
    op: &'static str,
    seq: u64,
    what: String,
    issued: Instant,
    done: Arc<CudaEvent>,
}

/// What the issuing threads and the watchdog share, under `Shared::state`.
struct State {
    /// Issued collectives, oldest first.
    pending: VecDeque<Work>,
    /// Why the group is unusable.
    poisoned: Option<String>,
    /// The communicator has been aborted or destroyed.
    released: bool,
    /// Collectives issued so far.
    seq: u64,
}

struct Shared {
    rank: usize,
    timeout: Duration,
    comm: Comm,
    /// Held while an NCCL call on `comm` is made. Lock order: `issue`, then
    /// `state`.
    issue: Mutex<()>,
    state: Mutex<State>,
    stop: AtomicBool,
    /// [`GroupConfig::exit_after_abort`].
    exit_after_abort: Option<Duration>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A NUL-terminated string NCCL returned, or "" for null.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that outlives the call.
unsafe fn text(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// NCCL's words for `code`, with its last error message when it has one.
fn describe(code: sys::ncclResult_t, comm: sys::ncclComm_t) -> String {
    // SAFETY: NCCL returns static strings (or its thread's last message);
    // ncclGetLastError accepts any communicator handle, null included.
    let (name, last) = unsafe {
        (
            text(sys::ncclGetErrorString(code)),
            text(sys::ncclGetLastError(comm)),
        )
    };
    if last.is_empty() {
        format!("{name} ({code:?})")
    } else {
        format!("{name} ({code:?}): {last}")
    }
}

fn nccl_err(
    op: &'static str,
    call: &'static str,
    comm: sys::ncclComm_t,
    e: nc::NcclError,
) -> Error {
    Error::Nccl {
        op,
        msg: format!("{call} failed: {}", describe(e.0, comm)),
    }
}

fn cuda_err(op: &'static str, call: &'static str, e: impl std::fmt::Debug) -> Error {
    Error::Nccl {
        op,
        msg: format!("{call} failed: {e:?}"),
    }
}

/// Checks that NCCL can be loaded and is new enough.
fn load_library() -> Result<()> {
    // SAFETY: only tries to open the library by the names cudarc knows.
    if !unsafe { sys::is_culib_present() } {
        let names = cudarc::get_lib_name_candidates("nccl");
        return Err(Error::Nccl {
            op: "connect",
            msg: format!(
                "cannot load the NCCL library: none of {} is on the library path; put the \
                 folder holding libnccl.so on LD_LIBRARY_PATH (where only libnccl.so.2 exists, \
                 as NVIDIA's libnccl2 package and pip's nvidia-nccl-cu* ship it, make \
                 libnccl.so a link to it there)",
                names.join(", ")
            ),
        });
    }
    let v = nc::get_nccl_version()
        .map_err(|e| nccl_err("connect", "ncclGetVersion", std::ptr::null_mut(), e))?;
    if v < MIN_VERSION {
        return Err(Error::Nccl {
            op: "connect",
            msg: format!(
                "NCCL {}.{}.{} is too old; the NCCL backend needs 2.13 or newer",
                v / 10000,
                v % 10000 / 100,
                v % 100
            ),
        });
    }
    Ok(())
}

impl Shared {
    /// Marks the group unusable for `reason` and aborts the communicator.
    /// The caller of a collective holds `issue` already; the watchdog waits
    /// up to [`ISSUE_GRACE`] for a collective being issued to return.
    fn fail(&self, reason: String, holding_issue: bool) {
        {
            let mut st = lock(&self.state);
            if st.poisoned.is_some() {
                return;
            }
            st.poisoned = Some(reason);
        }
        let _issue = if holding_issue {
            None
        } else {
            let deadline = Instant::now() + ISSUE_GRACE;
            loop {
                match self.issue.try_lock() {
                    Ok(g) => break Some(g),
                    Err(TryLockError::Poisoned(p)) => break Some(p.into_inner()),
                    Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                        std::thread::sleep(MIN_POLL)
                    }
                    // A thread is stuck inside NCCL: the abort unblocks it.
                    Err(TryLockError::WouldBlock) => break None,
                }
            }
        };
        self.release(false);
    }

    /// Aborts (or, when `clean`, destroys) the communicator, once.
    fn release(&self, clean: bool) {
        let mut st = lock(&self.state);
        if st.released {
            return;
        }
        st.released = true;
        st.pending.clear();
        // SAFETY: the handle is live (released only here, once); no NCCL
        // call is being issued unless one is stuck (see `fail`), which
        // ncclCommAbort is documented to unblock.
        let _ = unsafe {
            if clean {
                nc::comm_destroy(self.comm.0)
            } else {
                nc::comm_abort(self.comm.0)
            }
        };
    }

    /// What the watchdog sees wrong now, if anything; drops the collectives
    /// that have completed.
    fn check(&self) -> Option<String> {
        let mut st = lock(&self.state);
        if st.poisoned.is_some() || st.released {
            return None;
        }
        let mut async_err = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the handle is live (not released, under the state lock).
        let got = unsafe { sys::ncclCommGetAsyncError(self.comm.0, &mut async_err) };
        let r = self.rank;
        if got != sys::ncclResult_t::ncclSuccess {
            return Some(format!(
                "rank {r}: ncclCommGetAsyncError failed: {}",
                describe(got, self.comm.0)
            ));
        }
        if !matches!(
            async_err,
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
        ) {
            let last = st
                .pending
                .front()
                .map(|w| format!(" (during {} #{}, {})", w.op, w.seq, w.what))
                .unwrap_or_default();
            return Some(format!(
                "rank {r}: NCCL reported an asynchronous error{last}: {}",
                describe(async_err, self.comm.0)
            ));
        }
        while let Some(w) = st.pending.front() {
            match w.done.try_is_complete() {
                Ok(true) => {
                    st.pending.pop_front();
                }
                Ok(false) if w.issued.elapsed() > self.timeout => {
                    return Some(format!(
                        "rank {r}: NCCL {} #{} ({}) did not complete within {} s; the \
                         communicator was aborted",
                        w.op,
                        w.seq,
                        w.what,
                        secs(&self.timeout)
                    ));
                }
                Ok(false) => break,
                Err(e) => {
                    return Some(format!(
                        "rank {r}: NCCL {} #{} ({}) failed on the GPU: {e:?}",
                        w.op, w.seq, w.what
                    ))
                }
            }
        }
        None
    }

    /// The watchdog's loop: runs until `stop` or the first failure.
    fn watch(self: &Arc<Self>, context: &CudaContext) {
        let _ = context.bind_to_thread();
        let poll = (self.timeout / 4).clamp(MIN_POLL, MAX_POLL);
        while !self.stop.load(Ordering::Acquire) {
            std::thread::park_timeout(poll);
            if let Some(reason) = self.check() {
                eprintln!("llmft-shard: {reason}");
                // Before the abort, which may itself block behind the stuck call.
                if let Some(after) = self.exit_after_abort {
                    self.end_process_after(after);
                }
                self.fail(reason, false);
                return;
            }
        }
    }

    /// Ends the process `after` from now unless the group is dropped first
    /// (a thread of its own: see [`GroupConfig::exit_after_abort`]).
    fn end_process_after(self: &Arc<Self>, after: Duration) {
        let s = self.clone();
        let reaper = move || {
            let until = Instant::now() + after;
            while !s.stop.load(Ordering::Acquire) {
                let now = Instant::now();
                if now >= until {
                    eprintln!(
                        "llmft-shard: rank {}: the process group was not closed within {} s of \
                         the abort (a CUDA or NCCL call it could not unblock); ending the \
                         process with status {WATCHDOG_EXIT_STATUS}",
                        s.rank,
                        secs(&after)
                    );
                    // SAFETY: _exit ends the process at once, without the
                    // exit handlers (CUDA's teardown would wait for the stuck
                    // stream).
                    unsafe { libc::_exit(WATCHDOG_EXIT_STATUS) }
                }
                std::thread::sleep(MAX_POLL.min(until - now));
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("llmft-nccl-exit".into())
            .spawn(reaper)
        {
            eprintln!(
                "llmft-shard: rank {}: cannot start the exit timer: {e}",
                self.rank
            );
        }
    }
}

/// The NCCL process group of one rank (see the module docs).
pub struct NcclGroup {
    rank: usize,
    world_size: usize,
    device: Device,
    context: Arc<CudaContext>,
    shared: Arc<Shared>,
    watchdog: Option<JoinHandle<()>>,
    /// Kept for the group's life: in rank 0 it is the store's server.
    _store: Option<TcpStore>,
}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclGroup(rank {} of {}, {})",
            self.rank, self.world_size, self.device
        )
    }
}

impl NcclGroup {
    /// Joins the group on `ctx`'s GPU (the caller makes `ctx` on
    /// `cuda:LOCAL_RANK`, or on the one device `CUDA_VISIBLE_DEVICES`
    /// leaves): rendezvous through the [`TcpStore`] at
    /// `MASTER_ADDR:MASTER_PORT` to hand out NCCL's unique id (a world of
    /// one needs none), then `ncclCommInitRank`. Fails with a clear error
    /// for a CPU context or where NCCL cannot be loaded.
    pub fn connect(world: &WorldInfo, ctx: &Ctx, cfg: &GroupConfig) -> Result<Self> {
        let op = "connect";
        let (rank, w) = (world.rank, world.world_size);
        let cu = ctx.cuda_ctx().ok_or_else(|| Error::Nccl {
            op,
            msg: format!(
                "the NCCL backend needs a CUDA context (rank {rank}: Ctx::cuda({})), but this \
                 one is the CPU",
                world.local_rank
            ),
        })?;
        load_library()?;
        let nranks = i32::try_from(w).map_err(|_| Error::Invalid {
            op,
            msg: format!("a world of {w} is too large for NCCL"),
        })?;
        cu.context()
            .bind_to_thread()
            .map_err(|e| cuda_err(op, "cuCtxSetCurrent", e))?;
        let null = std::ptr::null_mut();
        let (id, store) = if w == 1 {
            let id = nc::get_uniqueid().map_err(|e| nccl_err(op, "ncclGetUniqueId", null, e))?;
            (id, None)
        } else {
            let (id, store) = rendezvous(world, cfg)?;
            (id, Some(store))
        };
        let mut comm: sys::ncclComm_t = null;
        // SAFETY: `comm` is a valid out-pointer; the id is the group's.
        unsafe { nc::comm_init_rank(&mut comm, nranks, id, rank as i32) }
            .map_err(|e| nccl_err(op, "ncclCommInitRank", null, e))?;
        let shared = Arc::new(Shared {
            rank,
            timeout: cfg.timeout,
            comm: Comm(comm),
            issue: Mutex::new(()),
            state: Mutex::new(State {
                pending: VecDeque::new(),
                poisoned: None,
                released: false,
                seq: 0,
            }),
            stop: AtomicBool::new(false),
            exit_after_abort: cfg.exit_after_abort,
        });
        let (s, context) = (shared.clone(), cu.context().clone());
        let watchdog = std::thread::Builder::new()
            .name("llmft-nccl-watchdog".into())
            .spawn(move || s.watch(&context));
        let watchdog = match watchdog {
            Ok(h) => h,
            Err(e) => {
                shared.release(false);
                return Err(Error::Nccl {
                    op,
                    msg: format!("cannot start the watchdog thread: {e}"),
                });
            }
        };
        Ok(Self {
            rank,
            world_size: w,
            device: cu.device(),
            context: cu.context().clone(),
            shared,
            watchdog: Some(watchdog),
            _store: store,
        })
    }

    /// The GPU the group works on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Why the group is unusable (a collective timed out or failed), or
    /// `None` while it works. A process that sees `Some` should end,
    /// printing the reason: the communicator is gone.
    pub fn poisoned(&self) -> Option<String> {
        lock(&self.shared.state).poisoned.clone()
    }

    /// Blocks until every collective issued so far has completed, or fails
    /// with [`Error::Broken`] once the group is poisoned (the watchdog
    /// bounds the wait by the timeout).
    pub fn synchronize(&self) -> Result<()> {
        let op = "synchronize";
        self.usable()?;
        let last = lock(&self.shared.state)
            .pending
            .back()
            .map(|w| w.done.clone());
        if let Some(last) = last {
            self.context
                .bind_to_thread()
                .map_err(|e| cuda_err(op, "cuCtxSetCurrent", e))?;
            let mut nap = Duration::from_micros(20);
            while !last
                .try_is_complete()
                .map_err(|e| cuda_err(op, "cuEventQuery", e))?
            {
                self.usable()?;
                std::thread::sleep(nap);
                nap = (nap * 2).min(MIN_POLL);
            }
        }
        // A collective the watchdog aborted completes too, with garbage.
        self.usable()
    }

    fn usable(&self) -> Result<()> {
        match self.poisoned() {
            Some(reason) => Err(Error::Broken { reason }),
            None => Ok(()),
        }
    }

    /// Runs collective `op`: `f` checks the arguments and issues it through
    /// the [`Issue`] it gets. A failure breaks a group of more than one.
    fn run(
        &self,
        op: &'static str,
        ctx: &Ctx,
        f: impl FnOnce(&Issue<'_>) -> Result<()>,
    ) -> Result<()> {
        let _issue = lock(&self.shared.issue);
        self.usable()?;
        let r = self.cuda(op, ctx).and_then(|cu| {
            f(&Issue {
                group: self,
                op,
                ctx,
                cu,
            })
        });
        if let Err(e) = &r {
            if self.world_size > 1 {
                self.shared.fail(format!("rank {}: {e}", self.rank), true);
            }
        }
        r
    }

    /// The CUDA part of `ctx`, which must be on the group's GPU.
    fn cuda<'c>(&self, op: &'static str, ctx: &'c Ctx) -> Result<&'c CudaCtx> {
        ctx.cuda_ctx()
            .filter(|c| c.device() == self.device)
            .ok_or_else(|| Error::Invalid {
                op,
                msg: format!(
                    "the context is {}, but the NCCL group works on {}",
                    ctx.device(),
                    self.device
                ),
            })
    }

    /// Checks that `t` is a CUDA tensor of the group's GPU.
    fn on_gpu(&self, op: &'static str, what: &'static str, t: &Tensor) -> Result<()> {
        if t.device() == self.device {
            Ok(())
        } else {
            Err(Error::Invalid {
                op,
                msg: format!(
                    "the NCCL process group needs tensors on {}, but {what} lives on {}",
                    self.device,
                    t.device()
                ),
            })
        }
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        // Let the issued collectives finish (the watchdog still bounds the
        // wait), then free the communicator: destroyed when all is done,
        // else aborted.
        let clean = self.synchronize().is_ok();
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.watchdog.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        let _ = self.context.bind_to_thread();
        self.shared.release(clean);
    }
}

/// One collective being issued (under `Shared::issue`).
struct Issue<'a> {
    group: &'a NcclGroup,
    op: &'static str,
    ctx: &'a Ctx,
    cu: &'a CudaCtx,
}

impl Issue<'_> {
    /// Queues `nccl` (which calls NCCL function `call` on the communicator
    /// and the comm stream) after the compute work queued so far, marks
    /// `tensors` as used on the comm stream and hands the collective to the
    /// watchdog. Nothing is called for `empty` collectives.
    fn launch(
        &self,
        call: &'static str,
        what: String,
        tensors: &[&Tensor],
        empty: bool,
        nccl: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<nc::NcclStatus, nc::NcclError>,
    ) -> Result<()> {
        let (op, sh) = (self.op, &self.group.shared);
        self.ctx.wait_for(StreamKind::Comm, StreamKind::Compute)?;
        if empty {
            return Ok(());
        }
        self.cu
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err(op, "cuCtxSetCurrent", e))?;
        let stream = self.cu.stream(StreamKind::Comm);
        nccl(sh.comm.0, stream.cu_stream() as sys::cudaStream_t)
            .map_err(|e| nccl_err(op, call, sh.comm.0, e))?;
        for t in tensors {
            t.record_use(self.ctx, StreamKind::Comm);
        }
        let done = Arc::new(
            stream
                .record_event(None)
                .map_err(|e| cuda_err(op, "cuEventRecord", e))?,
        );
        let mut st = lock(&sh.state);
        st.seq += 1;
        let seq = st.seq;
        st.pending.push_back(Work {
            op,
            seq,
            what,
            issued: Instant::now(),
            done,
        });
        Ok(())
    }

    /// Makes the compute stream wait for the collective.
    fn then_compute(&self) -> Result<()> {
        Ok(self.ctx.wait_for(StreamKind::Compute, StreamKind::Comm)?)
    }
}

/// The NCCL type of a sum over `t`.
fn sum_type(op: &'static str, what: &'static str, t: &Tensor) -> Result<sys::ncclDataType_t> {
    crate::group::check_float(op, what, t)?;
    Ok(match t.dtype() {
        DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
        DType::F16 => sys::ncclDataType_t::ncclFloat16,
        _ => sys::ncclDataType_t::ncclFloat32,
    })
}

/// Checks that `output` has the dtype of `input` and `world` times its
/// elements (for reduce-scatter, the other way round), and that where they
/// overlap the small one is the big one's slot `rank` (NCCL's in place).
fn scaled(
    op: &'static str,
    input: &Tensor,
    output: &Tensor,
    world: usize,
    rank: usize,
) -> Result<()> {
    crate::group::check_scaled(op, input, output, world)?;
    let (big, small, big_name, small_name) = match op {
        "reduce_scatter" => (input, output, "input", "output"),
        _ => (output, input, "output", "input"),
    };
    let (s, b) = (small.device_ptr()?, big.device_ptr()?);
    let (sn, bn) = (small.bytes() as u64, big.bytes() as u64);
    let overlap = sn > 0 && s < b + bn && b < s + sn;
    if overlap && s != b + rank as u64 * sn {
        return Err(Error::Invalid {
            op,
            msg: format!(
                "{small_name} overlaps {big_name} other than as its slot {rank}; NCCL works in \
                 place only there"
            ),
        });
    }
    Ok(())
}

fn ptr(t: &Tensor) -> Result<*const c_void> {
    Ok(t.device_ptr()? as *const c_void)
}

fn ptr_mut(t: &Tensor) -> Result<*mut c_void> {
    Ok(t.device_ptr()? as *mut c_void)
}

impl ProcessGroup for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn backend(&self) -> Backend {
        Backend::Nccl
    }

    fn all_reduce_sum(&self, ctx: &Ctx, t: &mut Tensor) -> Result<()> {
        let op = "all_reduce";
        self.run(op, ctx, |is| {
            self.on_gpu(op, "tensor", t)?;
            let dt = sum_type(op, "tensor", t)?;
            let (n, p) = (t.numel(), ptr_mut(t)?);
            let what = format!("{n} x {}", t.dtype());
            // SAFETY: `p` holds `n` elements of `dt` on the group's GPU and
            // is marked used on the comm stream; in place is allowed.
            is.launch("ncclAllReduce", what, &[t], n == 0, |comm, s| unsafe {
                nc::all_reduce(p, p, n, dt, sys::ncclRedOp_t::ncclSum, comm, s)
            })?;
            is.then_compute()
        })
    }

    fn all_gather(&self, ctx: &Ctx, input: &Tensor, output: &mut Tensor) -> Result<()> {
        self.gather(ctx, input, output)?;
        Ok(ctx.wait_for(StreamKind::Compute, StreamKind::Comm)?)
    }

    fn reduce_scatter_sum(&self, ctx: &Ctx, input: &Tensor, output: &mut Tensor) -> Result<()> {
        let op = "reduce_scatter";
        self.run(op, ctx, |is| {
            self.on_gpu(op, "input", input)?;
            self.on_gpu(op, "output", output)?;
            let dt = sum_type(op, "input", input)?;
            scaled(op, input, output, self.world_size, self.rank)?;
            let (n, src, dst) = (output.numel(), ptr(input)?, ptr_mut(output)?);
            let what = format!("{} x {} to {n}", input.numel(), input.dtype());
            // SAFETY: `src` holds world x n elements of `dt`, `dst` n, on the
            // group's GPU (or `dst` is `src`'s slot `rank`, which NCCL
            // allows), both marked used on the comm stream.
            is.launch(
                "ncclReduceScatter",
                what,
                &[input, output],
                n == 0,
                |comm, s| unsafe {
                    nc::reduce_scatter(src, dst, n, dt, sys::ncclRedOp_t::ncclSum, comm, s)
                },
            )?;
            is.then_compute()
        })
    }

    fn broadcast(&self, ctx: &Ctx, t: &mut Tensor, root: usize) -> Result<()> {
        let op = "broadcast";
        self.run(op, ctx, |is| {
            self.on_gpu(op, "tensor", t)?;
            if root >= self.world_size {
                return Err(Error::Invalid {
                    op,
                    msg: format!(
                        "root {root} is not a rank of a world of {}",
                        self.world_size
                    ),
                });
            }
            let (nb, p) = (t.bytes(), ptr_mut(t)?);
            let what = format!("{} x {} from rank {root}", t.numel(), t.dtype());
            // SAFETY: `p` holds `nb` bytes on the group's GPU, marked used on
            // the comm stream; in place is allowed.
            is.launch("ncclBroadcast", what, &[t], nb == 0, |comm, s| unsafe {
                nc::broadcast(
                    p,
                    p,
                    nb,
                    sys::ncclDataType_t::ncclUint8,
                    root as i32,
                    comm,
                    s,
                )
            })?;
            is.then_compute()
        })
    }

    fn barrier(&self, ctx: &Ctx) -> Result<()> {
        let op = "barrier";
        self.usable()?;
        let one = Tensor::zeros(ctx, DType::F32, &[1])?;
        self.run(op, ctx, |is| {
            self.on_gpu(op, "its buffer", &one)?;
            let p = ptr_mut(&one)?;
            // SAFETY: `p` holds one f32 on the group's GPU, marked used on
            // the comm stream.
            is.launch(
                "ncclAllReduce",
                "1 x f32".into(),
                &[&one],
                false,
                |comm, s| unsafe {
                    nc::all_reduce(
                        p,
                        p,
                        1,
                        sys::ncclDataType_t::ncclFloat32,
                        sys::ncclRedOp_t::ncclSum,
                        comm,
                        s,
                    )
                },
            )?;
            is.then_compute()
        })?;
        self.synchronize()
    }

    fn all_gather_start(&self, ctx: &Ctx, input: &Tensor, output: &mut Tensor) -> Result<Pending> {
        self.gather(ctx, input, output)?;
        Ok(Pending::after(ctx.record(StreamKind::Comm)?))
    }
}

impl NcclGroup {
    /// Queues the all-gather on the comm stream; the caller orders the
    /// compute stream after it.
    fn gather(&self, ctx: &Ctx, input: &Tensor, output: &mut Tensor) -> Result<()> {
        let op = "all_gather";
        self.run(op, ctx, |is| {
            self.on_gpu(op, "input", input)?;
            self.on_gpu(op, "output", output)?;
            scaled(op, input, output, self.world_size, self.rank)?;
            let (nb, src, dst) = (input.bytes(), ptr(input)?, ptr_mut(output)?);
            let what = format!("{} x {} per rank", input.numel(), input.dtype());
            // SAFETY: `src` holds `nb` bytes and `dst` world x nb on the
            // group's GPU (or `src` is `dst`'s slot `rank`, which NCCL
            // allows), both marked used on the comm stream.
            is.launch(
                "ncclAllGather",
                what,
                &[input, output],
                nb == 0,
                |comm, s| unsafe {
                    nc::all_gather(src, dst, nb, sys::ncclDataType_t::ncclUint8, comm, s)
                },
            )
        })
    }
}

/// Hands out NCCL's unique id through the store and waits until every rank
/// has it.
fn rendezvous(world: &WorldInfo, cfg: &GroupConfig) -> Result<(sys::ncclUniqueId, TcpStore)> {
    let (op, rank) = ("connect", world.rank);
    let total = cfg.rendezvous_timeout;
    let mut store = TcpStore::connect(world, total)?;
    let addr = store.addr().to_string();
    let rendezvous = |what: String| Error::Rendezvous {
        rank,
        addr: addr.clone(),
        what,
        timeout: total,
    };
    let id = if rank == 0 {
        let id = nc::get_uniqueid()
            .map_err(|e| nccl_err(op, "ncclGetUniqueId", std::ptr::null_mut(), e))?;
        let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        store.set_bytes(ID_KEY, &bytes)?;
        id
    } else {
        let v = match store.get_bytes(ID_KEY) {
            Err(Error::StoreTimeout { .. }) => {
                return Err(rendezvous(format!(
                    "rank 0 did not publish NCCL's unique id (it never set `{ID_KEY}`)"
                )))
            }
            r => r?,
        };
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        if v.len() != id.internal.len() {
            return Err(rendezvous(format!(
                "`{ID_KEY}` holds {} bytes, not NCCL's {}",
                v.len(),
                id.internal.len()
            )));
        }
        for (d, s) in id.internal.iter_mut().zip(&v) {
            *d = *s as c_char;
        }
        id
    };
    // Every rank arrives before any calls ncclCommInitRank, which would
    // wait for a missing rank without a timeout.
    match store.barrier() {
        Err(Error::Store { msg, .. }) => Err(rendezvous(format!(
            "not every rank arrived to start NCCL ({msg})"
        ))),
        r => r,
    }?;
    Ok((id, store))
}
