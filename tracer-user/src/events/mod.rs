//! Records from the kernel, decoded into typed values.
pub mod decode;
pub mod ring;

pub use decode::{decode, CtFill, CtRef, DecodeError, DropEvent, Flow, Icmp};
