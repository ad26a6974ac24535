//! De-duplication: the last batch sequence replayed per agent session, to drop what an agent
//! resends after a reconnect (it cannot know which of its unacknowledged batches arrived).
//!
//! Agents send a session's batches in order, so one number per session suffices. Bounded:
//! beyond [`MAX_SESSIONS`] the least recently seen session is forgotten. What this does not
//! do: count or log duplicates (the ingress does), or hold batches (only a weak handle on the
//! replay of the latest one, for a duplicate's acknowledgement to wait on).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::replay::Replaying;

/// What each agent session has had replayed.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    sessions: Mutex<Sessions>,
}

#[derive(Debug, Default)]
struct Sessions {
    /// (agent, session) → (last sequence, when last seen, the replay of that sequence).
    last: HashMap<SessionKey, (u64, u64, Weak<Replaying>)>,
    tick: u64,
}

/// An agent's session: (certificate name, session).
type SessionKey = (Arc<str>, u64);

/// What [`Replayed::check`] found.
pub(crate) enum Seen {
    /// A batch this session has not had: replay it.
    New,
    /// Had before; the session's latest replay, if it is still under way.
    Before(Option<Arc<Replaying>>),
}

/// Sessions remembered at most.
const MAX_SESSIONS: usize = 16_384;

impl Replayed {
    /// Whether `sequence` is new for this agent's `session` (and, if so, remembers it).
    pub(crate) fn check(&self, agent: &str, session: u64, sequence: u64) -> Seen {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.tick += 1;
        let tick = sessions.tick;
        let key: SessionKey = (agent.into(), session);
        if let Some((last, seen, replaying)) = sessions.last.get_mut(&key) {
            *seen = tick;
            if sequence <= *last {
                return Seen::Before(replaying.upgrade());
            }
            *last = sequence;
            *replaying = Weak::new();
            return Seen::New;
        }
        if sessions.last.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .last
                .iter()
                .min_by_key(|(_, (_, seen, _))| *seen)
                .map(|(k, _)| k.clone())
        {
            sessions.last.remove(&oldest);
        }
        sessions.last.insert(key, (sequence, tick, Weak::new()));
        Seen::New
    }

    /// Records the replay of `sequence`, for duplicates of it to wait on.
    pub(crate) fn replaying(
        &self,
        agent: &str,
        session: u64,
        sequence: u64,
        replaying: &Arc<Replaying>,
    ) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((last, _, latest)) = sessions.last.get_mut(&(Arc::from(agent), session))
            && *last == sequence
        {
            *latest = Arc::downgrade(replaying);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resent_batches_are_recognised_per_agent_and_session() {
        let replayed = Replayed::default();
        let new = |agent, session, sequence| {
            matches!(replayed.check(agent, session, sequence), Seen::New)
        };
        assert!(new("a", 1, 1));
        assert!(new("a", 1, 2));
        assert!(!new("a", 1, 2), "a resend");
        assert!(!new("a", 1, 1), "an older resend");
        assert!(new("b", 1, 2), "another agent");
        assert!(new("a", 7, 1), "another session of the same agent");
        assert!(new("a", 1, 3));
    }
}
