//! Size limits shared by both ends of a connection.

use crate::{Enqueue, InvalidRequest};

/// Longest id (frontend, querier, scheduler) and longest name in an address a peer may
/// announce, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Most workers one querier runs on one dequeue stream; a `Ready` naming a worker at or
/// above it closes the connection.
pub const MAX_WORKERS_PER_STREAM: u16 = 1024;

/// Most worker slots one worker loop may have ([`QuerierToScheduler::LoopSlots`](crate::QuerierToScheduler::LoopSlots));
/// a larger group, or none, closes the connection.
pub const MAX_SLOTS_PER_LOOP: u8 = 16;

/// The largest frame any peer may be configured to accept: 64 MiB.
pub const HARD_MAX_FRAME_LEN: u32 = 64 * 1024 * 1024;

/// The smallest frame limit any peer may be configured with: 64 KiB. Every frame the
/// protocol needs whatever the query (a whole result of up to 16 KiB with its head, a
/// handler's error message cut to 16 KiB, a hello) fits in it.
pub const MIN_FRAME_LEN: u32 = 64 * 1024;

/// Whether a peer may use `max_frame_len` as its frame limit: between [`MIN_FRAME_LEN`] and
/// [`HARD_MAX_FRAME_LEN`]. The one rule a scheduler's settings, a client's configuration and
/// a frontend's announced result endpoint are all held to.
pub fn frame_limit_allowed(max_frame_len: u32) -> bool {
    (MIN_FRAME_LEN..=HARD_MAX_FRAME_LEN).contains(&max_frame_len)
}

/// Bounds on frames and on the fields of an [`Enqueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame body (excluding the 4-byte length prefix) accepted or produced.
    pub max_frame_len: u32,
    /// Longest tenant name, in bytes.
    pub max_tenant_len: usize,
    /// Deepest actor path below the tenant.
    pub max_actor_depth: usize,
    /// Longest single actor name, in bytes.
    pub max_actor_len: usize,
    /// Longest component name, in bytes.
    pub max_component_len: usize,
    /// Most metadata entries on one query.
    pub max_metadata_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_len: 8 * 1024 * 1024,
            max_tenant_len: 256,
            max_actor_depth: 8,
            max_actor_len: 256,
            max_component_len: 64,
            max_metadata_entries: 64,
        }
    }
}

impl Enqueue {
    /// Checks the request's fields against `limits`; the first rule broken is returned.
    pub fn validate(&self, limits: &Limits) -> Result<(), InvalidRequest> {
        if self.tenant.is_empty() {
            return Err(InvalidRequest::EmptyTenant);
        }
        if self.tenant.len() > limits.max_tenant_len {
            return Err(InvalidRequest::TenantTooLong {
                len: self.tenant.len(),
                max: limits.max_tenant_len,
            });
        }
        if self.actors.len() > limits.max_actor_depth {
            return Err(InvalidRequest::ActorPathTooDeep {
                depth: self.actors.len(),
                max: limits.max_actor_depth,
            });
        }
        for (level, actor) in self.actors.iter().enumerate() {
            if actor.is_empty() {
                return Err(InvalidRequest::EmptyActor { level });
            }
            if actor.len() > limits.max_actor_len {
                return Err(InvalidRequest::ActorTooLong {
                    level,
                    len: actor.len(),
                    max: limits.max_actor_len,
                });
            }
        }
        if let Some(component) = &self.component {
            if component.is_empty() {
                return Err(InvalidRequest::EmptyComponent);
            }
            if component.len() > limits.max_component_len {
                return Err(InvalidRequest::ComponentTooLong {
                    len: component.len(),
                    max: limits.max_component_len,
                });
            }
        }
        if self.metadata.len() > limits.max_metadata_entries {
            return Err(InvalidRequest::TooMuchMetadata {
                entries: self.metadata.len(),
                max: limits.max_metadata_entries,
            });
        }
        if self.cost_hint == Some(0) {
            return Err(InvalidRequest::ZeroCost);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_limit_is_allowed_from_the_floor_to_the_hard_maximum_inclusive() {
        for (len, allowed) in [
            (0, false),
            (MIN_FRAME_LEN - 1, false),
            (MIN_FRAME_LEN, true),
            (Limits::default().max_frame_len, true),
            (HARD_MAX_FRAME_LEN, true),
            (HARD_MAX_FRAME_LEN + 1, false),
            (u32::MAX, false),
        ] {
            assert_eq!(frame_limit_allowed(len), allowed, "{len}");
        }
    }
}
