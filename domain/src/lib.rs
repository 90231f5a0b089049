//! EKM's domain: scopes, their lifecycle commands and events, and the cascade rules.
//!
//! Architecture invariant: this crate does no IO. It knows nothing about HTTP, SQL, clocks
//! or key material; everything a command needs from the outside world (the parent's
//! effective state, the organization's plan) is looked up first and carried in the command.

pub mod access;
pub mod aggregate;
pub mod cascade;
pub mod commands;
pub mod errors;
pub mod events;
pub mod ids;
pub mod justification;
pub mod master_key;
pub mod metadata;
pub mod rate;
pub mod scope;
pub mod window;

pub use access::{Grant, OrgRole, Permission, PrincipalKind, PrincipalName};
pub use aggregate::{RekeyProgress, Scope, ScopeState};
pub use cascade::{effective_state, Effective};
pub use commands::{
    Admitted, Command, ControlsInForce, Lineage, MintedKey, Needs, ParentContext, Prepared,
};
pub use errors::ScopeError;
pub use events::ScopeEvent;

pub use ids::{IdError, KeyVersion, OrgId, ScopeId};
pub use justification::{
    EffectiveJustification, JustificationCode, JustificationPolicy, JustificationRefusal,
};
pub use master_key::{KeyHealth, MasterKeyRef, Provider, UnavailableReason};
pub use metadata::{Actor, ActorKind, EventMetadata, Location};
pub use rate::{RateBucket, RateClass, RateHolder, RateLimits};
pub use scope::KindRegistry;
pub use scope::{DataClass, OwnState, Plan, Reason, ScopeKind, ScopeName, Tier, ValueError};
pub use window::{RevokeWindow, RotationPeriod};
pub mod upcast;
