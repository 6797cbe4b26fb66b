//! Rebuild when a migration changes: `sqlx::migrate!` embeds `migrations/`
//! at compile time, and cargo does not otherwise watch that folder, so an
//! incremental build would keep running the old set.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
