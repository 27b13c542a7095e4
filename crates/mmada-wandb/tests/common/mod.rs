//! The loopback fake wandb server and test helpers live in `mmada_wandb::testing` (always
//! compiled) so that trainer tests in other crates can use them too.
#![allow(unused_imports)]

pub use mmada_wandb::testing::*;
