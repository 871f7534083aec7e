//! smaq_rs: compresses deep-learning tensors into real packed bytes.
//!
//! Layers, top to bottom (nothing lower uses anything higher):
//! - [`python`] (feature `python`): the PyO3 glue, the only place that knows about Python;
//! - [`optim`], [`zmap`]: fused optimizer steps and zero maps over packed tensors;
//! - [`sparse`]: CSR weights and the forward and backward products of sparse Linear layers;
//! - [`format`]: the packed tensor byte format and the checkpoint container (docs/FORMAT.md);
//! - [`codec`]: the encoders (SmaQ, ...) and their registry;
//! - [`bits`], [`buf`], [`stats`], [`rng`], [`le`], [`dtype`], [`pool`], [`simd`], [`error`]: primitives.
//!
//! docs/DESIGN.md has the layers, where each concern lives and how to add a codec.
//!
//! ```
//! use smaq_rs::{codec::Params, dtype::Data, format::Packed};
//! let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
//! let packed = Packed::encode(Data::F32(&x), &[10, 100], "smaq", &Params::new()).unwrap();
//! assert!(packed.nbytes() < x.len() * 4 / 3); // about 6.6 bits per value plus a small header
//! let back = Packed::from_bytes(packed.to_vec()).unwrap().decode().unwrap();
//! ```

pub mod bits;
pub mod buf;
pub mod codec;
pub mod dtype;
pub mod error;
pub mod format;
pub mod le;
pub mod optim;
pub mod pool;
pub mod rng;
pub mod simd;
pub mod sparse;
pub mod stats;
pub mod zmap;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
