//! CPU collectives between processes: a ring over TCP.
//!
//! Each rank keeps two connections: it sends to its right neighbour `(rank + 1) % n` and receives
//! from its left neighbour `(rank - 1) % n`. Sends go through a dedicated writer thread so that a
//! rank can push chunk `k + 1` while it is still receiving and adding chunk `k` (pipelining), and
//! so that "everybody sends, then everybody receives" can never deadlock on full socket buffers.
//!
//! **All-reduce** is the classic bandwidth-optimal ring: a reduce-scatter (n - 1 steps) after
//! which rank `r` owns the fully reduced segment `r`, then an all-gather (n - 1 steps) that copies
//! the owned segments around. Each segment is summed exactly once, by one fixed chain, and then
//! copied, so every rank gets bit-identical results, and results are reproducible for a given
//! world size. The summation order of segment `j` (elements `[j*L/n, (j+1)*L/n)`) is the left fold
//! over ranks `j+1, j+2, …, n-1, 0, …, j` (see [`ring_sum_order`]).
//!
//! Failure handling: every read and write has a timeout (`op_timeout`); a closed connection is
//! reported at once. On any failure the communicator shuts both of its sockets down, so the
//! neighbours see end-of-file immediately and the failure travels around the ring in
//! milliseconds instead of every rank waiting for its own timeout.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::communicator::{check_root, check_scatter_lens, Communicator};
use crate::CommError;

const MAGIC: &[u8; 8] = b"OVRING01";
const HELLO_LEN: usize = 8 + 8 + 8 + 8;
const HEADER_LEN: usize = 8 + 8 + 8 + 4 + 4;
const ACK_OK: u8 = 1;
const ACK_REJECT: u8 = 2;

/// Configuration of a [`TcpRingCommunicator`].
#[derive(Debug, Clone)]
pub struct RingConfig {
    pub rank: usize,
    pub world_size: usize,
    /// `host:port` of every rank's ring listener, indexed by rank (from the coordinator's Join).
    pub peers: Vec<String>,
    /// Job generation; connections from another generation (a stale pod) are rejected.
    pub generation: u64,
    /// How long the rendezvous may take (neighbours start at different times).
    pub connect_timeout: Duration,
    /// Longest silence tolerated from a neighbour inside a collective. It also bounds how much
    /// later than this rank a peer may enter the same collective.
    pub op_timeout: Duration,
    /// Pipelining unit on the wire.
    pub chunk_bytes: usize,
}

impl RingConfig {
    pub fn new(rank: usize, world_size: usize, peers: Vec<String>) -> Self {
        RingConfig {
            rank,
            world_size,
            peers,
            generation: 0,
            connect_timeout: Duration::from_secs(120),
            op_timeout: Duration::from_secs(300),
            chunk_bytes: 1 << 20,
        }
    }

    fn validate(&self) -> Result<(), CommError> {
        if self.world_size < 2 {
            return Err(CommError::Config(format!(
                "a TCP ring needs world_size >= 2 (got {}); use LocalCommunicator for one rank",
                self.world_size
            )));
        }
        if self.rank >= self.world_size {
            return Err(CommError::Config(format!(
                "rank {} is out of range for world_size {}",
                self.rank, self.world_size
            )));
        }
        if self.peers.len() != self.world_size {
            return Err(CommError::Config(format!(
                "{} peer addresses given for world_size {}",
                self.peers.len(),
                self.world_size
            )));
        }
        if self.chunk_bytes < 4 || self.chunk_bytes > (1 << 30) {
            return Err(CommError::Config(format!(
                "chunk_bytes {} must be in 4..=1GiB",
                self.chunk_bytes
            )));
        }
        if self.op_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(CommError::Config("timeouts must be non-zero".into()));
        }
        Ok(())
    }
}

/// Summation order of segment `segment` in [`TcpRingCommunicator::all_reduce_sum_f32`]: the
/// result is the left fold of the ranks' values in this order.
pub fn ring_sum_order(world_size: usize, segment: usize) -> Vec<usize> {
    (1..=world_size).map(|i| (segment + i) % world_size).collect()
}

/// Element range of segment `i` when `len` elements are split over `n` ranks.
pub fn ring_segment(len: usize, n: usize, i: usize) -> Range<usize> {
    // u128 so that len * n cannot overflow.
    let start = (len as u128 * i as u128 / n as u128) as usize;
    let end = (len as u128 * (i as u128 + 1) / n as u128) as usize;
    start..end
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum OpKind {
    AllReduce = 1,
    ReduceScatter = 2,
    AllGather = 3,
    Broadcast = 4,
    Barrier = 5,
}

impl OpKind {
    fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce => "all_reduce",
            OpKind::ReduceScatter => "reduce_scatter",
            OpKind::AllGather => "all_gather",
            OpKind::Broadcast => "broadcast",
            OpKind::Barrier => "barrier",
        }
    }
    fn from_u8(v: u8) -> Option<OpKind> {
        Some(match v {
            1 => OpKind::AllReduce,
            2 => OpKind::ReduceScatter,
            3 => OpKind::AllGather,
            4 => OpKind::Broadcast,
            5 => OpKind::Barrier,
            _ => return None,
        })
    }
}

/// What a frame claims to be; the receiver checks it against what it expects, which catches ranks
/// that call different collectives or pass different sizes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FrameHeader {
    seq: u64,
    total: u64,
    offset: u64,
    kind: u8,
    len: u32,
}

impl FrameHeader {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.total.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[28..32].copy_from_slice(&self.len.to_le_bytes());
        b
    }
    fn decode(b: &[u8; HEADER_LEN]) -> FrameHeader {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        FrameHeader {
            seq: u64_at(0),
            total: u64_at(8),
            offset: u64_at(16),
            kind: u32_at(24) as u8,
            len: u32_at(28),
        }
    }
}

/// A TCP ring between the trainer ranks of one job (the CPU [`Communicator`]).
pub struct TcpRingCommunicator {
    rank: usize,
    world_size: usize,
    inner: Mutex<Ring>,
}

struct Ring {
    rank: usize,
    n: usize,
    left_rank: usize,
    left_addr: String,
    right_rank: usize,
    right_addr: String,
    left: TcpStream,
    right: TcpStream,
    sender: Option<SyncSender<Vec<u8>>>,
    writer: Option<JoinHandle<()>>,
    /// First write error of the writer thread, reported by the next send.
    writer_error: Arc<Mutex<Option<std::io::Error>>>,
    op_timeout: Duration,
    chunk_elems: usize,
    chunk_bytes: usize,
    seq: u64,
    poisoned: Option<String>,
    scratch: Vec<f32>,
}

impl TcpRingCommunicator {
    /// Binds `bind` (e.g. `0.0.0.0:29500`; the address advertised in `config.peers[rank]` must
    /// reach it) and connects the ring.
    pub fn connect(config: RingConfig, bind: impl ToSocketAddrs) -> Result<Self, CommError> {
        let listener = TcpListener::bind(bind).map_err(|e| CommError::Rendezvous {
            rank: config.rank,
            detail: format!("cannot bind the ring listener: {e}"),
        })?;
        Self::connect_with_listener(config, listener)
    }

    /// Connects the ring using an already bound listener (whose address was advertised to the
    /// other ranks through the coordinator): connects to the right neighbour and accepts the left
    /// one, retrying until `connect_timeout`.
    pub fn connect_with_listener(config: RingConfig, listener: TcpListener) -> Result<Self, CommError> {
        config.validate()?;
        let rank = config.rank;
        let n = config.world_size;
        let right_rank = (rank + 1) % n;
        let left_rank = (rank + n - 1) % n;
        let deadline = Instant::now() + config.connect_timeout;
        let rdv = |detail: String| CommError::Rendezvous { rank, detail };

        listener
            .set_nonblocking(true)
            .map_err(|e| rdv(format!("listener set_nonblocking: {e}")))?;

        // Connect out and accept in at the same time: with every rank connecting first and
        // accepting second, a 2-rank ring would still work (the kernel queues the accept), but
        // doing both concurrently keeps the rendezvous time independent of start order.
        let right_addr = config.peers[right_rank].clone();
        let hello = hello_bytes(rank, n, config.generation);
        let connect_cfg = (right_addr.clone(), right_rank, deadline, config.op_timeout);
        let connector = std::thread::Builder::new()
            .name(format!("ring-connect-{rank}"))
            .spawn(move || connect_right(connect_cfg, hello))
            .map_err(|e| rdv(format!("cannot spawn connector thread: {e}")))?;

        let accepted = accept_left(&listener, left_rank, n, config.generation, deadline);
        let connected = connector
            .join()
            .map_err(|_| rdv("connector thread panicked".into()))?;
        let left = accepted.map_err(|d| rdv(format!("accepting left neighbour rank {left_rank}: {d}")))?;
        let right = connected.map_err(|d| {
            rdv(format!("connecting to right neighbour rank {right_rank} at {right_addr}: {d}"))
        })?;

        for s in [&left, &right] {
            let _ = s.set_nodelay(true);
            s.set_read_timeout(Some(config.op_timeout))
                .and_then(|_| s.set_write_timeout(Some(config.op_timeout)))
                .map_err(|e| rdv(format!("setting socket timeouts: {e}")))?;
        }

        let writer_error: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
        // Capacity 4: enough to keep the socket busy while the main thread adds a chunk.
        let (tx, rx) = sync_channel::<Vec<u8>>(4);
        let mut wstream = right
            .try_clone()
            .map_err(|e| rdv(format!("cloning the right socket: {e}")))?;
        let werr = writer_error.clone();
        let writer = std::thread::Builder::new()
            .name(format!("ring-writer-{rank}"))
            .spawn(move || {
                for frame in rx {
                    if let Err(e) = wstream.write_all(&frame) {
                        if let Ok(mut slot) = werr.lock() {
                            slot.get_or_insert(e);
                        }
                        let _ = wstream.shutdown(Shutdown::Both);
                        return;
                    }
                }
            })
            .map_err(|e| rdv(format!("cannot spawn writer thread: {e}")))?;

        let chunk_elems = (config.chunk_bytes / 4).max(1);
        Ok(TcpRingCommunicator {
            rank,
            world_size: n,
            inner: Mutex::new(Ring {
                rank,
                n,
                left_rank,
                left_addr: config.peers[left_rank].clone(),
                right_rank,
                right_addr,
                left,
                right,
                sender: Some(tx),
                writer: Some(writer),
                writer_error,
                op_timeout: config.op_timeout,
                chunk_elems,
                chunk_bytes: chunk_elems * 4,
                seq: 0,
                poisoned: None,
                scratch: Vec::new(),
            }),
        })
    }

    fn with_ring<T>(
        &self,
        op: OpKind,
        f: impl FnOnce(&mut Ring) -> Result<T, CommError>,
    ) -> Result<T, CommError> {
        let mut ring = self
            .inner
            .lock()
            .map_err(|_| CommError::Poisoned("a previous collective panicked".into()))?;
        if let Some(reason) = &ring.poisoned {
            return Err(CommError::Poisoned(reason.clone()));
        }
        ring.seq += 1;
        let result = f(&mut ring);
        if let Err(e) = &result {
            if !matches!(e, CommError::InvalidArgument { .. }) {
                ring.poison(format!("{} failed: {e}", op.name()));
            }
        }
        result
    }
}

impl Communicator for TcpRingCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.with_ring(OpKind::AllReduce, |ring| {
            let n = ring.n;
            let seg = |i: usize| ring_segment(buf.len(), n, i);
            let segs: Vec<Range<usize>> = (0..n).map(seg).collect();
            ring.reduce_scatter_phase(OpKind::AllReduce, buf, &segs)?;
            ring.all_gather_phase(OpKind::AllReduce, buf, &segs)
        })
    }

    fn reduce_scatter_sum_f32(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        check_scatter_lens("reduce_scatter", input.len(), output.len(), self.world_size)?;
        self.with_ring(OpKind::ReduceScatter, |ring| {
            let k = output.len();
            let segs: Vec<Range<usize>> = (0..ring.n).map(|i| i * k..(i + 1) * k).collect();
            let mut work = input.to_vec();
            ring.reduce_scatter_phase(OpKind::ReduceScatter, &mut work, &segs)?;
            output.copy_from_slice(&work[segs[ring.rank].clone()]);
            Ok(())
        })
    }

    fn all_gather_f32(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        check_scatter_lens("all_gather", output.len(), input.len(), self.world_size)?;
        self.with_ring(OpKind::AllGather, |ring| {
            let k = input.len();
            let segs: Vec<Range<usize>> = (0..ring.n).map(|i| i * k..(i + 1) * k).collect();
            output[segs[ring.rank].clone()].copy_from_slice(input);
            ring.all_gather_phase(OpKind::AllGather, output, &segs)
        })
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        check_root("broadcast", root, self.world_size)?;
        self.with_ring(OpKind::Broadcast, |ring| ring.broadcast(buf, root))
    }

    fn barrier(&self) -> Result<(), CommError> {
        // An all-gather of one value per rank: no rank can finish before every rank has sent its
        // value, i.e. entered the barrier.
        self.with_ring(OpKind::Barrier, |ring| {
            let n = ring.n;
            let mut v = vec![0f32; n];
            v[ring.rank] = ring.rank as f32;
            let segs: Vec<Range<usize>> = (0..n).map(|i| i..i + 1).collect();
            ring.all_gather_phase(OpKind::Barrier, &mut v, &segs)?;
            for (i, x) in v.iter().enumerate() {
                if *x != i as f32 {
                    return Err(CommError::Mismatch {
                        op: "barrier",
                        detail: format!("slot {i} holds {x}, expected rank id {i}"),
                    });
                }
            }
            Ok(())
        })
    }
}

impl Drop for TcpRingCommunicator {
    fn drop(&mut self) {
        if let Ok(mut ring) = self.inner.lock() {
            // Closing the channel ends the writer after it flushed what was queued.
            ring.sender = None;
            if let Some(w) = ring.writer.take() {
                let _ = w.join();
            }
            let _ = ring.left.shutdown(Shutdown::Both);
            let _ = ring.right.shutdown(Shutdown::Both);
        }
    }
}

impl Ring {
    fn poison(&mut self, reason: String) {
        self.poisoned = Some(reason);
        // Wake the neighbours at once (they see EOF) rather than after their timeouts.
        let _ = self.left.shutdown(Shutdown::Both);
        let _ = self.right.shutdown(Shutdown::Both);
        self.sender = None;
    }

    fn io_error(&self, peer: usize, addr: &str, op: OpKind, e: std::io::Error) -> CommError {
        let op = op.name();
        let addr = addr.to_string();
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                CommError::Timeout { peer, addr, op, timeout: self.op_timeout }
            }
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected => CommError::PeerClosed { peer, addr, op },
            _ => CommError::Io { peer, addr, op, source: e },
        }
    }

    fn send_error(&self, op: OpKind) -> CommError {
        let taken = self.writer_error.lock().ok().and_then(|mut s| s.take());
        match taken {
            Some(e) => self.io_error(self.right_rank, &self.right_addr.clone(), op, e),
            None => CommError::PeerClosed {
                peer: self.right_rank,
                addr: self.right_addr.clone(),
                op: op.name(),
            },
        }
    }

    /// Queues one frame for the right neighbour.
    fn send(&mut self, op: OpKind, total: usize, offset: usize, payload: &[u8]) -> Result<(), CommError> {
        let header = FrameHeader {
            seq: self.seq,
            total: total as u64,
            offset: offset as u64,
            kind: op as u8,
            len: payload.len() as u32,
        };
        let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
        frame.extend_from_slice(&header.encode());
        frame.extend_from_slice(payload);
        let Some(tx) = &self.sender else {
            return Err(self.send_error(op));
        };
        // A full channel blocks only while the writer is blocked on the socket, which has its
        // own write timeout; a dead writer closes the channel and send fails at once.
        if tx.send(frame).is_err() {
            return Err(self.send_error(op));
        }
        Ok(())
    }

    /// Receives one frame from the left neighbour into `dst`, checking that it is the frame
    /// this rank expects.
    fn recv(&mut self, op: OpKind, total: usize, offset: usize, dst: &mut [u8]) -> Result<(), CommError> {
        let mut hb = [0u8; HEADER_LEN];
        let (left_rank, left_addr) = (self.left_rank, self.left_addr.clone());
        if let Err(e) = self.left.read_exact(&mut hb) {
            return Err(self.io_error(left_rank, &left_addr, op, e));
        }
        let got = FrameHeader::decode(&hb);
        let want = FrameHeader {
            seq: self.seq,
            total: total as u64,
            offset: offset as u64,
            kind: op as u8,
            len: dst.len() as u32,
        };
        if got != want {
            let got_op = OpKind::from_u8(got.kind).map(OpKind::name).unwrap_or("<corrupt>");
            return Err(CommError::Mismatch {
                op: op.name(),
                detail: format!(
                    "rank {left_rank} sent {got_op} #{} of {} bytes (chunk at {}, {} bytes), \
                     rank {} expected {} #{} of {} bytes (chunk at {}, {} bytes)",
                    got.seq,
                    got.total,
                    got.offset,
                    got.len,
                    self.rank,
                    op.name(),
                    want.seq,
                    want.total,
                    want.offset,
                    want.len
                ),
            });
        }
        if let Err(e) = self.left.read_exact(dst) {
            return Err(self.io_error(left_rank, &left_addr, op, e));
        }
        Ok(())
    }

    /// One ring step over f32 data: sends `buf[send]` to the right while receiving `recv` from the
    /// left, chunk by chunk; received chunks are added into (`add`) or copied over `buf[recv]`.
    fn step_f32(
        &mut self,
        op: OpKind,
        buf: &mut [f32],
        send: Range<usize>,
        recv: Range<usize>,
        add: bool,
    ) -> Result<(), CommError> {
        let ce = self.chunk_elems;
        let total_bytes = buf.len() * 4;
        let nsend = send.len().div_ceil(ce);
        let nrecv = recv.len().div_ceil(ce);
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(ce.min(recv.len()), 0.0);
        let result = (|| {
            for k in 0..nsend.max(nrecv) {
                if k < nsend {
                    let a = send.start + k * ce;
                    let b = (a + ce).min(send.end);
                    self.send(op, total_bytes, a * 4, bytemuck::cast_slice(&buf[a..b]))?;
                }
                if k < nrecv {
                    let a = recv.start + k * ce;
                    let b = (a + ce).min(recv.end);
                    let dst = &mut buf[a..b];
                    if add {
                        let tmp = &mut scratch[..b - a];
                        self.recv(op, total_bytes, a * 4, bytemuck::cast_slice_mut(tmp))?;
                        // partial + own (IEEE addition is commutative, so this is exactly the
                        // fold order documented in `ring_sum_order`).
                        for (d, p) in dst.iter_mut().zip(tmp.iter()) {
                            *d += *p;
                        }
                    } else {
                        self.recv(op, total_bytes, a * 4, bytemuck::cast_slice_mut(dst))?;
                    }
                }
            }
            Ok(())
        })();
        self.scratch = scratch;
        result
    }

    /// After it, rank `r` holds the sum over ranks of segment `r`.
    fn reduce_scatter_phase(&mut self, op: OpKind, buf: &mut [f32], segs: &[Range<usize>]) -> Result<(), CommError> {
        let (n, r) = (self.n, self.rank);
        for s in 0..n - 1 {
            let send = segs[(r + 2 * n - s - 1) % n].clone();
            let recv = segs[(r + 2 * n - s - 2) % n].clone();
            self.step_f32(op, buf, send, recv, true)?;
        }
        Ok(())
    }

    /// Starting with rank `r` holding segment `r`, leaves every rank with all segments.
    fn all_gather_phase(&mut self, op: OpKind, buf: &mut [f32], segs: &[Range<usize>]) -> Result<(), CommError> {
        let (n, r) = (self.n, self.rank);
        for s in 0..n - 1 {
            let send = segs[(r + n - s) % n].clone();
            let recv = segs[(r + 2 * n - s - 1) % n].clone();
            self.step_f32(op, buf, send, recv, false)?;
        }
        Ok(())
    }

    /// Pipelined along the ring from `root`: each rank forwards chunk `k` as soon as it has it.
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        let op = OpKind::Broadcast;
        let n = self.n;
        let pos = (self.rank + n - root) % n;
        let cb = self.chunk_bytes;
        let total = buf.len();
        let chunks = total.div_ceil(cb);
        for k in 0..chunks {
            let range = k * cb..((k + 1) * cb).min(total);
            if pos > 0 {
                self.recv(op, total, range.start, &mut buf[range.clone()])?;
            }
            if pos < n - 1 {
                self.send(op, total, range.start, &buf[range])?;
            }
        }
        if chunks == 0 {
            // Still synchronise on empty buffers, so a size mismatch (0 vs > 0) is detected.
            if pos > 0 {
                self.recv(op, 0, 0, &mut [])?;
            }
            if pos < n - 1 {
                self.send(op, 0, 0, &[])?;
            }
        }
        Ok(())
    }
}

fn hello_bytes(rank: usize, n: usize, generation: u64) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[0..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&(rank as u64).to_le_bytes());
    b[16..24].copy_from_slice(&(n as u64).to_le_bytes());
    b[24..32].copy_from_slice(&generation.to_le_bytes());
    b
}

fn resolve(addr: &str) -> Result<Vec<SocketAddr>, String> {
    addr.to_socket_addrs()
        .map(|a| a.collect())
        .map_err(|e| format!("cannot resolve {addr}: {e}"))
}

/// Connects to the right neighbour and sends the hello, retrying with backoff (the neighbour may
/// not be listening yet) until the deadline.
fn connect_right(
    (addr, right_rank, deadline, io_timeout): (String, usize, Instant, Duration),
    hello: [u8; HELLO_LEN],
) -> Result<TcpStream, String> {
    let mut backoff = Duration::from_millis(20);
    let mut last_err = String::from("deadline passed before the first attempt");
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(format!("gave up at the rendezvous deadline; last error: {last_err}"));
        }
        let remaining = deadline - now;
        let attempt = (|| -> Result<TcpStream, String> {
            let addrs = resolve(&addr)?;
            let sa = addrs.first().ok_or_else(|| format!("{addr} resolves to nothing"))?;
            let mut s = TcpStream::connect_timeout(sa, remaining.min(Duration::from_secs(5)))
                .map_err(|e| format!("connect: {e}"))?;
            s.set_write_timeout(Some(io_timeout)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(remaining.min(io_timeout))).map_err(|e| e.to_string())?;
            s.write_all(&hello).map_err(|e| format!("sending hello: {e}"))?;
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack).map_err(|e| format!("waiting for the hello ack: {e}"))?;
            match ack[0] {
                ACK_OK => Ok(s),
                _ => Err(format!(
                    "rank {right_rank} at {addr} rejected this rank (wrong world size, generation \
                     or ring position: are two jobs sharing ports?)"
                )),
            }
        })();
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) => last_err = e,
        }
        std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Accepts connections until one carries a valid hello from the expected left neighbour;
/// strangers (other generations, port scanners, wrong ranks) are rejected and ignored.
fn accept_left(
    listener: &TcpListener,
    left_rank: usize,
    n: usize,
    generation: u64,
    deadline: Instant,
) -> Result<TcpStream, String> {
    let mut rejected = Vec::new();
    loop {
        if Instant::now() >= deadline {
            let mut msg = "no valid connection before the rendezvous deadline".to_string();
            if !rejected.is_empty() {
                msg.push_str(&format!("; rejected: {}", rejected.join("; ")));
            }
            return Err(msg);
        }
        match listener.accept() {
            Ok((mut s, from)) => {
                let checked = (|| -> Result<(), String> {
                    s.set_nonblocking(false).map_err(|e| e.to_string())?;
                    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
                    let mut b = [0u8; HELLO_LEN];
                    s.read_exact(&mut b).map_err(|e| format!("reading hello: {e}"))?;
                    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
                    if &b[0..8] != MAGIC {
                        return Err("not an onevision ring peer".into());
                    }
                    let (rank, world, gen) = (u64_at(8), u64_at(16), u64_at(24));
                    if rank != left_rank as u64 || world != n as u64 || gen != generation {
                        return Err(format!(
                            "peer says rank {rank}/world {world}/generation {gen}, expected rank \
                             {left_rank}/world {n}/generation {generation}"
                        ));
                    }
                    Ok(())
                })();
                match checked {
                    Ok(()) => {
                        s.write_all(&[ACK_OK])
                            .map_err(|e| format!("acknowledging rank {left_rank}: {e}"))?;
                        return Ok(s);
                    }
                    Err(e) => {
                        let _ = s.write_all(&[ACK_REJECT]);
                        rejected.push(format!("{from}: {e}"));
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_buffer_exactly() {
        for len in [0usize, 1, 2, 5, 17, 1000] {
            for n in 2..6 {
                let mut next = 0;
                for i in 0..n {
                    let s = ring_segment(len, n, i);
                    assert_eq!(s.start, next);
                    next = s.end;
                }
                assert_eq!(next, len);
            }
        }
        assert_eq!(ring_sum_order(4, 1), vec![2, 3, 0, 1]);
    }

    #[test]
    fn frame_header_round_trips() {
        let h = FrameHeader { seq: 9, total: 1 << 40, offset: 12, kind: 3, len: 77 };
        assert_eq!(FrameHeader::decode(&h.encode()), h);
    }

    #[test]
    fn config_validation_rejects_nonsense() {
        let c = RingConfig::new(0, 1, vec!["127.0.0.1:1".into()]);
        assert!(matches!(c.validate(), Err(CommError::Config(_))));
        let c = RingConfig::new(2, 2, vec!["a:1".into(), "b:1".into()]);
        assert!(matches!(c.validate(), Err(CommError::Config(_))));
        let c = RingConfig::new(0, 3, vec!["a:1".into(), "b:1".into()]);
        assert!(matches!(c.validate(), Err(CommError::Config(_))));
    }
}
