//! Sluice: a fair, multi-tenant query scheduler.

pub mod bench;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod queue;
pub mod server;
pub mod sim;
pub mod tls;
