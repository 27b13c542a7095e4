//! Host-memory pieces of the CPU training step (issue 18), kept in one small crate that the
//! dev profile builds optimised (`[profile.dev.package.mmada-host]` in the workspace
//! `Cargo.toml`: the tests, the benches and the quickstart run in that profile, where our
//! other crates build at `opt-level = 1`):
//!
//! * [`alloc::BlockCache`]: a global allocator that serves large blocks (≥ 1 MiB) from the
//!   kernel and keeps them for reuse, so that the step's big tensor buffers are neither page
//!   faulted in again at every step nor left stranded in a fragmented heap;
//! * [`adamw`]: the f32 AdamW update as one pass over the parameter, gradient and moment
//!   buffers;
//! * [`xent`]: the LM head's log-softmax, target gather and cross-entropy gradient as one
//!   pass over a chunk of logits.

pub mod adamw;
pub mod alloc;
pub mod xent;
