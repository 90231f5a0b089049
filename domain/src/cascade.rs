//! The cascade: a scope's effective state follows from its own state and its ancestors'.
//!
//! `revoked` if it or any ancestor is revoked; else `paused` or `pending_revocation` if it
//! or any ancestor is paused or pending revocation (the two rank together: the highest such
//! scope is the cause and gives its name to the state); else `unavailable` if the organization's customer master key cannot be used;
//! else `active`. The cause is the highest scope (closest to the root) that puts it
//! there. The cascade is computed when read, from the path, so pausing an organization is
//! one event whatever the size of its subtree.

use serde::{Deserialize, Serialize};

use crate::ids::ScopeId;
use crate::master_key::KeyHealth;
use crate::scope::OwnState;

/// A scope's effective state and, unless active, the scope that causes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Effective {
    Active,
    Paused {
        by: ScopeId,
    },
    /// A revoke waits for its due time on `by` (ranked with paused).
    PendingRevocation {
        by: ScopeId,
    },
    Revoked {
        by: ScopeId,
    },
    /// The organization's customer master key cannot be used (`by` is the organization).
    Unavailable {
        by: ScopeId,
    },
}

impl Effective {
    pub fn is_active(&self) -> bool {
        matches!(self, Effective::Active)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Effective::Active => "active",
            Effective::Paused { .. } => "paused",
            Effective::PendingRevocation { .. } => "pending_revocation",
            Effective::Revoked { .. } => "revoked",
            Effective::Unavailable { .. } => "unavailable",
        }
    }

    /// The scope whose own state causes this effective state, if not active.
    pub fn cause(&self) -> Option<ScopeId> {
        match self {
            Effective::Active => None,
            Effective::Paused { by }
            | Effective::PendingRevocation { by }
            | Effective::Revoked { by }
            | Effective::Unavailable { by } => Some(*by),
        }
    }

    /// The effective state of a child whose own state is `own`, under a parent whose
    /// effective state is `self`.
    pub fn child(self, id: ScopeId, own: OwnState) -> Effective {
        effective_state_from(self, [(id, own)])
    }

    /// This state once the organization's master key health is taken into account: an
    /// unusable customer key makes an otherwise active scope `unavailable`; paused and
    /// revoked take precedence.
    pub fn with_master_key(self, org: ScopeId, health: KeyHealth) -> Effective {
        match (self, health) {
            (Effective::Active, KeyHealth::Unavailable) => Effective::Unavailable { by: org },
            _ => self,
        }
    }
}

/// The effective state of the last scope of `path`, given as (id, own state) pairs from the
/// root to the scope itself.
pub fn effective_state(path: impl IntoIterator<Item = (ScopeId, OwnState)>) -> Effective {
    effective_state_from(Effective::Active, path)
}

fn effective_state_from(
    start: Effective,
    path: impl IntoIterator<Item = (ScopeId, OwnState)>,
) -> Effective {
    path.into_iter()
        .fold(start, |acc, (id, own)| match (acc, own) {
            (Effective::Revoked { .. }, _) => acc,
            (_, OwnState::Revoked) => Effective::Revoked { by: id },
            (Effective::Paused { .. } | Effective::PendingRevocation { .. }, _) => acc,
            (Effective::Active | Effective::Unavailable { .. }, OwnState::Paused) => {
                Effective::Paused { by: id }
            }
            (Effective::Active | Effective::Unavailable { .. }, OwnState::PendingRevocation) => {
                Effective::PendingRevocation { by: id }
            }
            (Effective::Active | Effective::Unavailable { .. }, OwnState::Active) => acc,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(n: usize) -> Vec<ScopeId> {
        (0..n).map(|_| ScopeId::generate()).collect()
    }

    #[test]
    fn revoked_ancestor_wins_over_paused_ancestor_above_it() {
        let [org, team, thread] = ids(3)[..] else {
            unreachable!()
        };
        let got = effective_state([
            (org, OwnState::Paused),
            (team, OwnState::Revoked),
            (thread, OwnState::Active),
        ]);
        assert_eq!(got, Effective::Revoked { by: team });
    }

    #[test]
    fn highest_paused_scope_is_the_cause() {
        let [org, team, thread] = ids(3)[..] else {
            unreachable!()
        };
        let got = effective_state([
            (org, OwnState::Paused),
            (team, OwnState::Paused),
            (thread, OwnState::Paused),
        ]);
        assert_eq!(got, Effective::Paused { by: org });
    }

    #[test]
    fn pending_revocation_ranks_with_paused_and_the_highest_is_the_cause() {
        let [org, team, thread] = ids(3)[..] else {
            unreachable!()
        };
        let got = effective_state([
            (org, OwnState::Active),
            (team, OwnState::PendingRevocation),
            (thread, OwnState::Paused),
        ]);
        assert_eq!(got, Effective::PendingRevocation { by: team });
        let got = effective_state([
            (org, OwnState::Paused),
            (team, OwnState::PendingRevocation),
            (thread, OwnState::Revoked),
        ]);
        assert_eq!(got, Effective::Revoked { by: thread });
        let got = effective_state([(org, OwnState::Paused), (team, OwnState::PendingRevocation)]);
        assert_eq!(got, Effective::Paused { by: org });
    }

    #[test]
    fn resumed_team_under_paused_org_stays_paused_by_org() {
        let [org, team] = ids(2)[..] else {
            unreachable!()
        };
        let got = effective_state([(org, OwnState::Paused), (team, OwnState::Active)]);
        assert_eq!(got, Effective::Paused { by: org });
    }

    fn own_state() -> impl Strategy<Value = OwnState> {
        prop_oneof![
            Just(OwnState::Active),
            Just(OwnState::Paused),
            Just(OwnState::PendingRevocation),
            Just(OwnState::Revoked)
        ]
    }

    proptest! {
        /// Against the rule as PRODUCT.md words it.
        #[test]
        fn cascade_matches_the_written_rule(
            states in proptest::collection::vec(own_state(), 1..8),
            master_unusable in any::<bool>(),
        ) {
            let path: Vec<(ScopeId, OwnState)> =
                states.iter().map(|s| (ScopeId::generate(), *s)).collect();
            let first = |wanted: OwnState| path.iter().find(|(_, s)| *s == wanted).map(|(id, _)| *id);
            // Paused and pending revocation rank together: the highest of either is the cause.
            let held = path
                .iter()
                .find(|(_, s)| matches!(s, OwnState::Paused | OwnState::PendingRevocation));
            let expected = match (first(OwnState::Revoked), held) {
                (Some(by), _) => Effective::Revoked { by },
                (None, Some((by, OwnState::Paused))) => Effective::Paused { by: *by },
                (None, Some((by, _))) => Effective::PendingRevocation { by: *by },
                (None, None) => Effective::Active,
            };
            prop_assert_eq!(effective_state(path.iter().copied()), expected);
            // Computing a parent first and then the child gives the same answer.
            let (last, init) = path.split_last().unwrap_or_else(|| unreachable!());
            prop_assert_eq!(effective_state(init.iter().copied()).child(last.0, last.1), expected);
            // The master key comes after paused and revoked, and before active.
            let org = path[0].0;
            let health = if master_unusable { KeyHealth::Unavailable } else { KeyHealth::Available };
            let expected = match expected {
                Effective::Active if master_unusable => Effective::Unavailable { by: org },
                other => other,
            };
            prop_assert_eq!(effective_state(path.iter().copied()).with_master_key(org, health), expected);
            prop_assert_eq!(
                effective_state(init.iter().copied())
                    .with_master_key(org, health)
                    .child(last.0, last.1),
                expected
            );
        }
    }
}
