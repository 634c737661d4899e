//! Sluice client library: the frontend client and the querier worker library.

pub mod tls;
