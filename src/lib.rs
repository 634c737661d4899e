//! Sluice: a fair, multi-tenant query scheduler.
