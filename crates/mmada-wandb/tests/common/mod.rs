//! The loopback fake wandb server and test helpers now live in `mmada_wandb::testing`
//! (feature `test-support`, enabled for this crate's tests through its dev-dependency on
//! itself) so that trainer tests in other crates can use them too.
#![allow(unused_imports)]

pub use mmada_wandb::testing::*;
