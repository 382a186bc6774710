//! What the running kernel offers: BTF facts, capabilities, program attachment.
pub mod btf;
