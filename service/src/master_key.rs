//! Connecting a customer master key (or going back to the platform's): what is checked
//! before anything is recorded.
//!
//! Connecting validates the key first: DescribeKey (or its equivalent) says it is enabled,
//! and a probe bound to the organization survives a wrap and unwrap round trip. Only then
//! are the organization's key versions re-wrapped under it and the switch recorded as an
//! event (`Action::SetMasterKey`); the old wrapping is destroyed when that event is
//! projected. No data is re-encrypted: existing ciphertexts keep working.

use ekm_domain::{MasterKeyRef, Plan, ScopeError, Tier};
use ekm_projections::ScopeSnapshot;
use ekm_store::KeyCheck;

use crate::app::{App, AppError};

impl App {
    /// Refuses the key that holds the platform's own master key: with it, the "customer"
    /// would hold nothing the platform does not.
    pub fn refuse_platform_key(&self, master: &MasterKeyRef) -> Result<(), AppError> {
        if let Some(platform) = self.keys().kms_options().platform_key.as_ref() {
            if master.wrapping_id() == platform.wrapping_id() {
                return Err(AppError::PlatformKeyOffered);
            }
        }
        Ok(())
    }

    /// Refuses a key whose `endpoint_url` the operator does not allow: the platform's
    /// credentials go to the endpoint.
    pub fn refuse_endpoint(&self, master: &MasterKeyRef) -> Result<(), AppError> {
        let Some(endpoint) = master.endpoint_url.as_deref() else {
            return Ok(());
        };
        if self
            .keys()
            .kms_options()
            .settings
            .endpoint_allowed(endpoint)
        {
            return Ok(());
        }
        Err(AppError::EndpointNotAllowed)
    }

    /// Checks that `master` can serve `org`: the plan allows it, and the key is enabled and
    /// survives a wrap/unwrap round trip of a probe bound to the organization.
    pub async fn validate_master_key(
        &self,
        org: &ScopeSnapshot,
        master: &MasterKeyRef,
    ) -> Result<(), AppError> {
        // Plan and lifecycle rules are the aggregate's; checking the plan here first spares
        // a customer's KMS calls for a request that cannot succeed.
        if org.org_plan != Plan::Enterprise {
            return Err(ScopeError::TierNeedsEnterprise(Tier::Byok).into());
        }
        let unusable = |source| AppError::MasterKeyUnusable {
            provider: master.provider,
            source,
        };
        let provider = self.keys().provider(master).await.map_err(unusable)?;
        crate::keys::timed_kms_call(
            master.provider,
            ekm_kms::round_trip(provider.as_ref(), &org.scope.id.to_string()),
        )
        .await
        .map_err(unusable)?;
        Ok(())
    }

    /// The last health check of the organization's customer key, if any.
    pub async fn master_key_check(
        &self,
        org: &ScopeSnapshot,
    ) -> Result<Option<KeyCheck>, AppError> {
        Ok(self.db().key_check(&org.scope.id.to_string()).await?)
    }
}
