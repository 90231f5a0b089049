//! Rebuilds this crate when a migration is added or changed: `sqlx::migrate!` embeds the
//! migration files at compile time, and cargo does not watch them otherwise (as sqlx's
//! `sqlx migrate build-script` recommends).
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
