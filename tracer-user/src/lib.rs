//! ctdrop: which packets the connection tracker dropped, for which flows, why.
pub mod kernel;
