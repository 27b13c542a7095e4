//! Data parallelism: one worker thread per device, each with a model replica, on one or
//! several nodes, through burn's collective layer (burn-collective 0.21).
//!
//! # Model
//! * **Ranks.** A node runs one process with one worker thread per local device. Global rank
//!   `node_rank · local_devices + local_rank`, world size `nodes · local_devices` (every node
//!   must have the same number of devices; checked at start). The collective peer id is the
//!   global rank.
//! * **Batches and losses** are the trainers' business ([`crate::shard`]): SFT ranks draw the
//!   same global micro-batch and keep their rows, UniGRPO ranks own prompt groups; both scale
//!   their shard losses so that the *mean* of the gradients over ranks is the 1-device
//!   gradient. This module moves tensors and small vectors between ranks and knows no
//!   trainer type.
//! * **Reduction.** Gradients are averaged with an all-reduce (`ReduceOperation::Mean`) through
//!   the [`GradReducer`] trait before clipping and the optimizer step, so every replica applies
//!   the same update. The collective implementation ([`CollectiveReducer`]) reduces one
//!   flattened bucket of gradients per call, in the order of `LladaModel::params` (names, not
//!   `ParamId`s, which differ between processes). [`SingleDevice`] is the 1-device identity.
//! * **Bit-identical replicas.** [`check_replicas`] gathers a hash of every parameter's bytes
//!   from every rank at start, every `check_every` steps and at the end; a mismatch is
//!   [`DistError::Diverged`].
//! * **Bounded failure.** Every collective call runs on a communication thread and is
//!   awaited with a deadline (`timeout`); local workers share an abort flag, so one failing
//!   worker stops its node's other workers at once, and a dead node (process killed) makes
//!   the other nodes fail with [`DistError::Timeout`] after at most `timeout`.
//! * **Multi-node.** `nodes > 1` registers with burn-collective's global orchestrator
//!   (websocket) at `coordinator`; node rank 0 hosts it ([`start_orchestrator`]) unless told
//!   otherwise. Every node serves its tensors on `data_port` (default: coordinator port + 1 +
//!   node rank). Rank 0 alone writes checkpoints, `metrics.jsonl` and wandb; the other ranks
//!   read the same run directory to resume (a shared file system, as on Slurm clusters).

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::collective::{
    AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective,
    register, reset_collective,
};
use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorPrimitive};
use mmada_model::LladaModel;
use mmada_model::model::ParamRef;

use crate::optim;

/// An error of the data-parallel machinery.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The distributed options are inconsistent.
    #[error("data parallelism: {0}")]
    Config(String),
    /// A collective call did not complete in time: a peer died, hangs, or is much slower.
    #[error(
        "rank {rank}: `{what}` did not complete within {secs} s: another rank has died, hangs or is far behind; aborting (raise --collective-timeout if checkpoints or evaluation take longer)"
    )]
    Timeout {
        /// Global rank reporting.
        rank: usize,
        /// The collective operation.
        what: String,
        /// The deadline in seconds.
        secs: u64,
    },
    /// burn-collective returned an error.
    #[error("rank {rank}: `{what}` failed in burn-collective: {message}")]
    Collective {
        /// Global rank reporting.
        rank: usize,
        /// The collective operation.
        what: String,
        /// burn's error.
        message: String,
    },
    /// Another worker of this node failed first; this one stopped.
    #[error("rank {rank}: stopped because another worker of this node failed")]
    Aborted {
        /// Global rank reporting.
        rank: usize,
    },
    /// Replicas are no longer identical.
    #[error(
        "replicas diverged at step {step}: parameter hashes per rank {hashes:?} (rank 0 = {reference:#018x}); this is a bug or a faulty device, not a tolerance issue"
    )]
    Diverged {
        /// Optimizer step of the check.
        step: u64,
        /// Hash of every rank.
        hashes: Vec<String>,
        /// Rank 0's hash.
        reference: u64,
    },
    /// A worker thread panicked.
    #[error("rank {rank}: worker thread panicked: {message}")]
    Panicked {
        /// Global rank of the worker.
        rank: usize,
        /// The panic message.
        message: String,
    },
}

/// Where this process sits in the data-parallel job, and how to reach the others.
#[derive(Debug, Clone)]
pub struct DistConfig {
    /// Number of nodes (one process each; `--nodes` or `NNODES`).
    pub nodes: usize,
    /// This node's rank in `0..nodes` (`--node-rank`, `NODE_RANK` or `GROUP_RANK`).
    pub node_rank: usize,
    /// The global orchestrator, `HOST:PORT` (`MASTER_ADDR:MASTER_PORT`); needed when `nodes > 1`.
    pub coordinator: Option<String>,
    /// This node's host name or IP as the other nodes reach it (`127.0.0.1` on one machine;
    /// required on node ranks > 0 unless the coordinator is on the loopback interface).
    pub node_host: Option<String>,
    /// Port of this node's tensor data service (default: coordinator port + 1 + node rank).
    pub data_port: Option<u16>,
    /// Node rank 0 starts the global orchestrator in-process (default true).
    pub host_orchestrator: bool,
    /// Deadline of one collective call (registration gets 4×).
    pub timeout: Duration,
    /// Compare replica parameter hashes every this many optimizer steps (0: only at start and end).
    pub check_every: u64,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            nodes: 1,
            node_rank: 0,
            coordinator: None,
            node_host: None,
            data_port: None,
            host_orchestrator: true,
            timeout: Duration::from_secs(600),
            check_every: 50,
        }
    }
}

impl DistConfig {
    /// Check the options; returns `(coordinator host, coordinator port)` when multi-node.
    ///
    /// # Errors
    /// [`DistError::Config`] naming the flag to fix.
    pub fn validate(&self) -> Result<Option<(String, u16)>, DistError> {
        if self.nodes == 0 {
            return Err(DistError::Config("--nodes must be at least 1".into()));
        }
        if self.node_rank >= self.nodes {
            return Err(DistError::Config(format!(
                "--node-rank {} is not in 0..{} (--nodes {})",
                self.node_rank, self.nodes, self.nodes
            )));
        }
        if self.nodes == 1 {
            return Ok(None);
        }
        let c = self.coordinator.as_deref().ok_or_else(|| {
            DistError::Config(format!(
                "--nodes {} needs --coordinator HOST:PORT (or MASTER_ADDR and MASTER_PORT)",
                self.nodes
            ))
        })?;
        let c = c.trim_start_matches("ws://").trim_start_matches("http://");
        let (host, port) = c
            .rsplit_once(':')
            .ok_or_else(|| DistError::Config(format!("--coordinator `{c}`: expected HOST:PORT")))?;
        let port: u16 = port.parse().map_err(|_| {
            DistError::Config(format!(
                "--coordinator `{c}`: `{port}` is not a port number"
            ))
        })?;
        let local = matches!(host, "127.0.0.1" | "localhost" | "::1" | "[::1]");
        if self.node_host.is_none() && self.node_rank != 0 && !local {
            return Err(DistError::Config(format!(
                "node rank {}: give --node-host (or NODE_ADDR), the name or IP under which the other nodes reach this one; only node rank 0 may default to the coordinator host `{host}`",
                self.node_rank
            )));
        }
        Ok(Some((host.to_string(), port)))
    }

    /// Fill unset fields from the usual launcher variables, with torchrun's meanings:
    /// `NNODES` (nodes) and `NODE_RANK` (or torchrun's `GROUP_RANK`) for this node's rank,
    /// `MASTER_ADDR` + `MASTER_PORT` (coordinator), `NODE_ADDR` (this node's host).
    /// `WORLD_SIZE` and `RANK` count *processes* (torchrun, accelerate, Slurm); mmada-train
    /// runs one process per node (one worker thread per device), so when they are set they
    /// must equal the node count and node rank (and `LOCAL_WORLD_SIZE`, when set, must be 1):
    /// a disagreement is an error here, before anything waits for a peer.
    ///
    /// # Errors
    /// [`DistError::Config`] when a variable is not a number, or `WORLD_SIZE` / `RANK` /
    /// `LOCAL_WORLD_SIZE` disagree with the flags and `NNODES` / `NODE_RANK`.
    pub fn with_env(self, explicit_nodes: bool, explicit_rank: bool) -> Result<Self, DistError> {
        self.with_vars(explicit_nodes, explicit_rank, |n| std::env::var(n).ok())
    }

    /// [`DistConfig::with_env`] over `var` instead of the process environment (tests).
    ///
    /// # Errors
    /// As [`DistConfig::with_env`].
    pub fn with_vars(
        mut self,
        explicit_nodes: bool,
        explicit_rank: bool,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, DistError> {
        let num = |names: &[&str]| -> Result<Option<(usize, String)>, DistError> {
            for n in names {
                if let Some(v) = var(n) {
                    return v
                        .trim()
                        .parse()
                        .map(|x| Some((x, (*n).to_string())))
                        .map_err(|_| {
                            DistError::Config(format!("environment {n}=`{v}` is not a number"))
                        });
                }
            }
            Ok(None)
        };
        let mut nodes_from = if explicit_nodes {
            "--nodes"
        } else {
            "the default (1 node)"
        }
        .to_string();
        if !explicit_nodes && let Some((n, name)) = num(&["NNODES"])? {
            self.nodes = n;
            nodes_from = name;
        }
        let mut rank_from = if explicit_rank {
            "--node-rank"
        } else {
            "the default (node rank 0)"
        }
        .to_string();
        if !explicit_rank && let Some((r, name)) = num(&["NODE_RANK", "GROUP_RANK"])? {
            self.node_rank = r;
            rank_from = name;
        }
        let fix = "mmada-train runs ONE process per node with one worker thread per device of train.device, so WORLD_SIZE and RANK (processes, as torchrun, accelerate and Slurm set them) must equal the node count and node rank; give the node count with --nodes / NNODES and the rank with --node-rank / NODE_RANK, start one process per node (torchrun --nproc-per-node 1), or unset WORLD_SIZE and RANK";
        if let Some((w, _)) = num(&["WORLD_SIZE"])?
            && w != self.nodes
        {
            return Err(DistError::Config(format!(
                "environment WORLD_SIZE={w} but this run has {} node(s) (from {nodes_from}): {fix}",
                self.nodes
            )));
        }
        if let Some((r, _)) = num(&["RANK"])?
            && r != self.node_rank
        {
            return Err(DistError::Config(format!(
                "environment RANK={r} but this node's rank is {} (from {rank_from}): {fix}",
                self.node_rank
            )));
        }
        if let Some((l, _)) = num(&["LOCAL_WORLD_SIZE"])?
            && l != 1
        {
            return Err(DistError::Config(format!(
                "environment LOCAL_WORLD_SIZE={l}: {fix}"
            )));
        }
        if self.coordinator.is_none()
            && let (Some(a), Some(p)) = (var("MASTER_ADDR"), var("MASTER_PORT"))
        {
            self.coordinator = Some(format!("{a}:{p}"));
        }
        if self.node_host.is_none()
            && let Some(h) = var("NODE_ADDR")
        {
            self.node_host = Some(h);
        }
        Ok(self)
    }
}

/// Averages gradients (and small metric vectors) over all data-parallel ranks.
///
/// Implementations: [`SingleDevice`] (world 1, identity) and [`CollectiveReducer`]
/// (burn-collective: local threads, and nodes through the global orchestrator; runs on Flex
/// and Cuda).
pub trait GradReducer<B: AutodiffBackend>: Send {
    /// Global rank of this worker.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Replace every gradient by its mean over all ranks. Parameters are taken in the order of
    /// `LladaModel::params`; a parameter without a gradient on some ranks counts as zeros
    /// there, one without a gradient on every rank gets none (as on one device).
    ///
    /// # Errors
    /// [`DistError`] on timeout, abort or a collective failure.
    fn mean_grads(
        &mut self,
        model: &LladaModel<B>,
        grads: GradientsParams,
    ) -> Result<GradientsParams, DistError>;
    /// Element-wise sum of `values` over all ranks (same length everywhere). Exact for integers
    /// up to 2^24.
    ///
    /// # Errors
    /// As [`GradReducer::mean_grads`].
    fn sum(&mut self, values: &[f32]) -> Result<Vec<f32>, DistError> {
        self.sum_labeled("metric all-reduce", values, false)
    }
    /// [`GradReducer::sum`] named `what` in errors; `long` waits up to the
    /// [`GradReducer::barrier`] deadline instead of the per-call timeout (for a call that
    /// follows uneven work, e.g. UniGRPO's reward gather after rollouts and reward models).
    ///
    /// # Errors
    /// As [`GradReducer::mean_grads`].
    fn sum_labeled(
        &mut self,
        what: &'static str,
        values: &[f32],
        long: bool,
    ) -> Result<Vec<f32>, DistError>;
    /// Broadcast a flat tensor of `len` elements of `dtype` from rank `root` (which passes
    /// `Some`; the others pass `None`) to every rank, bit-exact (ZeRO: updated parameters and
    /// gathered optimizer state).
    ///
    /// # Errors
    /// As [`GradReducer::mean_grads`]; [`DistError::Config`] when `root` passes `None`.
    fn broadcast_flat(
        &mut self,
        what: &str,
        tensor: Option<Tensor<B::InnerBackend, 1>>,
        root: usize,
        len: usize,
        dtype: burn::tensor::DType,
    ) -> Result<Tensor<B::InnerBackend, 1>, DistError>;
    /// Whether [`GradReducer::broadcast_flat`] may change the root's own bits (the multi-node
    /// path through an all-reduce turns -0.0 into +0.0): the root then takes the broadcast
    /// result too, so the replicas stay bit-identical.
    fn replaces_root_copy(&self) -> bool {
        false
    }
    /// Mean over ranks of a flat tensor, delivered to rank `root` only (`None` elsewhere):
    /// ZeRO stage 2's gradient reduction to the owner.
    ///
    /// # Errors
    /// As [`GradReducer::mean_grads`].
    fn reduce_mean_to(
        &mut self,
        what: &str,
        tensor: Tensor<B::InnerBackend, 1>,
        root: usize,
    ) -> Result<Option<Tensor<B::InnerBackend, 1>>, DistError>;
    /// Wait until every rank arrives, with a deadline of [`IO_BARRIER_FACTOR`] × the
    /// per-call timeout: called by every rank after a step on which rank 0 alone evaluated or
    /// wrote a checkpoint (an 8B checkpoint with optimizer state is ~100 GB), so the others do
    /// not time out in their next gradient all-reduce while it does.
    ///
    /// # Errors
    /// As [`GradReducer::mean_grads`].
    fn barrier(&mut self) -> Result<(), DistError>;
    /// Leave the collective (end of a run).
    ///
    /// # Errors
    /// As [`GradReducer::mean_grads`].
    fn finish(&mut self) -> Result<(), DistError>;
}

/// The reducer of a 1-device run: identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleDevice;

impl<B: AutodiffBackend> GradReducer<B> for SingleDevice {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn mean_grads(
        &mut self,
        _model: &LladaModel<B>,
        grads: GradientsParams,
    ) -> Result<GradientsParams, DistError> {
        Ok(grads)
    }
    fn sum_labeled(
        &mut self,
        _what: &'static str,
        values: &[f32],
        _long: bool,
    ) -> Result<Vec<f32>, DistError> {
        Ok(values.to_vec())
    }
    fn broadcast_flat(
        &mut self,
        what: &str,
        tensor: Option<Tensor<B::InnerBackend, 1>>,
        _root: usize,
        _len: usize,
        _dtype: burn::tensor::DType,
    ) -> Result<Tensor<B::InnerBackend, 1>, DistError> {
        tensor.ok_or_else(|| DistError::Config(format!("{what}: the only rank has no tensor")))
    }
    fn reduce_mean_to(
        &mut self,
        _what: &str,
        tensor: Tensor<B::InnerBackend, 1>,
        _root: usize,
    ) -> Result<Option<Tensor<B::InnerBackend, 1>>, DistError> {
        Ok(Some(tensor))
    }
    fn barrier(&mut self) -> Result<(), DistError> {
        Ok(())
    }
    fn finish(&mut self) -> Result<(), DistError> {
        Ok(())
    }
}

/// The deadline of [`GradReducer::barrier`] (after rank 0's evaluation or checkpoint write)
/// in units of the per-call collective timeout: 6 × the default 600 s = 1 h.
pub const IO_BARRIER_FACTOR: u32 = 6;

type Job = Box<dyn FnOnce() + Send>;

/// Runs collective calls on a dedicated thread so that the caller can wait with a deadline
/// and an abort flag (burn-collective's calls block without a timeout).
struct CommThread {
    tx: Option<mpsc::Sender<Job>>,
    rank: usize,
    abort: Arc<AtomicBool>,
    poisoned: bool,
}

impl CommThread {
    fn new(rank: usize, abort: Arc<AtomicBool>) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("mmada-comm-{rank}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("spawning the communication thread");
        CommThread {
            tx: Some(tx),
            rank,
            abort,
            poisoned: false,
        }
    }

    fn call<R: Send + 'static>(
        &mut self,
        what: &str,
        timeout: Duration,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, DistError> {
        if self.poisoned || self.abort.load(Ordering::SeqCst) {
            return Err(DistError::Aborted { rank: self.rank });
        }
        let (rtx, rrx) = mpsc::channel();
        let sent = self.tx.as_ref().is_some_and(|tx| {
            tx.send(Box::new(move || {
                let _ = rtx.send(f());
            }))
            .is_ok()
        });
        if !sent {
            self.poisoned = true;
            return Err(DistError::Aborted { rank: self.rank });
        }
        let start = Instant::now();
        loop {
            match rrx.recv_timeout(Duration::from_millis(50)) {
                Ok(r) => return Ok(r),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.poisoned = true;
                    return Err(DistError::Collective {
                        rank: self.rank,
                        what: what.into(),
                        message: "the communication thread died (panic inside burn-collective)"
                            .into(),
                    });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.abort.load(Ordering::SeqCst) {
                        self.poisoned = true;
                        return Err(DistError::Aborted { rank: self.rank });
                    }
                    if start.elapsed() >= timeout {
                        // the stuck call keeps the thread; this reducer is unusable from now on
                        self.poisoned = true;
                        self.abort.store(true, Ordering::SeqCst);
                        return Err(DistError::Timeout {
                            rank: self.rank,
                            what: what.into(),
                            secs: timeout.as_secs(),
                        });
                    }
                }
            }
        }
    }
}

impl Drop for CommThread {
    fn drop(&mut self) {
        // closing the channel ends the thread once its current job (if any) returns
        self.tx.take();
    }
}

/// Gradients are reduced in buckets of at most this many elements (one collective call each).
pub(crate) const BUCKET_ELEMS: usize = 64 << 20;

/// [`GradReducer`] over burn-collective. Register and reduce with the inner backend (burn
/// notes): the gradients are `B::InnerBackend` tensors.
pub struct CollectiveReducer<B: AutodiffBackend> {
    comm: CommThread,
    peer: PeerId,
    rank: usize,
    world: usize,
    device: burn::tensor::Device<B::InnerBackend>,
    timeout: Duration,
    global: bool,
}

fn collective_err(
    rank: usize,
    what: &str,
) -> impl Fn(burn::collective::CollectiveError) -> DistError {
    let what = what.to_string();
    move |e| DistError::Collective {
        rank,
        what: what.clone(),
        message: format!("{e:?}"),
    }
}

impl<B: AutodiffBackend> CollectiveReducer<B> {
    /// Register global rank `rank` of `world` (this node has `config`'s `num_devices` local
    /// peers) and wait until every peer registered (deadline `4 × timeout`).
    ///
    /// # Errors
    /// [`DistError`] when registration fails or times out.
    pub fn register(
        rank: usize,
        world: usize,
        device: burn::tensor::Device<B::InnerBackend>,
        config: CollectiveConfig,
        timeout: Duration,
        abort: Arc<AtomicBool>,
    ) -> Result<Self, DistError> {
        let mut comm = CommThread::new(rank, abort);
        let peer = PeerId(rank as u32);
        let dev = device.clone();
        comm.call("register", timeout * 4, move || {
            register::<B::InnerBackend>(peer, dev, config)
        })?
        .map_err(collective_err(rank, "register"))?;
        Ok(CollectiveReducer {
            comm,
            peer,
            rank,
            world,
            device,
            timeout,
            global: false,
        })
    }

    /// Mark this reducer as part of a multi-node job: burn-collective 0.21 has no global
    /// `reduce` / `broadcast` (`unimplemented!`), so [`GradReducer::broadcast_flat`] and
    /// [`GradReducer::reduce_mean_to`] then go through the global all-reduce.
    pub fn with_global(mut self, global: bool) -> Self {
        self.global = global;
        self
    }

    fn all_reduce_flat(
        &mut self,
        what: &str,
        t: Tensor<B::InnerBackend, 1>,
        op: ReduceOperation,
    ) -> Result<Tensor<B::InnerBackend, 1>, DistError> {
        let timeout = self.timeout;
        self.all_reduce_within(what, t, op, timeout)
    }

    /// Sum of a few values over all ranks. Padded with zeros to at least `world` elements:
    /// burn-collective's global ring all-reduce splits the tensor into one slice per node and
    /// refuses a shorter one (`RingReduceImpossible`).
    fn sum_within(
        &mut self,
        what: &str,
        values: &[f32],
        timeout: Duration,
    ) -> Result<Vec<f32>, DistError> {
        let mut padded = values.to_vec();
        padded.resize(values.len().max(self.world), 0.0);
        let t = Tensor::<B::InnerBackend, 1>::from_floats(padded.as_slice(), &self.device);
        let r = self.all_reduce_within(what, t, ReduceOperation::Sum, timeout)?;
        let mut out = r
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| DistError::Collective {
                rank: self.rank,
                what: what.into(),
                message: format!("{e:?}"),
            })?;
        out.truncate(values.len());
        Ok(out)
    }

    fn all_reduce_within(
        &mut self,
        what: &str,
        t: Tensor<B::InnerBackend, 1>,
        op: ReduceOperation,
        timeout: Duration,
    ) -> Result<Tensor<B::InnerBackend, 1>, DistError> {
        let peer = self.peer;
        let prim = t.into_primitive().tensor();
        let out = self
            .comm
            .call(what, timeout, move || {
                all_reduce::<B::InnerBackend>(peer, prim, op)
            })?
            .map_err(collective_err(self.rank, what))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }
}

enum Slot {
    M2(ParamId, [usize; 2]),
    V1(ParamId, usize),
}

impl<B: AutodiffBackend> GradReducer<B> for CollectiveReducer<B> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }

    fn mean_grads(
        &mut self,
        model: &LladaModel<B>,
        mut grads: GradientsParams,
    ) -> Result<GradientsParams, DistError> {
        type I<B> = <B as AutodiffBackend>::InnerBackend;
        let slots: Vec<Slot> = model
            .params()
            .into_iter()
            .map(|(_, p)| match p {
                ParamRef::Linear(w) | ParamRef::Matrix(w) => Slot::M2(w.id, w.val().dims()),
                ParamRef::Vector(w) => Slot::V1(w.id, w.val().dims()[0]),
            })
            .collect();
        // parameters without a gradient on every rank stay without one (AdamW then skips them,
        // as on one device); a gradient missing on some ranks only counts as zeros there
        let present: Vec<f32> = slots
            .iter()
            .map(|s| {
                let has = match s {
                    Slot::M2(id, _) => grads.get::<I<B>, 2>(*id).is_some(),
                    Slot::V1(id, _) => grads.get::<I<B>, 1>(*id).is_some(),
                };
                f32::from(u8::from(has))
            })
            .collect();
        let timeout = self.timeout;
        let present = self.sum_within("gradient presence all-reduce", &present, timeout)?;
        let slots: Vec<Slot> = slots
            .into_iter()
            .zip(present)
            .filter(|(_, p)| *p > 0.0)
            .map(|(s, _)| s)
            .collect();
        let mut out = GradientsParams::new();
        let mut start = 0;
        let mut bucket = 0;
        while start < slots.len() {
            // one bucket: consecutive parameters up to BUCKET_ELEMS elements (at least one)
            let mut end = start;
            let mut elems = 0;
            while end < slots.len() {
                let n = match &slots[end] {
                    Slot::M2(_, [a, b]) => a * b,
                    Slot::V1(_, n) => *n,
                };
                if end > start && elems + n > BUCKET_ELEMS {
                    break;
                }
                elems += n;
                end += 1;
            }
            let flat: Vec<Tensor<I<B>, 1>> = slots[start..end]
                .iter()
                .map(|s| match s {
                    Slot::M2(id, [a, b]) => grads
                        .remove::<I<B>, 2>(*id)
                        .unwrap_or_else(|| Tensor::zeros([*a, *b], &self.device))
                        .reshape([a * b]),
                    Slot::V1(id, n) => grads
                        .remove::<I<B>, 1>(*id)
                        .unwrap_or_else(|| Tensor::zeros([*n], &self.device)),
                })
                .collect();
            let flat = Tensor::cat(flat, 0);
            let reduced = self.all_reduce_flat(
                &format!("gradient all-reduce (bucket {bucket})"),
                flat,
                ReduceOperation::Mean,
            )?;
            let mut off = 0;
            for s in &slots[start..end] {
                match s {
                    Slot::M2(id, [a, b]) => {
                        let g = reduced.clone().slice(off..off + a * b).reshape([*a, *b]);
                        out.register(*id, g);
                        off += a * b;
                    }
                    Slot::V1(id, n) => {
                        out.register(*id, reduced.clone().slice(off..off + n));
                        off += n;
                    }
                }
            }
            start = end;
            bucket += 1;
        }
        Ok(out)
    }

    fn broadcast_flat(
        &mut self,
        what: &str,
        tensor: Option<Tensor<B::InnerBackend, 1>>,
        root: usize,
        len: usize,
        dtype: burn::tensor::DType,
    ) -> Result<Tensor<B::InnerBackend, 1>, DistError> {
        if (root == self.rank) != tensor.is_some() {
            return Err(DistError::Config(format!(
                "{what}: rank {} {} a tensor but the root is rank {root}",
                self.rank,
                if tensor.is_some() { "sends" } else { "has no" }
            )));
        }
        if self.global {
            // an all-reduce sum of the root's tensor and zeros elsewhere: every rank (the
            // root included) keeps the result, so the copies are bit-identical (a -0.0 of
            // the root becomes +0.0 everywhere)
            let t = tensor.unwrap_or_else(|| Tensor::zeros([len], (&self.device, dtype)));
            return self.all_reduce_flat(what, t, ReduceOperation::Sum);
        }
        let peer = self.peer;
        let prim = tensor.map(|t| t.into_primitive().tensor());
        let out = self
            .comm
            .call(what, self.timeout, move || {
                burn_collective::broadcast::<B::InnerBackend>(peer, prim)
            })?
            .map_err(collective_err(self.rank, what))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    fn replaces_root_copy(&self) -> bool {
        self.global
    }

    fn reduce_mean_to(
        &mut self,
        what: &str,
        tensor: Tensor<B::InnerBackend, 1>,
        root: usize,
    ) -> Result<Option<Tensor<B::InnerBackend, 1>>, DistError> {
        if self.global {
            // all-reduce, and the ranks other than the root drop the result
            let r = self.all_reduce_flat(what, tensor, ReduceOperation::Mean)?;
            return Ok((root == self.rank).then_some(r));
        }
        let peer = self.peer;
        let prim = tensor.into_primitive().tensor();
        let root_peer = PeerId(root as u32);
        let out = self
            .comm
            .call(what, self.timeout, move || {
                burn_collective::reduce::<B::InnerBackend>(
                    peer,
                    prim,
                    ReduceOperation::Mean,
                    root_peer,
                )
            })?
            .map_err(collective_err(self.rank, what))?;
        Ok(out.map(|t| Tensor::from_primitive(TensorPrimitive::Float(t))))
    }

    fn barrier(&mut self) -> Result<(), DistError> {
        let timeout = self.timeout * IO_BARRIER_FACTOR;
        self.sum_within(
            "barrier after rank 0's checkpoint / evaluation",
            &[0.0],
            timeout,
        )?;
        Ok(())
    }
    fn sum_labeled(
        &mut self,
        what: &'static str,
        values: &[f32],
        long: bool,
    ) -> Result<Vec<f32>, DistError> {
        let timeout = if long {
            self.timeout * IO_BARRIER_FACTOR
        } else {
            self.timeout
        };
        self.sum_within(what, values, timeout)
    }

    fn finish(&mut self) -> Result<(), DistError> {
        let peer = self.peer;
        self.comm
            .call("finish", self.timeout.min(FINISH_TIMEOUT), move || {
                finish_collective::<B::InnerBackend>(peer)
            })?
            .map_err(collective_err(self.rank, "finish"))
    }
}

/// The owner rank of every parameter (`LladaModel::params` order) for `sharding` over
/// `world` ranks ([`crate::optim::partition`]); `None` without sharding or with one rank.
pub fn owners<B: Backend>(
    model: &LladaModel<B>,
    world: usize,
    sharding: crate::recipe::Sharding,
) -> Option<Vec<usize>> {
    if world <= 1 || sharding == crate::recipe::Sharding::None {
        return None;
    }
    let numels: Vec<usize> = optim::param_infos(model)
        .iter()
        .map(optim::ParamInfo::numel)
        .collect();
    Some(optim::partition(&numels, world))
}

/// Consecutive runs of `items` (indices into `infos`) of at most [`BUCKET_ELEMS`] elements
/// (at least one item each).
fn buckets(infos: &[optim::ParamInfo], items: &[usize]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![];
    let mut elems = 0;
    for &i in items {
        let n = infos[i].numel();
        match out.last_mut() {
            Some(b) if elems + n <= BUCKET_ELEMS => {
                b.push(i);
                elems += n;
            }
            _ => {
                out.push(vec![i]);
                elems = n;
            }
        }
    }
    out
}

fn flat_grad<B: AutodiffBackend>(
    grads: &mut GradientsParams,
    info: &optim::ParamInfo,
) -> Option<Tensor<B::InnerBackend, 1>> {
    if info.dims.len() == 2 {
        grads
            .remove::<B::InnerBackend, 2>(info.id)
            .map(|g| g.reshape([info.numel()]))
    } else {
        grads.remove::<B::InnerBackend, 1>(info.id)
    }
}

/// ZeRO stage 2: the mean over ranks of every gradient, kept by the parameter's owner only
/// (`owners`, from [`owners`]); the other ranks drop theirs. One `burn_collective::reduce`
/// (mean, to the owner) per bucket of one owner's parameters, in `params` order. As
/// [`GradReducer::mean_grads`], a parameter without a gradient on some ranks counts as zeros
/// there, one without a gradient on every rank gets none.
///
/// # Errors
/// Collective errors.
pub fn reduce_grads_to_owners<B: AutodiffBackend>(
    reducer: &mut dyn GradReducer<B>,
    model: &LladaModel<B>,
    mut grads: GradientsParams,
    owners: &[usize],
) -> Result<GradientsParams, DistError> {
    let infos = optim::param_infos(model);
    let present: Vec<f32> = infos
        .iter()
        .map(|i| {
            let has = if i.dims.len() == 2 {
                grads.get::<B::InnerBackend, 2>(i.id).is_some()
            } else {
                grads.get::<B::InnerBackend, 1>(i.id).is_some()
            };
            f32::from(u8::from(has))
        })
        .collect();
    let present = reducer.sum_labeled("gradient presence all-reduce", &present, false)?;
    let rank = reducer.rank();
    let mut out = GradientsParams::new();
    for owner in 0..reducer.world() {
        let items: Vec<usize> = (0..infos.len())
            .filter(|&i| owners[i] == owner && present[i] > 0.0)
            .collect();
        for (k, bucket) in buckets(&infos, &items).into_iter().enumerate() {
            let device = model.wte.weight.val().inner().device();
            let flat: Vec<Tensor<B::InnerBackend, 1>> = bucket
                .iter()
                .map(|&i| {
                    flat_grad::<B>(&mut grads, &infos[i])
                        .unwrap_or_else(|| Tensor::zeros([infos[i].numel()], &device))
                })
                .collect();
            let what = format!("gradient reduce to rank {owner} (bucket {k})");
            let reduced = reducer.reduce_mean_to(&what, Tensor::cat(flat, 0), owner)?;
            if let Some(reduced) = reduced.filter(|_| owner == rank) {
                let mut off = 0;
                for &i in &bucket {
                    let info = &infos[i];
                    let g = reduced.clone().slice(off..off + info.numel());
                    off += info.numel();
                    if info.dims.len() == 2 {
                        out.register(info.id, g.reshape([info.dims[0], info.dims[1]]));
                    } else {
                        out.register(info.id, g);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Every parameter's squared gradient norm ([`optim::grad_sq_norms`]) gathered from the
/// owners (each rank fills the slots of the parameters it owns; a sum is an exact
/// all-gather), so that [`optim::global_norm`] gives the same number on every rank and as
/// without sharding. A slot is `None` where the owner has no gradient.
///
/// # Errors
/// Collective errors.
pub fn gather_sq_norms<B: AutodiffBackend>(
    reducer: &mut dyn GradReducer<B>,
    model: &LladaModel<B>,
    grads: &GradientsParams,
    owners: &[usize],
) -> Result<Vec<Option<f32>>, DistError> {
    let rank = reducer.rank();
    let mine = optim::grad_sq_norms(model, grads);
    // two slots per parameter: presence and value
    let mut v = vec![0f32; 2 * mine.len()];
    for (i, s) in mine.iter().enumerate() {
        if owners[i] == rank
            && let Some(s) = s
        {
            v[2 * i] = 1.0;
            v[2 * i + 1] = *s;
        }
    }
    let all = reducer.sum_labeled("gradient norm all-gather", &v, false)?;
    Ok((0..mine.len())
        .map(|i| (all[2 * i] > 0.0).then_some(all[2 * i + 1]))
        .collect())
}

/// ZeRO: every parameter's value broadcast from its owner (after the owner's update), one
/// `burn_collective::broadcast` per bucket of one owner's parameters; bit-exact copies, so
/// the replicas stay identical.
///
/// # Errors
/// Collective errors.
pub fn broadcast_params<B: AutodiffBackend>(
    reducer: &mut dyn GradReducer<B>,
    model: LladaModel<B>,
    owners: &[usize],
) -> Result<LladaModel<B>, DistError> {
    let infos = optim::param_infos(&model);
    let rank = reducer.rank();
    let mut values = std::collections::HashMap::new();
    {
        let params = model.params();
        let flat = |i: usize| -> Tensor<B::InnerBackend, 1> {
            let info = &infos[i];
            match params[i].1 {
                ParamRef::Linear(w) | ParamRef::Matrix(w) => {
                    w.val().inner().reshape([info.numel()])
                }
                ParamRef::Vector(w) => w.val().inner(),
            }
        };
        for owner in 0..reducer.world() {
            let items: Vec<usize> = (0..infos.len()).filter(|&i| owners[i] == owner).collect();
            for (k, bucket) in buckets(&infos, &items).into_iter().enumerate() {
                let send = (owner == rank)
                    .then(|| Tensor::cat(bucket.iter().map(|&i| flat(i)).collect(), 0));
                let what = format!("parameter broadcast from rank {owner} (bucket {k})");
                let len = bucket.iter().map(|&i| infos[i].numel()).sum();
                let got = reducer.broadcast_flat(&what, send, owner, len, model.dtype())?;
                if owner == rank && !reducer.replaces_root_copy() {
                    continue;
                }
                let mut off = 0;
                for &i in &bucket {
                    let n = infos[i].numel();
                    values.insert(infos[i].id, got.clone().slice(off..off + n));
                    off += n;
                }
            }
        }
    }
    Ok(optim::write_params(model, values))
}

/// The consolidated optimizer state of a sharded run, for rank 0's checkpoint: every
/// parameter's state (moments, step count, master weights) broadcast from its owner, one
/// parameter at a time (a bit-exact copy; every rank takes part, rank 0 keeps the result,
/// the others return their own shard unchanged).
///
/// # Errors
/// Collective errors.
pub fn gather_optimizer<B: AutodiffBackend>(
    reducer: &mut dyn GradReducer<B>,
    optim: &optim::AdamW<B>,
    model: &LladaModel<B>,
    owners: &[usize],
) -> Result<optim::AdamW<B>, DistError> {
    let infos = optim::param_infos(model);
    let rank = reducer.rank();
    // which parameters have state, their step counts and whether a master copy exists
    let mut v = vec![0f32; 3 * infos.len()];
    for (i, info) in infos.iter().enumerate() {
        if owners[i] == rank
            && let Some(s) = optim.state(&info.name)
        {
            v[3 * i] = 1.0;
            v[3 * i + 1] = s.time as f32;
            v[3 * i + 2] = f32::from(u8::from(s.master.is_some()));
        }
    }
    let meta = reducer.sum_labeled("optimizer state gather", &v, false)?;
    let mut full = optim.clone();
    full.set_owned(None);
    for (i, info) in infos.iter().enumerate() {
        if meta[3 * i] == 0.0 {
            continue;
        }
        let n = info.numel();
        let parts = if meta[3 * i + 2] > 0.0 { 3 } else { 2 };
        let send = (owners[i] == rank).then(|| {
            let s = optim.state(&info.name).expect("owner has the state");
            let mut ts = vec![
                s.exp_avg.clone().cast(burn::tensor::DType::F32),
                s.exp_avg_sq.clone().cast(burn::tensor::DType::F32),
            ];
            if let Some(m) = &s.master {
                ts.push(m.clone());
            }
            Tensor::cat(ts, 0)
        });
        let dtype = optim
            .state(&info.name)
            .map(|s| s.exp_avg.dtype())
            .unwrap_or_else(|| state_dtype(optim, model));
        let got = reducer.broadcast_flat(
            &format!("optimizer state gather ({})", info.name),
            send,
            owners[i],
            parts * n,
            burn::tensor::DType::F32,
        )?;
        if rank == 0 && owners[i] != 0 {
            let part = |k: usize| got.clone().slice(k * n..(k + 1) * n);
            full.set_state(
                &info.name,
                Some(optim::ParamState {
                    time: meta[3 * i + 1] as usize,
                    exp_avg: part(0).cast(dtype),
                    exp_avg_sq: part(1).cast(dtype),
                    master: (parts == 3).then(|| part(2)),
                }),
            );
        }
    }
    Ok(full)
}

/// The dtype AdamW keeps its moments in for `model` (see [`optim::Precision`]).
fn state_dtype<B: AutodiffBackend>(
    optim: &optim::AdamW<B>,
    model: &LladaModel<B>,
) -> burn::tensor::DType {
    let d = model.dtype();
    if d != burn::tensor::DType::F32 && optim.precision() != optim::Precision::Plain {
        burn::tensor::DType::F32
    } else {
        d
    }
}

/// Deadline of leaving the collective at the end of a run.
const FINISH_TIMEOUT: Duration = Duration::from_secs(20);

/// The end of a data-parallel run on every rank: a last replica check (a collective call, so
/// every rank has finished training and rank 0 its last checkpoint when it returns), then
/// leave the collective. Leaving can fail without loss: the node that hosts the global
/// orchestrator may exit before another node's unregistration reaches it (burn-collective
/// 0.21 then panics in its websocket handler, or never answers); that is logged as a
/// warning, not returned.
///
/// # Errors
/// [`DistError::Diverged`] and the collective errors of the replica check.
pub fn end_run<B: AutodiffBackend>(
    reducer: &mut dyn GradReducer<B>,
    model: &LladaModel<B>,
    step: u64,
) -> Result<(), DistError> {
    check_replicas(reducer, model, step)?;
    if let Err(e) = reducer.finish() {
        let why = match &e {
            DistError::Timeout { secs, .. } => format!("no answer within {secs} s"),
            DistError::Aborted { .. } => {
                "another worker of this node could not leave it either".to_string()
            }
            other => other.to_string(),
        };
        tracing::warn!(
            "rank {}: leaving the collective after the run did not complete cleanly ({why}); nothing is lost: training and checkpoints are complete",
            reducer.rank()
        );
    }
    Ok(())
}

/// Hash (SipHash with fixed keys) of every parameter's bytes, in `LladaModel::params` order.
/// Identical replicas give identical hashes; any differing bit changes it.
pub fn param_hash<B: Backend>(model: &LladaModel<B>) -> u64 {
    let mut h = DefaultHasher::new();
    for (name, p) in model.params() {
        h.write(name.as_bytes());
        let data = match p {
            ParamRef::Linear(w) | ParamRef::Matrix(w) => w.val().into_data(),
            ParamRef::Vector(w) => w.val().into_data(),
        };
        h.write(data.as_bytes());
    }
    h.finish()
}

/// Gather every rank's [`param_hash`] (an all-gather through a sum: rank `r` fills slots
/// `4r..4r+4` with its hash in 16-bit pieces, exact in f32) and compare.
///
/// # Errors
/// [`DistError::Diverged`] when any rank differs from rank 0; collective errors.
pub fn check_replicas<B: AutodiffBackend>(
    reducer: &mut dyn GradReducer<B>,
    model: &LladaModel<B>,
    step: u64,
) -> Result<(), DistError> {
    if reducer.world() == 1 {
        return Ok(());
    }
    let hashes = gather_u64(reducer, "replica hash check", param_hash(model))?;
    if hashes.iter().any(|h| *h != hashes[0]) {
        return Err(DistError::Diverged {
            step,
            hashes: hashes.iter().map(|h| format!("{h:#018x}")).collect(),
            reference: hashes[0],
        });
    }
    Ok(())
}

/// Every rank's `value` (an all-gather through a sum: rank `r` fills slots `4r..4r+4` with
/// `value` in 16-bit pieces, exact in f32), in rank order.
fn gather_u64<B: AutodiffBackend>(
    reducer: &mut dyn GradReducer<B>,
    what: &'static str,
    value: u64,
) -> Result<Vec<u64>, DistError> {
    let world = reducer.world();
    let mut v = vec![0f32; 4 * world];
    for k in 0..4 {
        v[4 * reducer.rank() + k] = ((value >> (16 * k)) & 0xffff) as f32;
    }
    let all = reducer.sum_labeled(what, &v, false)?;
    Ok((0..world)
        .map(|r| (0..4).fold(0u64, |h, k| h | ((all[4 * r + k] as u64) << (16 * k))))
        .collect())
}

/// Keys whose string values are node-local places (files, folders, repos, URLs), left out of
/// [`config_sections`]: nodes may mount the same data at different paths.
const PLACE_KEYS: &[&str] = &[
    "path",
    "paths",
    "output_dir",
    "data_root",
    "image_root",
    "cache_dir",
    "codes",
    "checkpoint",
    "manifest",
    "hf_repo",
    "url",
    "device",
];

/// FNV-1a, 64 bit: a hash that is the same on every build and platform.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn strip_places(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|k, x| {
                !(PLACE_KEYS.contains(&k.as_str())
                    && (x.is_string()
                        || x.as_array()
                            .is_some_and(|a| a.iter().all(serde_json::Value::is_string))))
            });
            for x in m.values_mut() {
                strip_places(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_places),
        _ => {}
    }
}

/// What every rank must agree on, as `(section, hash)`: each top-level section of the
/// resolved recipe (its JSON form) without node-local places (string values of
/// [`PLACE_KEYS`]: paths, folders, repos, URLs, `train.device`) and without `logging`
/// (rank 0 alone logs), plus `--check-every` (it changes the sequence of collective calls).
/// The hash is FNV-1a of the JSON text, stable across builds.
pub fn config_sections(recipe: &serde_json::Value, check_every: u64) -> Vec<(String, u64)> {
    let mut out = vec![];
    if let Some(m) = recipe.as_object() {
        for (k, v) in m {
            if k == "logging" {
                continue;
            }
            let mut v = v.clone();
            strip_places(&mut v);
            out.push((k.clone(), fnv1a(v.to_string().as_bytes())));
        }
    }
    out.push(("--check-every".into(), check_every));
    out
}

/// Start-of-run checks: every node has the same number of devices, every rank starts (or
/// resumes) at the same step with the same recipe and flags (`config`, see
/// [`config_sections`]),
/// and the replicas are identical.
///
/// # Errors
/// [`DistError::Config`] naming the mismatch; [`DistError::Diverged`].
pub fn check_start<B: AutodiffBackend>(
    reducer: &mut dyn GradReducer<B>,
    model: &LladaModel<B>,
    step: u64,
    config: &[(String, u64)],
) -> Result<(), DistError> {
    let world = reducer.world();
    // the step in 12-bit pieces, so the f32 sums stay exact (world < 4096) for any step; when
    // the ranks' steps differ, the rank with the smallest one sees a sum above its own × world
    let (hi, lo) = (step >> 12, step & 0xfff);
    let v = reducer.sum(&[1.0, hi as f32, lo as f32])?;
    if v[0] as usize != world {
        return Err(DistError::Config(format!(
            "{} ranks joined but this node expected {world}: every node must use the same number of devices",
            v[0]
        )));
    }
    if v[1] != (hi * world as u64) as f32 || v[2] != (lo * world as u64) as f32 {
        return Err(DistError::Config(format!(
            "ranks start from different steps (this rank: {step}, mean {}): every node must see the same run directory (shared file system) and the same --resume",
            (v[1] * 4096.0 + v[2]) / world as f32
        )));
    }
    let mut differ: Vec<String> = vec![];
    for (section, hash) in config {
        let all = gather_u64(reducer, "recipe check", *hash)?;
        if all.iter().any(|h| h != &all[0]) {
            let ranks: Vec<usize> = (0..world).filter(|&r| all[r] != all[0]).collect();
            differ.push(format!("`{section}` (ranks {ranks:?} differ from rank 0)"));
        }
    }
    if !differ.is_empty() {
        return Err(DistError::Config(format!(
            "the nodes run different recipes or flags: {}. Every node must use the same recipe, --set overrides and --check-every (paths, folders, logging and train.device may differ); compare `mmada-train … --print-config` on the nodes",
            differ.join(", ")
        )));
    }
    check_replicas(reducer, model, step)
}

/// All-gather of per-item rows through one sum: every rank writes the rows of the items it
/// owns (`width` values each) at their global indices of a zero `[n_items, width]` table, and
/// the element-wise sum over ranks is the full table on every rank (exact: `x + 0 = x`, so
/// each item must be owned by exactly one rank). Used by UniGRPO to gather rewards and
/// completion lengths of the prompt groups that other ranks rolled out; waits up to the
/// [`GradReducer::barrier`] deadline (the ranks arrive after uneven rollout and reward work).
///
/// # Errors
/// [`DistError::Config`] when a row has the wrong width or an index is out of range;
/// collective errors.
pub fn gather_rows<B: AutodiffBackend>(
    reducer: &mut dyn GradReducer<B>,
    n_items: usize,
    width: usize,
    rows: &[(usize, Vec<f32>)],
) -> Result<Vec<f32>, DistError> {
    let mut table = vec![0f32; n_items * width];
    for (i, row) in rows {
        if *i >= n_items || row.len() != width {
            return Err(DistError::Config(format!(
                "gather_rows: item {i} with {} values does not fit a [{n_items}, {width}] table",
                row.len()
            )));
        }
        table[i * width..(i + 1) * width].copy_from_slice(row);
    }
    if reducer.world() == 1 || table.is_empty() {
        return Ok(table);
    }
    // after rollouts and reward models, which take uneven time per rank: the long deadline
    reducer.sum_labeled("reward gather", &table, true)
}

/// One worker's place in the job: the values a training loop needs.
pub struct Worker<B: AutodiffBackend> {
    /// The device of this replica.
    pub device: B::Device,
    /// Gradient / metric averaging.
    pub reducer: Box<dyn GradReducer<B>>,
    /// Replica hash check period (0: start and end only).
    pub check_every: u64,
}

impl<B: AutodiffBackend> Worker<B> {
    /// A 1-device worker.
    pub fn single(device: B::Device) -> Self {
        Worker {
            device,
            reducer: Box::new(SingleDevice),
            check_every: 0,
        }
    }

    /// Global rank.
    pub fn rank(&self) -> usize {
        self.reducer.rank()
    }

    /// World size.
    pub fn world(&self) -> usize {
        self.reducer.world()
    }
}

/// One collective session per process at a time (burn-collective keeps one server per
/// backend type in a global).
static SESSION: Mutex<()> = Mutex::new(());

/// The environment variable holding the run's shared token (the same on every node; never
/// logged): every websocket of the run (orchestrator, tensor services) refuses a peer that
/// does not present it.
pub const RUN_TOKEN_VAR: &str = "MMADA_RUN_TOKEN";

/// Whether `host` names this machine's loopback interface.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Multi-node endpoints of this process (vendor/PATCHED.md item 6): bind to this node's own
/// address (`node_host`; on node rank 0 hosting the orchestrator, the coordinator host too, so
/// both must be the same or the bind falls back to all interfaces) instead of `0.0.0.0`, and
/// require the shared token of [`RUN_TOKEN_VAR`] when it is set (a warning when it is not and
/// the run leaves loopback).
pub fn secure_endpoints(cfg: &DistConfig, coordinator_host: &str, node_host: &str) {
    let bind = if cfg.node_rank == 0 && cfg.host_orchestrator && node_host != coordinator_host {
        tracing::warn!(
            "node rank 0 hosts the orchestrator at {coordinator_host} and its tensor service at {node_host}: binding both to all interfaces"
        );
        None
    } else {
        Some(node_host.to_string())
    };
    burn_communication::websocket::set_bind_host(bind);
    let token = std::env::var(RUN_TOKEN_VAR).ok().filter(|t| !t.is_empty());
    if token.is_none() && !(is_loopback(coordinator_host) && is_loopback(node_host)) {
        tracing::warn!(
            "multi-node endpoints are not authenticated: set {RUN_TOKEN_VAR} to the same secret on every node"
        );
    }
    burn_communication::websocket::set_auth_token(token);
}

/// Start burn-collective's global orchestrator on `port` (all interfaces) in a background
/// thread with its own tokio runtime. It lives until the process exits.
///
/// # Errors
/// [`DistError::Config`] when the runtime cannot be built.
pub fn start_orchestrator(port: u16) -> Result<(), DistError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| DistError::Config(format!("starting the orchestrator runtime: {e}")))?;
    std::thread::Builder::new()
        .name("mmada-orchestrator".into())
        .spawn(move || rt.block_on(burn_collective::start_global_orchestrator(port)))
        .map_err(|e| DistError::Config(format!("starting the orchestrator thread: {e}")))?;
    Ok(())
}

/// Run one worker per device of this node and return rank 0's (local rank 0's) result.
///
/// Local rank 0 runs `first` on the calling thread (it may hold non-`Send` callbacks, e.g. a
/// progress bar); the other local ranks run `rest` on scoped threads. With one device on one
/// node no collective is set up and `first` gets a [`SingleDevice`] worker. When any worker
/// fails, the node's abort flag stops the others; the first non-abort error is returned.
///
/// # Errors
/// `E` from a worker, or [`DistError`] (converted) from the setup.
pub fn launch<B, T, E>(
    devices: &[B::Device],
    inner_devices: &[burn::tensor::Device<B::InnerBackend>],
    cfg: &DistConfig,
    first: impl FnOnce(Worker<B>) -> Result<T, E>,
    rest: impl Fn(Worker<B>) -> Result<T, E> + Sync,
) -> Result<T, E>
where
    B: AutodiffBackend,
    E: From<DistError> + std::fmt::Display + Send,
    T: Send,
{
    let coord = cfg.validate()?;
    let local = devices.len();
    if local == 0 || inner_devices.len() != local {
        return Err(DistError::Config("no device given".into()).into());
    }
    if cfg.nodes == 1 && local == 1 {
        return first(Worker::single(devices[0].clone()));
    }
    let _guard = SESSION.lock().unwrap_or_else(|p| p.into_inner());
    reset_collective::<B::InnerBackend>();
    let world = cfg.nodes * local;
    let mut config = CollectiveConfig::default()
        .with_num_devices(local)
        .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2));
    if let Some((host, port)) = &coord {
        let node_host = cfg.node_host.clone().unwrap_or_else(|| host.clone());
        let data_port = cfg
            .data_port
            .unwrap_or(port.wrapping_add(1 + cfg.node_rank as u16));
        secure_endpoints(cfg, host, &node_host);
        if cfg.node_rank == 0 && cfg.host_orchestrator {
            start_orchestrator(*port)?;
        }
        let parse = |s: String| -> Result<burn_communication::Address, DistError> {
            s.parse()
                .map_err(|e| DistError::Config(format!("address `{s}`: {e}")))
        };
        config = config
            .with_num_nodes(cfg.nodes as u32)
            .with_global_address(parse(format!("ws://{host}:{port}"))?)
            .with_node_address(parse(format!("ws://{node_host}:{data_port}"))?)
            .with_data_service_port(data_port)
            .with_global_all_reduce_strategy(AllReduceStrategy::Ring);
    }
    let abort = Arc::new(AtomicBool::new(false));
    let make = |i: usize| -> Result<Worker<B>, DistError> {
        let rank = cfg.node_rank * local + i;
        let r = CollectiveReducer::<B>::register(
            rank,
            world,
            inner_devices[i].clone(),
            config.clone(),
            cfg.timeout,
            abort.clone(),
        )?
        .with_global(cfg.nodes > 1);
        Ok(Worker {
            device: devices[i].clone(),
            reducer: Box::new(r),
            check_every: cfg.check_every,
        })
    };
    let guard_abort = |r: Result<T, E>| {
        if r.is_err() {
            abort.store(true, Ordering::SeqCst);
        }
        r
    };
    let hosts_orchestrator = coord.is_some() && cfg.node_rank == 0 && cfg.host_orchestrator;
    let result = std::thread::scope(|s| {
        let handles: Vec<_> = (1..local)
            .map(|i| {
                let (make, rest, guard_abort) = (&make, &rest, &guard_abort);
                s.spawn(move || {
                    guard_abort(match make(i) {
                        Ok(w) => rest(w),
                        Err(e) => Err(e.into()),
                    })
                })
            })
            .collect();
        let r0 = guard_abort(match make(0) {
            Ok(w) => first(w),
            Err(e) => Err(e.into()),
        });
        let mut errors: Vec<E> = vec![];
        for (i, h) in handles.into_iter().enumerate() {
            match h.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => errors.push(e),
                Err(p) => {
                    abort.store(true, Ordering::SeqCst);
                    let message = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    errors.push(
                        DistError::Panicked {
                            rank: cfg.node_rank * local + i + 1,
                            message,
                        }
                        .into(),
                    );
                }
            }
        }
        match r0 {
            Ok(t) if errors.is_empty() => Ok(t),
            Ok(_) => Err(pick_error(errors)),
            Err(e) => {
                errors.insert(0, e);
                Err(pick_error(errors))
            }
        }
    });
    if hosts_orchestrator && result.is_ok() {
        // keep the in-process orchestrator up while the other nodes unregister (their
        // `finish` reaches it just after ours; see `end_run`)
        std::thread::sleep(ORCHESTRATOR_GRACE);
    }
    result
}

/// How long node rank 0 keeps its in-process orchestrator after a successful run.
const ORCHESTRATOR_GRACE: Duration = Duration::from_secs(3);

/// The root cause among worker errors: the first that is not "stopped because another
/// worker failed".
fn pick_error<E: std::fmt::Display>(mut errors: Vec<E>) -> E {
    let i = errors
        .iter()
        .position(|e| {
            !e.to_string()
                .contains("because another worker of this node failed")
        })
        .unwrap_or(0);
    errors.swap_remove(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_sections_ignore_places_and_logging_only() {
        let a = serde_json::json!({
            "run": {"name": "x", "output_dir": "/scratch/a/runs", "seed": 3},
            "model": {"checkpoint": "/a/ckpt", "dtype": "f32"},
            "data": {"lm": {"batch_size": 2, "sources": [{"path": "/a/d.jsonl", "weight": 1.0}]}},
            "optimizer": {"lr": 1e-3},
            "train": {"device": "cuda:0,1", "max_steps": 5},
            "logging": {"wandb": {"project": "p"}},
        });
        let mut b = a.clone();
        b["run"]["output_dir"] = "./runs".into();
        b["model"]["checkpoint"] = "/b/ckpt".into();
        b["data"]["lm"]["sources"][0]["path"] = "/b/d.jsonl".into();
        b["train"]["device"] = "cuda:2,3".into();
        b["logging"] = serde_json::json!({});
        assert_eq!(config_sections(&a, 50), config_sections(&b, 50));
        let names: Vec<String> = config_sections(&a, 50).into_iter().map(|x| x.0).collect();
        assert_eq!(
            names,
            [
                "data",
                "model",
                "optimizer",
                "run",
                "train",
                "--check-every"
            ]
        );
        let mut c = a.clone();
        c["optimizer"]["lr"] = 2e-3.into();
        let differ: Vec<String> = config_sections(&a, 50)
            .into_iter()
            .zip(config_sections(&c, 10))
            .filter(|(x, y)| x != y)
            .map(|(x, _)| x.0)
            .collect();
        assert_eq!(differ, ["optimizer", "--check-every"]);
        let mut d = a.clone();
        d["data"]["lm"]["batch_size"] = 4.into();
        assert_ne!(config_sections(&a, 50)[0], config_sections(&d, 50)[0]);
    }

    #[test]
    fn world_size_and_rank_count_processes() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.to_string())
            }
        };
        let d = DistConfig::default;
        // the case: a single-node run inheriting WORLD_SIZE=2 RANK=0 fails at once
        let e = d()
            .with_vars(false, false, env(&[("WORLD_SIZE", "2"), ("RANK", "0")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("WORLD_SIZE=2") && e.contains("1 node(s)") && e.contains("--nodes"),
            "{e}"
        );
        // node counts come from NNODES / NODE_RANK (or GROUP_RANK), WORLD_SIZE / RANK agree
        let c = d()
            .with_vars(
                false,
                false,
                env(&[
                    ("NNODES", "2"),
                    ("GROUP_RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("RANK", "1"),
                    ("LOCAL_WORLD_SIZE", "1"),
                    ("MASTER_ADDR", "10.0.0.1"),
                    ("MASTER_PORT", "29500"),
                ]),
            )
            .unwrap();
        assert_eq!((c.nodes, c.node_rank), (2, 1));
        assert_eq!(c.coordinator.as_deref(), Some("10.0.0.1:29500"));
        // flags win over NNODES; a disagreeing RANK names its source
        let c = DistConfig {
            nodes: 2,
            node_rank: 0,
            ..d()
        };
        let e = c
            .with_vars(
                true,
                true,
                env(&[("NNODES", "4"), ("WORLD_SIZE", "2"), ("RANK", "1")]),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=1") && e.contains("--node-rank"), "{e}");
        // torchrun with several processes per node
        let e = d()
            .with_vars(false, false, env(&[("LOCAL_WORLD_SIZE", "8")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("LOCAL_WORLD_SIZE=8"), "{e}");
        // no variables: one node
        let c = d().with_vars(false, false, |_| None).unwrap();
        assert_eq!((c.nodes, c.node_rank), (1, 0));
        let e = d()
            .with_vars(false, false, env(&[("NNODES", "two")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("NNODES=`two`"), "{e}");
    }

    #[test]
    fn config_errors_name_the_flag() {
        let c = DistConfig {
            nodes: 2,
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--coordinator")
        );
        let c = DistConfig {
            nodes: 2,
            node_rank: 2,
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--node-rank 2")
        );
        let c = DistConfig {
            nodes: 2,
            coordinator: Some("10.0.0.1:29500".into()),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap(), Some(("10.0.0.1".into(), 29500)));
        let c = DistConfig { node_rank: 1, ..c };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--node-host")
        );
        let c = DistConfig {
            node_host: Some("10.0.0.2".into()),
            ..c
        };
        assert!(c.validate().is_ok());
        let c = DistConfig {
            nodes: 2,
            coordinator: Some("10.0.0.1".into()),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("HOST:PORT"));
    }
}
