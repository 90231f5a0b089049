//! The `local` provider: the platform's master key file (tiers `default` and `managed`).

use ekm_keys::{Kek, LocalMasterKey};
use zeroize::Zeroizing;

use crate::{FailureKind, KeyState, MasterKeyProvider, Operation, ProviderError, WrapContext};

#[derive(Debug, Clone)]
pub struct LocalProvider {
    master: LocalMasterKey,
}

impl LocalProvider {
    pub fn new(master: LocalMasterKey) -> Self {
        LocalProvider { master }
    }

    pub fn fingerprint(&self) -> String {
        self.master.fingerprint()
    }
}

fn failed(operation: Operation) -> ProviderError {
    ProviderError::new(
        operation,
        FailureKind::InvalidCiphertext,
        "InvalidCiphertext",
        "the wrapped key does not open under the platform master key",
    )
}

#[async_trait::async_trait]
impl MasterKeyProvider for LocalProvider {
    async fn wrap(
        &self,
        plaintext: &[u8],
        context: WrapContext<'_>,
    ) -> Result<Vec<u8>, ProviderError> {
        let key = Kek::from_bytes(plaintext).map_err(|_| {
            ProviderError::new(
                Operation::Encrypt,
                FailureKind::Invalid,
                "InvalidKeyLength",
                "an organization key is 64 bytes",
            )
        })?;
        self.master
            .wrap_bound(&key, &context.local_binding())
            .map_err(|_| failed(Operation::Encrypt))
    }

    async fn unwrap(
        &self,
        wrapped: &[u8],
        context: WrapContext<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        let key = self
            .master
            .unwrap_bound(wrapped, &context.local_binding())
            .map_err(|_| failed(Operation::Decrypt))?;
        Ok(key.for_master_key_provider())
    }

    async fn describe(&self) -> Result<KeyState, ProviderError> {
        Ok(KeyState::Enabled)
    }
}
