//! EKM's application layer: what the HTTP API (and the binary's jobs) ask of the system,
//! with no HTTP in it.
//!
//! `App` runs commands on the scope aggregate and answers reads (read-your-writes); the key
//! service (`keys`) creates, wraps, unwraps and caches key material along the hierarchy;
//! `health` watches customer master keys; `rekey` makes a revoke hold against copies of the
//! database; `scheduler` fires what falls due (a pause's resume); `caller` says who is acting and what it may do; `access` issues and revokes
//! tokens and grants; `master_key` validates a customer master key before it is connected;
//! `minter` puts key minting behind a trait (a fake in unit tests); `visibility` finds what a
//! caller may see, and the keys it may use.
//!
//! Architecture invariant: no HTTP and no JSON shapes here. Refusals are `AppError`s;
//! `ekm-api` maps them to problem+json.

pub mod access;
pub mod app;
pub mod breaker;
pub mod caller;
pub mod health;
pub mod keys;
pub mod master_key;
pub mod metrics;
pub mod minter;
pub mod rekey;
pub mod scheduler;
pub mod visibility;
pub mod watchdog;

pub use app::{AccessSeals, Action, App, AppError, Outcome};
pub use caller::Caller;
