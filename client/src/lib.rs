//! Sluice client library (frontend client and querier worker library): filled by a later change.
