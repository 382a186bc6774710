//! What the running kernel offers: BTF facts, capabilities, program attachment.
pub mod attach;
pub mod btf;
pub mod capabilities;
pub mod cpustat;
pub mod nfhook;
pub mod tier;
