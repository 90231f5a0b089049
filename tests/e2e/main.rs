//! End-to-end tests of the whole system: one test binary, shared helpers in `harness`.
//!
//! Every flow runs on both backends: embedded SQLite and a real PostgreSQL (the one at
//! 127.0.0.1:5432, `EKM_TEST_DATABASE_URL`, or a throwaway cluster started from the
//! installed binaries; never skipped).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

mod access_gaps;
mod access_log;
mod access_matrix;
mod api_docs;
mod append;
mod audit;
mod audit_export;
mod bad_input;
mod bad_input_endpoints;
mod byok;
mod cascade_property;
mod cli_scope;
mod concurrency;
mod conditional;
mod console;
mod data_plane;
mod destruction;
mod doctor;
mod faults;
mod flows;
mod global_order;
mod hardening;
mod history;
mod idempotency;
mod justification;
mod key_versions;
mod kms_servers;
mod memory_tree;
mod merge_property;
mod metrics;
mod migrations;
mod network;
mod paging;
mod pending_revocation;
mod plans;
mod postgres_roles;
mod postgres_tls;
mod process;
mod process_hardening;
mod rate_limits;
mod rebuild;
mod rich_history;
mod rotation;
mod schedule;
mod scope_kinds;
mod tamper;
mod tenancy;
