//! Access justifications (after Google's Key Access Justifications): a data-plane request may
//! say why it needs the key, and a scope's policy, inherited by its subtree, may require a
//! reason or limit which reasons are accepted.
//!
//! Policies along a path only tighten (ADR 0027): a reason is required if any scope on the
//! path requires one, and a given reason must be allowed by every scope on the path that
//! lists allowed reasons. A list implies that a reason is required (as in Google's design,
//! where a missing reason is itself a reason that must be allowed): otherwise a caller whose
//! reason the list refuses would simply leave it out. A team cannot loosen what its
//! organization set, as it cannot resume what its organization paused.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::ScopeId;
use crate::scope::ValueError;

/// The most reasons a policy may list.
pub const MAX_ALLOWED: usize = 64;

/// A justification code: lower-case letters, digits and `_`, 1 to 64 characters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JustificationCode(String);

impl JustificationCode {
    pub fn parse(text: &str) -> Result<Self, ValueError> {
        let well_formed = !text.is_empty()
            && text.len() <= 64
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !well_formed {
            return Err(ValueError::new(
                "justification",
                "a code of lower-case letters, digits and _, at most 64 characters",
            ));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for JustificationCode {
    type Err = ValueError;
    fn from_str(text: &str) -> Result<Self, ValueError> {
        Self::parse(text)
    }
}

impl TryFrom<String> for JustificationCode {
    type Error = ValueError;
    fn try_from(text: String) -> Result<Self, ValueError> {
        Self::parse(&text)
    }
}

impl From<JustificationCode> for String {
    fn from(code: JustificationCode) -> String {
        code.0
    }
}

impl fmt::Display for JustificationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One scope's own policy. `allowed` empty: any well-formed reason is accepted; a list needs
/// `required`. A policy that requires nothing and lists nothing imposes nothing (it is how a
/// policy is lifted).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JustificationPolicy {
    pub required: bool,
    /// Sorted, without duplicates.
    pub allowed: Vec<JustificationCode>,
}

impl JustificationPolicy {
    /// A policy with its list sorted and deduplicated, or why it cannot be one.
    pub fn new(required: bool, allowed: Vec<JustificationCode>) -> Result<Self, ValueError> {
        let allowed: BTreeSet<JustificationCode> = allowed.into_iter().collect();
        if allowed.len() > MAX_ALLOWED {
            return Err(ValueError::new("allowed", "at most 64 justification codes"));
        }
        if !required && !allowed.is_empty() {
            return Err(ValueError::new(
                "required",
                "a list of allowed reasons means a reason is required: set required to true \
                 (a request without a reason would otherwise pass what the list refuses)",
            ));
        }
        Ok(Self {
            required,
            allowed: allowed.into_iter().collect(),
        })
    }

    /// Whether the policy constrains nothing.
    pub fn is_empty(&self) -> bool {
        !self.required && self.allowed.is_empty()
    }
}

/// What a scope's path imposes: every policy on it, tightened together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EffectiveJustification {
    /// The scope (nearest the root) whose policy requires a reason, if any does.
    pub required_by: Option<ScopeId>,
    /// Each scope on the path that lists allowed reasons, root first, with its list.
    pub lists: Vec<(ScopeId, Vec<JustificationCode>)>,
}

/// Why a request's justification was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JustificationRefusal {
    #[error("a justification is required here (the policy of scope {by}); add \"justification\": \"<code>\" to the request")]
    Required { by: ScopeId },
    #[error(
        "justification {code} is not allowed here (the policy of scope {by}); allowed: {allowed}"
    )]
    NotAllowed {
        code: JustificationCode,
        by: ScopeId,
        allowed: String,
    },
}

impl EffectiveJustification {
    /// The policies of a path, root first (`None`: the scope has no policy of its own).
    pub fn along<'a>(
        path: impl IntoIterator<Item = (ScopeId, Option<&'a JustificationPolicy>)>,
    ) -> Self {
        path.into_iter()
            .fold(Self::default(), |effective, (id, policy)| {
                effective.then(id, policy)
            })
    }

    /// What a child with `policy` (or none of its own) inherits this tightened with.
    pub fn then(mut self, id: ScopeId, policy: Option<&JustificationPolicy>) -> Self {
        let Some(policy) = policy else { return self };
        // A list requires a reason, also in a policy stored before that rule (ADR 0027).
        if (policy.required || !policy.allowed.is_empty()) && self.required_by.is_none() {
            self.required_by = Some(id);
        }
        if !policy.allowed.is_empty() {
            self.lists.push((id, policy.allowed.clone()));
        }
        self
    }

    /// The reasons every listing scope on the path accepts; `None` when none lists any.
    pub fn allowed(&self) -> Option<BTreeSet<JustificationCode>> {
        let mut lists = self.lists.iter();
        let (_, first) = lists.next()?;
        let mut codes: BTreeSet<JustificationCode> = first.iter().cloned().collect();
        for (_, list) in lists {
            codes.retain(|code| list.contains(code));
        }
        Some(codes)
    }

    /// Whether a request with `code` (or none) passes. A refusal names the scope (nearest
    /// the root) whose policy it breaks.
    pub fn check(&self, code: Option<&JustificationCode>) -> Result<(), JustificationRefusal> {
        let Some(code) = code else {
            return match self.required_by {
                Some(by) => Err(JustificationRefusal::Required { by }),
                None => Ok(()),
            };
        };
        let Some((by, _)) = self.lists.iter().find(|(_, list)| !list.contains(code)) else {
            return Ok(());
        };
        let allowed = self.allowed().unwrap_or_default();
        Err(JustificationRefusal::NotAllowed {
            code: code.clone(),
            by: *by,
            allowed: if allowed.is_empty() {
                "none: the policies on the path list no reason in common".to_owned()
            } else {
                allowed
                    .iter()
                    .map(JustificationCode::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
    }

    /// Whether any request can pass: false when the lists on the path have no reason in
    /// common (a list requires a reason).
    pub fn admits_some(&self) -> bool {
        self.allowed().is_none_or(|codes| !codes.is_empty())
    }

    /// What the path above `id` imposes, given what the path down to `id` imposes.
    pub fn without(&self, id: ScopeId) -> Self {
        Self {
            // The scope nearest the root that requires: if it is `id`, none above does.
            required_by: self.required_by.filter(|by| *by != id),
            lists: self
                .lists
                .iter()
                .filter(|(by, _)| *by != id)
                .cloned()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn code(text: &str) -> JustificationCode {
        JustificationCode::parse(text).unwrap()
    }

    fn policy(required: bool, allowed: &[&str]) -> JustificationPolicy {
        JustificationPolicy::new(required, allowed.iter().map(|c| code(c)).collect()).unwrap()
    }

    #[test]
    fn code_is_refused_when_it_is_not_a_short_lower_case_code() {
        for bad in ["", "Agent", "agent run", "agent-run", &"a".repeat(65), "é"] {
            assert!(JustificationCode::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(code("agent_run_2").as_str(), "agent_run_2");
    }

    #[test]
    fn path_requires_a_reason_when_any_scope_on_it_does() {
        let (org, team) = (ScopeId::generate(), ScopeId::generate());
        let org_policy = policy(true, &[]);
        let lifted = policy(false, &[]);
        let effective =
            EffectiveJustification::along([(org, Some(&org_policy)), (team, Some(&lifted))]);
        assert_eq!(
            effective.check(None),
            Err(JustificationRefusal::Required { by: org })
        );
        assert_eq!(effective.check(Some(&code("anything"))), Ok(()));
    }

    #[test]
    fn path_allows_only_the_reasons_every_listing_scope_allows() {
        let (org, team, thread) = (
            ScopeId::generate(),
            ScopeId::generate(),
            ScopeId::generate(),
        );
        let org_policy = policy(true, &["agent_run", "customer_support"]);
        let team_policy = policy(true, &["customer_support", "legal_hold"]);
        let effective = EffectiveJustification::along([
            (org, Some(&org_policy)),
            (team, Some(&team_policy)),
            (thread, None),
        ]);
        assert_eq!(effective.check(Some(&code("customer_support"))), Ok(()));
        assert!(matches!(
            effective.check(Some(&code("agent_run"))),
            Err(JustificationRefusal::NotAllowed { by, .. }) if by == team
        ));
        assert!(matches!(
            effective.check(Some(&code("legal_hold"))),
            Err(JustificationRefusal::NotAllowed { by, .. }) if by == org
        ));
        // A list requires a reason.
        assert_eq!(
            effective.check(None),
            Err(JustificationRefusal::Required { by: org })
        );
        assert!(JustificationPolicy::new(false, vec![code("agent_run")]).is_err());
    }

    #[test]
    fn policy_lists_each_code_once_in_order_when_given_duplicates() {
        let p = policy(true, &["b", "a", "b"]);
        assert_eq!(p.allowed, vec![code("a"), code("b")]);
        let too_many: Vec<JustificationCode> =
            (0..=MAX_ALLOWED).map(|i| code(&format!("c{i}"))).collect();
        assert!(JustificationPolicy::new(false, too_many).is_err());
    }

    fn arb_policy() -> impl Strategy<Value = Option<JustificationPolicy>> {
        let codes = prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "d"]), 0..4);
        prop::option::of((any::<bool>(), codes).prop_map(|(required, allowed)| {
            let required = required || !allowed.is_empty();
            JustificationPolicy::new(required, allowed.into_iter().map(code).collect()).unwrap()
        }))
    }

    proptest! {
        /// A request passes the path exactly when it passes every policy on it alone.
        #[test]
        fn path_admits_a_request_exactly_when_every_policy_on_it_does(
            policies in prop::collection::vec(arb_policy(), 0..5),
            given in prop::option::of(prop::sample::select(vec!["a", "b", "c", "d", "e"])),
        ) {
            let ids: Vec<ScopeId> = policies.iter().map(|_| ScopeId::generate()).collect();
            let given = given.map(code);
            let path = ids.iter().copied().zip(policies.iter().map(Option::as_ref));
            let together = EffectiveJustification::along(path).check(given.as_ref()).is_ok();
            let each = ids.iter().zip(&policies).all(|(id, p)| {
                EffectiveJustification::along([(*id, p.as_ref())]).check(given.as_ref()).is_ok()
            });
            prop_assert_eq!(together, each);
        }

        /// Taking the last scope off a path gives what the path above it imposes.
        #[test]
        fn without_the_last_scope_is_the_path_above_it(
            policies in prop::collection::vec(arb_policy(), 1..5),
        ) {
            let ids: Vec<ScopeId> = policies.iter().map(|_| ScopeId::generate()).collect();
            let pairs: Vec<(ScopeId, Option<&JustificationPolicy>)> =
                ids.iter().copied().zip(policies.iter().map(Option::as_ref)).collect();
            let whole = EffectiveJustification::along(pairs.iter().copied());
            let above = EffectiveJustification::along(pairs[..pairs.len() - 1].iter().copied());
            prop_assert_eq!(whole.without(ids[ids.len() - 1]), above);
        }
    }
}
