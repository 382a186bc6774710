//! ctdrop: which packets the connection tracker dropped, for which flows, why.
pub mod advice;
pub mod capture;
pub mod cause;
pub mod check;
pub mod cli;
pub mod conntrack;
pub mod counting;
pub mod demo;
pub mod events;
pub mod filter;
pub mod flows;
pub mod kernel;
pub mod output;
pub mod session;
pub mod summary;
pub mod probe;
pub mod report;
