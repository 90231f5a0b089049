//! Master keys: which key wraps an organization's key (the platform's own, or the
//! customer's in AWS KMS, Google Cloud KMS or Azure Key Vault), and whether it can be used.
//!
//! A `MasterKeyRef` names a key; it holds no secret. Credentials come from the platform's
//! environment, never from a client or an event.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::scope::ValueError;

/// Who holds the master key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Provider {
    /// The platform's master key (a file in the data directory).
    #[serde(rename = "local")]
    Local,
    #[serde(rename = "aws-kms")]
    AwsKms,
    #[serde(rename = "gcp-kms")]
    GcpKms,
    #[serde(rename = "azure-keyvault")]
    AzureKeyVault,
}

impl Provider {
    pub const ALL: [Provider; 4] = [
        Provider::Local,
        Provider::AwsKms,
        Provider::GcpKms,
        Provider::AzureKeyVault,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Local => "local",
            Provider::AwsKms => "aws-kms",
            Provider::GcpKms => "gcp-kms",
            Provider::AzureKeyVault => "azure-keyvault",
        }
    }
}

impl FromStr for Provider {
    type Err = ValueError;
    fn from_str(input: &str) -> Result<Self, ValueError> {
        Provider::ALL
            .into_iter()
            .find(|p| p.as_str() == input)
            .ok_or_else(|| {
                ValueError::new(
                    "provider",
                    format!(
                        "`{}` is not one of local, aws-kms, gcp-kms, azure-keyvault",
                        input.chars().take(64).collect::<String>()
                    ),
                )
            })
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A customer master key: provider, key id and where to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MasterKeyRef {
    pub provider: Provider,
    /// AWS: key ARN, alias ARN, key id or `alias/…`; GCP: the CryptoKey resource name;
    /// Azure: the key URL (with or without a version).
    pub key_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
}

const MAX_KEY_ID: usize = 512;

impl MasterKeyRef {
    /// Validates a customer key reference. `local` is not a customer key: it is the absence
    /// of one (`managed` tier), so it is refused here.
    pub fn parse(
        provider: Provider,
        key_id: &str,
        region: Option<&str>,
        endpoint_url: Option<&str>,
    ) -> Result<MasterKeyRef, ValueError> {
        let key_id = key_id.trim();
        if key_id.is_empty() || key_id.len() > MAX_KEY_ID || key_id.chars().any(char::is_control) {
            return Err(ValueError::new(
                "key_id",
                format!("must be 1 to {MAX_KEY_ID} printable characters"),
            ));
        }
        let region = match region.map(str::trim) {
            None | Some("") => None,
            Some(region) => {
                let valid = region.len() <= 64
                    && region
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                if !valid {
                    return Err(ValueError::new(
                        "region",
                        "must be a region name such as eu-west-1",
                    ));
                }
                Some(region.to_owned())
            }
        };
        let endpoint_url = match endpoint_url.map(str::trim) {
            None | Some("") => None,
            Some(url) => Some(parse_endpoint(url)?),
        };
        let region = match provider {
            Provider::Local => {
                return Err(ValueError::new(
                    "provider",
                    "`local` is the platform's master key: set the tier to managed instead",
                ))
            }
            Provider::AwsKms => {
                let arn_region = aws_arn_region(key_id)?;
                match (arn_region, region) {
                    (Some(from_arn), Some(given)) if from_arn != given => {
                        return Err(ValueError::new(
                            "region",
                            format!("`{given}` differs from the key ARN's region `{from_arn}`"),
                        ))
                    }
                    (Some(from_arn), _) => Some(from_arn),
                    (None, Some(given)) => Some(given),
                    (None, None) => {
                        return Err(ValueError::new(
                            "region",
                            "is required unless key_id is an ARN",
                        ))
                    }
                }
            }
            Provider::GcpKms => {
                gcp_resource(key_id)?;
                region
            }
            Provider::AzureKeyVault => {
                azure_key_url(key_id)?;
                region
            }
        };
        Ok(MasterKeyRef {
            provider,
            key_id: key_id.to_owned(),
            region,
            endpoint_url,
        })
    }

    /// How key material rows name the key that wraps them: `provider:key_id`.
    pub fn wrapping_id(&self) -> String {
        format!("{}:{}", self.provider, self.key_id)
    }
}

fn parse_endpoint(url: &str) -> Result<String, ValueError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    let valid = url.len() <= 256
        && rest.is_some_and(|rest| {
            let host = rest.split('/').next().unwrap_or("");
            !host.is_empty()
                && rest.chars().all(|c| {
                    c.is_ascii_alphanumeric()
                        || matches!(c, '.' | '-' | ':' | '/' | '_' | '[' | ']')
                })
        });
    if valid {
        Ok(url.trim_end_matches('/').to_owned())
    } else {
        Err(ValueError::new(
            "endpoint_url",
            "must be an http(s) URL such as https://kms.eu-west-1.amazonaws.com",
        ))
    }
}

/// The region of an AWS KMS key ARN, `None` for a bare key id or alias; an error for
/// anything else.
fn aws_arn_region(key_id: &str) -> Result<Option<String>, ValueError> {
    let invalid = || {
        ValueError::new(
            "key_id",
            "must be a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID), an alias ARN, a key id \
             or alias/NAME",
        )
    };
    let word = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/' | '.'))
    };
    if let Some(rest) = key_id.strip_prefix("arn:") {
        let parts: Vec<&str> = rest.splitn(5, ':').collect();
        let [partition, service, region, account, resource] = parts[..] else {
            return Err(invalid());
        };
        let resource_ok = resource
            .strip_prefix("key/")
            .or_else(|| resource.strip_prefix("alias/"))
            .is_some_and(word);
        if !partition.starts_with("aws")
            || service != "kms"
            || !word(region)
            || account.len() != 12
            || !account.chars().all(|c| c.is_ascii_digit())
            || !resource_ok
        {
            return Err(invalid());
        }
        return Ok(Some(region.to_owned()));
    }
    if word(key_id) {
        Ok(None)
    } else {
        Err(invalid())
    }
}

/// `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
fn gcp_resource(key_id: &str) -> Result<(), ValueError> {
    let parts: Vec<&str> = key_id.split('/').collect();
    let labels_ok = parts.len() == 8
        && parts[0] == "projects"
        && parts[2] == "locations"
        && parts[4] == "keyRings"
        && parts[6] == "cryptoKeys";
    let values_ok = [1, 3, 5, 7].iter().all(|&i| {
        parts.get(i).is_some_and(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        })
    });
    if labels_ok && values_ok {
        Ok(())
    } else {
        Err(ValueError::new(
            "key_id",
            "must be a CryptoKey resource name: projects/PROJECT/locations/LOCATION/keyRings/RING/cryptoKeys/KEY",
        ))
    }
}

/// The hosts of Key Vault and Managed HSM in Azure's public and sovereign clouds. A key URL
/// elsewhere is refused: the platform sends its Azure token to the key's host.
const AZURE_KEY_HOST_SUFFIXES: [&str; 6] = [
    ".vault.azure.net",
    ".managedhsm.azure.net",
    ".vault.azure.cn",
    ".managedhsm.azure.cn",
    ".vault.usgovcloudapi.net",
    ".managedhsm.usgovcloudapi.net",
];

/// `https://VAULT.vault.azure.net/keys/NAME[/VERSION]`, on a Key Vault or Managed HSM host.
fn azure_key_url(key_id: &str) -> Result<(), ValueError> {
    let invalid = || {
        ValueError::new(
            "key_id",
            "must be a Key Vault key URL: https://VAULT.vault.azure.net/keys/NAME[/VERSION]",
        )
    };
    let rest = key_id.strip_prefix("https://").ok_or_else(invalid)?;
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let name_ok = |s: &str| {
        !s.is_empty() && s.len() <= 127 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    let host_ok = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
            && AZURE_KEY_HOST_SUFFIXES
                .iter()
                .any(|suffix| s.len() > suffix.len() && s.ends_with(suffix))
    };
    match parts[..] {
        [host, "keys", name] if host_ok(host) && name_ok(name) => Ok(()),
        [host, "keys", name, version] if host_ok(host) && name_ok(name) && name_ok(version) => {
            Ok(())
        }
        _ => Err(invalid()),
    }
}

/// Whether the organization's master key can be used, as last recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyHealth {
    Available,
    Unavailable,
}

impl KeyHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyHealth::Available => "available",
            KeyHealth::Unavailable => "unavailable",
        }
    }
}

/// Why a master key cannot be used: the customer's decision, or an outage past the grace
/// period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnavailableReason {
    /// Disabled by the customer.
    Disabled,
    /// Scheduled for deletion, deleted or destroyed.
    PendingDeletion,
    /// The platform's access was removed (key policy, IAM, access policy).
    AccessDenied,
    /// The key does not exist (any more).
    NotFound,
    /// The provider could not be reached, or kept failing, for longer than the grace period.
    Unreachable,
}

impl UnavailableReason {
    pub fn as_str(self) -> &'static str {
        match self {
            UnavailableReason::Disabled => "disabled",
            UnavailableReason::PendingDeletion => "pending_deletion",
            UnavailableReason::AccessDenied => "access_denied",
            UnavailableReason::NotFound => "not_found",
            UnavailableReason::Unreachable => "unreachable",
        }
    }

    /// Whether this is the customer's decision (as opposed to an outage).
    pub fn is_customer_decision(self) -> bool {
        !matches!(self, UnavailableReason::Unreachable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ARN: &str = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    #[test]
    fn aws_region_comes_from_the_arn() {
        let key = MasterKeyRef::parse(Provider::AwsKms, ARN, None, None).unwrap();
        assert_eq!(key.region.as_deref(), Some("eu-west-1"));
        assert_eq!(key.wrapping_id(), format!("aws-kms:{ARN}"));
    }

    #[test]
    fn aws_region_refused_when_it_contradicts_the_arn() {
        let error =
            MasterKeyRef::parse(Provider::AwsKms, ARN, Some("us-east-1"), None).unwrap_err();
        assert_eq!(error.field, "region");
    }

    #[test]
    fn aws_bare_key_id_refused_when_region_is_missing() {
        assert_eq!(
            MasterKeyRef::parse(Provider::AwsKms, "alias/ekm", None, None)
                .unwrap_err()
                .field,
            "region"
        );
        assert!(
            MasterKeyRef::parse(Provider::AwsKms, "alias/ekm", Some("us-east-1"), None).is_ok()
        );
    }

    #[test]
    fn gcp_and_azure_names_are_checked() {
        let gcp = "projects/acme/locations/europe-west1/keyRings/ekm/cryptoKeys/org";
        assert!(MasterKeyRef::parse(Provider::GcpKms, gcp, None, None).is_ok());
        assert!(MasterKeyRef::parse(Provider::GcpKms, "projects/acme", None, None).is_err());
        let azure = "https://acme.vault.azure.net/keys/ekm-org";
        assert!(MasterKeyRef::parse(Provider::AzureKeyVault, azure, None, None).is_ok());
        assert!(MasterKeyRef::parse(
            Provider::AzureKeyVault,
            "https://acme.vault.azure.net/keys/ekm-org/0123abcd",
            None,
            Some("http://127.0.0.1:9000")
        )
        .is_ok());
        assert!(
            MasterKeyRef::parse(Provider::AzureKeyVault, "http://acme/keys/x", None, None).is_err()
        );
        // The platform's Azure token goes to the key's host: only Key Vault hosts.
        assert!(MasterKeyRef::parse(
            Provider::AzureKeyVault,
            "https://evil.example.com/keys/x",
            None,
            None
        )
        .is_err());
    }

    #[test]
    fn local_is_not_a_customer_key() {
        assert_eq!(
            MasterKeyRef::parse(Provider::Local, "x", None, None)
                .unwrap_err()
                .field,
            "provider"
        );
    }

    #[test]
    fn endpoint_must_be_http() {
        assert_eq!(
            MasterKeyRef::parse(Provider::AwsKms, ARN, None, Some("ftp://x"))
                .unwrap_err()
                .field,
            "endpoint_url"
        );
    }

    /// Valid customer keys of each provider, with the region the parse must report.
    fn valid_key() -> impl Strategy<Value = (Provider, String, Option<String>, Option<String>)> {
        let region = "[a-z]{2}-[a-z]{4,9}-[1-9]";
        let word = "[A-Za-z0-9_-]{1,20}";
        prop_oneof![
            // AWS: key ARN or alias ARN; the region comes from the ARN.
            (
                region,
                "[0-9]{12}",
                prop_oneof![Just("key"), Just("alias")],
                "[a-z0-9-]{1,36}"
            )
                .prop_map(|(region, account, kind, id)| {
                    (
                        Provider::AwsKms,
                        format!("arn:aws:kms:{region}:{account}:{kind}/{id}"),
                        None,
                        Some(region),
                    )
                }),
            // AWS: a bare key id or alias, with the region given.
            (
                region,
                prop_oneof!["[a-f0-9-]{36}", "alias/[A-Za-z0-9_/-]{1,30}"]
            )
                .prop_map(|(region, id)| (
                    Provider::AwsKms,
                    id,
                    Some(region.clone()),
                    Some(region)
                )),
            (word, word, word, word).prop_map(|(p, l, r, k)| {
                (
                    Provider::GcpKms,
                    format!("projects/{p}/locations/{l}/keyRings/{r}/cryptoKeys/{k}"),
                    None,
                    None,
                )
            }),
            (
                "[a-z][a-z0-9-]{2,20}",
                proptest::sample::select(AZURE_KEY_HOST_SUFFIXES.to_vec()),
                "[A-Za-z0-9-]{1,30}",
                proptest::option::of("[a-f0-9]{32}"),
            )
                .prop_map(|(vault, suffix, name, version)| {
                    let version = version.map(|v| format!("/{v}")).unwrap_or_default();
                    (
                        Provider::AzureKeyVault,
                        format!("https://{vault}{suffix}/keys/{name}{version}"),
                        None,
                        None,
                    )
                }),
        ]
    }

    /// A change that makes a valid key id invalid for its provider.
    fn spoil(provider: Provider, key_id: &str, choice: usize) -> String {
        match provider {
            Provider::AwsKms if key_id.starts_with("arn:") => [
                key_id.replacen(":kms:", ":s3:", 1),
                key_id.replacen("arn:aws", "arn:gcp", 1),
                key_id
                    .replacen(":key/", ":secret/", 1)
                    .replacen(":alias/", ":secret/", 1),
                // An account of 11 digits.
                {
                    let parts: Vec<&str> = key_id.splitn(6, ':').collect();
                    format!(
                        "{}:{}:{}:{}:{}:{}",
                        parts[0],
                        parts[1],
                        parts[2],
                        parts[3],
                        &parts[4][1..],
                        parts[5]
                    )
                },
                format!("{key_id} x"),
            ][choice % 5]
                .clone(),
            Provider::AwsKms => [
                format!("{key_id} x"),
                format!("{key_id}!"),
                format!("{key_id}:x"),
            ][choice % 3]
                .clone(),
            Provider::GcpKms => [
                key_id.replacen("keyRings", "keyrings", 1),
                format!("{key_id}/cryptoKeyVersions/1"),
                key_id.replacen("projects/", "projects//", 1),
                format!("{key_id}!"),
            ][choice % 4]
                .clone(),
            _ => [
                key_id.replacen("https://", "http://", 1),
                key_id.replacen("/keys/", "/secrets/", 1),
                key_id.replacen(".azure.", ".example.", 1).replacen(
                    ".usgovcloudapi.",
                    ".example.",
                    1,
                ),
                format!("{key_id}/extra/part"),
            ][choice % 4]
                .clone(),
        }
    }

    proptest! {
        #[test]
        fn valid_customer_keys_parse_to_themselves_and_again_to_the_same_value(
            (provider, key_id, region, expected_region) in valid_key(),
            endpoint in proptest::option::of("https?://[a-z0-9.-]{1,20}(:[0-9]{2,5})?/?"),
        ) {
            let key = MasterKeyRef::parse(provider, &key_id, region.as_deref(), endpoint.as_deref()).unwrap();
            prop_assert_eq!(key.provider, provider);
            prop_assert_eq!(&key.key_id, &key_id);
            prop_assert_eq!(&key.region, &expected_region);
            prop_assert_eq!(key.endpoint_url.as_deref(), endpoint.as_deref().map(|e| e.trim_end_matches('/')));
            prop_assert_eq!(key.wrapping_id(), format!("{provider}:{key_id}"));
            let again = MasterKeyRef::parse(provider, &key.key_id, key.region.as_deref(), key.endpoint_url.as_deref());
            prop_assert_eq!(again, Ok(key));
        }

        #[test]
        fn spoiled_customer_keys_are_refused_naming_the_key_id(
            (provider, key_id, region, _) in valid_key(),
            choice in any::<usize>(),
        ) {
            let spoiled = spoil(provider, &key_id, choice);
            let refused = MasterKeyRef::parse(provider, &spoiled, region.as_deref(), None);
            prop_assert_eq!(refused.map_err(|e| e.field), Err("key_id"), "{}", spoiled);
        }

        #[test]
        fn a_region_other_than_the_arns_or_malformed_is_refused(
            (provider, key_id, _, expected) in valid_key(),
            other in prop_oneof!["[a-z]{2}-[a-z]{4,9}-[1-9]", "[A-Z]{1,10}", "[a-z]{1,5}_[a-z]{1,5}"],
        ) {
            let refused = MasterKeyRef::parse(provider, &key_id, Some(&other), None);
            let is_arn = provider == Provider::AwsKms && key_id.starts_with("arn:");
            let well_formed = other.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !well_formed || (is_arn && expected.as_deref() != Some(other.as_str())) {
                prop_assert_eq!(refused.map_err(|e| e.field), Err("region"), "{}", other);
            } else {
                prop_assert_eq!(refused.unwrap().region, Some(other));
            }
        }

        #[test]
        fn endpoints_other_than_http_urls_are_refused(
            (provider, key_id, region, _) in valid_key(),
            endpoint in prop_oneof!["ftp://[a-z]{1,10}", "[a-z]{1,10}\\.com", "https://", "https://[a-z]{1,5} [a-z]{1,5}", "https://[a-z]{1,5}/\\?q=[a-z]{1,5}"],
        ) {
            let refused = MasterKeyRef::parse(provider, &key_id, region.as_deref(), Some(&endpoint));
            prop_assert_eq!(refused.map_err(|e| e.field), Err("endpoint_url"), "{}", endpoint);
        }

        #[test]
        fn parse_never_panics_and_accepts_only_printable_ids(
            provider in prop_oneof![
                Just(Provider::Local), Just(Provider::AwsKms),
                Just(Provider::GcpKms), Just(Provider::AzureKeyVault)
            ],
            key_id in ".{0,80}",
            region in proptest::option::of(".{0,20}"),
            endpoint in proptest::option::of(".{0,40}"),
        ) {
            if let Ok(key) = MasterKeyRef::parse(provider, &key_id, region.as_deref(), endpoint.as_deref()) {
                prop_assert!(!key.key_id.is_empty());
                prop_assert!(!key.key_id.chars().any(char::is_control));
                prop_assert!(provider != Provider::Local);
                if provider == Provider::AwsKms {
                    prop_assert!(key.region.is_some());
                }
                // What was accepted parses again to the same value.
                let again = MasterKeyRef::parse(provider, &key.key_id, key.region.as_deref(), key.endpoint_url.as_deref());
                prop_assert_eq!(again, Ok(key));
            }
        }
    }
}
