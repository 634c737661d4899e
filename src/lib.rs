//! Sluice: a fair, multi-tenant query scheduler.

pub mod queue;
pub mod sim;
