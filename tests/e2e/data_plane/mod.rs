//! The data plane: envelope encryption that obeys pause and revoke, rotation, and keys that
//! a revoke destroys for good.

mod batch;
mod enforcement;
mod envelope;
mod keys;

use crate::harness::TestApp;

pub(crate) async fn managed_org(app: &TestApp) -> (String, String) {
    app.data_org("enterprise", "managed").await
}
