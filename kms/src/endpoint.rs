//! The operator's allow-list of KMS endpoints, matched on parsed URLs: scheme, host and
//! port, never on string prefixes and suffixes (`https://*.p.googleapis.com` once let
//! `https://127.0.0.1:9443/.p.googleapis.com` through, and with it the platform's token).
//!
//! Both the operator's patterns and a key's `endpoint_url` must be a bare origin written in
//! canonical form: `scheme://host[:port]` with an optional `/`, no userinfo, path, query or
//! fragment. Canonical means the text is exactly what the WHATWG parser (the `url` crate,
//! which reqwest uses) serializes it to: lowercase ASCII host, IDNA already in punycode, no
//! percent-escapes, no default port, no trailing dot. So every HTTP stack we hand the URL to
//! (reqwest, the AWS SDK's `http::Uri`) reads the same host we matched, whatever its parser.

use url::{Host, Url};

/// The longest URL accepted, pattern or endpoint.
const MAX_LEN: usize = 256;
/// Stands in for `*` while a pattern goes through the URL parser. Patterns that contain
/// it literally are refused.
const PLACEHOLDER: &str = "ekmwildcardx";

/// Why a pattern or an endpoint URL was refused. The text names the rule, never echoes the
/// URL (callers decide whether the URL may be shown).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("is longer than {MAX_LEN} characters")]
    TooLong,
    #[error("is not a URL")]
    NotAUrl,
    #[error("must use http or https")]
    Scheme,
    #[error("must not contain a user name or password")]
    Userinfo,
    #[error("must not contain a path, query or fragment (only scheme://host[:port])")]
    Path,
    #[error("must be an IP address or a DNS name without a trailing dot")]
    Host,
    #[error(
        "must be written in canonical form (lowercase, punycode, no escapes, no default port)"
    )]
    NotCanonical,
    #[error("may contain one `*`, inside one DNS label with at least two labels to its right, or as the port")]
    Wildcard,
}

/// A parsed allow-list entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPattern {
    scheme: String,
    host: HostPattern,
    port: PortPattern,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    /// An IP literal or a DNS name without wildcard, matched exactly.
    Exact(String),
    /// DNS labels; one of them has a `*` that stands for one or more characters of one
    /// label (never a dot).
    Wildcard {
        left: Vec<String>,
        prefix: String,
        suffix: String,
        right: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortPattern {
    Any,
    Exact(u16),
}

/// A key's endpoint, as its provider will call it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    scheme: String,
    host: String,
    is_dns: bool,
    port: u16,
}

impl Endpoint {
    /// The host and port a connection goes to (`[…]` around an IPv6 address).
    pub fn host_port(&self) -> (String, u16) {
        (
            self.host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            self.port,
        )
    }

    /// Parses a key's `endpoint_url`: a canonical origin, nothing else.
    pub fn parse(input: &str) -> Result<Endpoint, EndpointError> {
        let url = parse_origin(input)?;
        let (host, is_dns) = match url.host() {
            Some(Host::Domain(domain)) => {
                dns_labels(domain)?;
                (domain.to_owned(), true)
            }
            Some(Host::Ipv4(ip)) => (ip.to_string(), false),
            Some(Host::Ipv6(ip)) => (format!("[{ip}]"), false),
            None => return Err(EndpointError::Host),
        };
        let port = url.port_or_known_default().ok_or(EndpointError::NotAUrl)?;
        Ok(Endpoint {
            scheme: url.scheme().to_owned(),
            host,
            is_dns,
            port,
        })
    }
}

impl EndpointPattern {
    /// Parses an operator's pattern: `scheme://host[:port]`, where one DNS label may hold
    /// one `*` (`https://*.p.googleapis.com`, `https://vpce-*.kms.eu-west-1.vpce.amazonaws.com`)
    /// or the port may be `*` (`http://127.0.0.1:*`, for test servers).
    pub fn parse(input: &str) -> Result<EndpointPattern, EndpointError> {
        let input = input.trim();
        if input.len() > MAX_LEN {
            return Err(EndpointError::TooLong);
        }
        if input.contains(PLACEHOLDER) || input.matches('*').count() > 1 {
            return Err(EndpointError::Wildcard);
        }
        let trimmed = input.strip_suffix('/').unwrap_or(input);
        let (text, any_port) = match trimmed.strip_suffix(":*") {
            Some(rest) => (rest.to_owned(), true),
            None => (trimmed.replace('*', PLACEHOLDER), false),
        };
        if any_port && text.contains('*') {
            return Err(EndpointError::Wildcard);
        }
        let url = parse_origin(&text)?;
        let host = match url.host() {
            Some(Host::Domain(domain)) => {
                let labels = dns_labels(domain)?;
                match labels.iter().position(|l| l.contains(PLACEHOLDER)) {
                    None => HostPattern::Exact(domain.to_owned()),
                    Some(i) => {
                        let right = labels[i + 1..].to_vec();
                        if right.len() < 2 {
                            return Err(EndpointError::Wildcard);
                        }
                        let (prefix, suffix) = labels[i]
                            .split_once(PLACEHOLDER)
                            .ok_or(EndpointError::Wildcard)?;
                        HostPattern::Wildcard {
                            left: labels[..i].to_vec(),
                            prefix: prefix.to_owned(),
                            suffix: suffix.to_owned(),
                            right,
                        }
                    }
                }
            }
            Some(Host::Ipv4(ip)) => HostPattern::Exact(ip.to_string()),
            Some(Host::Ipv6(ip)) => HostPattern::Exact(format!("[{ip}]")),
            None => return Err(EndpointError::Host),
        };
        if text.contains(PLACEHOLDER) && !matches!(host, HostPattern::Wildcard { .. }) {
            // The placeholder ended up outside the host (a path, userinfo): not a pattern.
            return Err(EndpointError::Wildcard);
        }
        let port = if any_port {
            PortPattern::Any
        } else {
            PortPattern::Exact(url.port_or_known_default().ok_or(EndpointError::NotAUrl)?)
        };
        Ok(EndpointPattern {
            scheme: url.scheme().to_owned(),
            host,
            port,
        })
    }

    /// Whether `endpoint` is one this pattern allows.
    pub fn matches(&self, endpoint: &Endpoint) -> bool {
        if self.scheme != endpoint.scheme {
            return false;
        }
        if let PortPattern::Exact(port) = self.port {
            if port != endpoint.port {
                return false;
            }
        }
        match &self.host {
            HostPattern::Exact(host) => *host == endpoint.host,
            HostPattern::Wildcard {
                left,
                prefix,
                suffix,
                right,
            } => {
                if !endpoint.is_dns {
                    return false;
                }
                let labels: Vec<&str> = endpoint.host.split('.').collect();
                if labels.len() != left.len() + 1 + right.len() {
                    return false;
                }
                let (head, rest) = labels.split_at(left.len());
                let Some((label, tail)) = rest.split_first() else {
                    return false;
                };
                head.iter().zip(left).all(|(a, b)| a == b)
                    && tail.iter().zip(right).all(|(a, b)| a == b)
                    && label.len() > prefix.len() + suffix.len()
                    && label.starts_with(prefix.as_str())
                    && label.ends_with(suffix.as_str())
            }
        }
    }
}

/// Parses `input` as a bare origin and insists that it was written canonically.
fn parse_origin(input: &str) -> Result<Url, EndpointError> {
    if input.len() > MAX_LEN {
        return Err(EndpointError::TooLong);
    }
    let url = Url::parse(input).map_err(|_| EndpointError::NotAUrl)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(EndpointError::Scheme);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(EndpointError::Userinfo);
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(EndpointError::Path);
    }
    // The serialization of an origin is `scheme://host[:port]/`; anything the parser had to
    // rewrite (case, escapes, IDNA, `\`, default ports, IPv4 shorthand) is refused.
    let canonical = url.as_str();
    let written = input.strip_suffix('/').unwrap_or(input);
    if canonical.strip_suffix('/').unwrap_or(canonical) != written {
        return Err(EndpointError::NotCanonical);
    }
    Ok(url)
}

/// The labels of a DNS name: non-empty, letters, digits and `-` (punycode included), so no
/// trailing dot and nothing a resolver could read differently.
fn dns_labels(domain: &str) -> Result<Vec<String>, EndpointError> {
    let labels: Vec<String> = domain.split('.').map(str::to_owned).collect();
    let valid = labels.iter().all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    });
    if valid {
        Ok(labels)
    } else {
        Err(EndpointError::Host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Through the settings' public check, as `provider_for` and the API call it.
    fn allowed(pattern: &str, endpoint: &str) -> bool {
        assert!(EndpointPattern::parse(pattern).is_ok(), "{pattern}");
        crate::KmsSettings {
            allowed_endpoints: vec![pattern.to_owned()],
            ..crate::KmsSettings::default()
        }
        .endpoint_allowed(endpoint)
    }

    #[test]
    fn the_reported_bypass_is_refused() {
        assert!(!allowed(
            "https://*.p.googleapis.com",
            "https://127.0.0.1:9443/.p.googleapis.com"
        ));
        assert_eq!(
            Endpoint::parse("https://127.0.0.1:9443/.p.googleapis.com"),
            Err(EndpointError::Path)
        );
        assert!(allowed(
            "https://*.p.googleapis.com",
            "https://cloudkms-eu.p.googleapis.com"
        ));
    }

    #[test]
    fn patterns_are_validated() {
        for good in [
            "https://kms.internal.example",
            "https://kms.internal.example/",
            "https://*.p.googleapis.com",
            "https://vpce-*.kms.eu-west-1.vpce.amazonaws.com",
            "http://127.0.0.1:*",
            "http://[::1]:8443",
            "https://kms.example:8443",
        ] {
            assert!(EndpointPattern::parse(good).is_ok(), "{good}");
        }
        for (bad, error) in [
            ("kms.example", EndpointError::NotAUrl),
            ("ftp://kms.example", EndpointError::Scheme),
            ("https://a@kms.example", EndpointError::Userinfo),
            ("https://kms.example/v1", EndpointError::Path),
            ("https://kms.example?x", EndpointError::Path),
            ("https://kms.example#x", EndpointError::Path),
            ("https://KMS.example", EndpointError::NotCanonical),
            ("https://kms.example:443", EndpointError::NotCanonical),
            ("https://kms.example.", EndpointError::Host),
            ("https://*", EndpointError::Wildcard),
            ("https://*.com", EndpointError::Wildcard),
            ("https://*.*.example.com", EndpointError::Wildcard),
            ("https://a*b*.example.com", EndpointError::Wildcard),
            ("https://*.example.com:*", EndpointError::Wildcard),
            ("https://kms.example/*", EndpointError::Path),
            ("https://*@kms.example.com", EndpointError::Userinfo),
        ] {
            assert_eq!(EndpointPattern::parse(bad), Err(error), "{bad}");
        }
    }

    #[test]
    fn a_star_covers_exactly_one_label() {
        let p = "https://*.p.googleapis.com";
        assert!(!allowed(p, "https://a.b.p.googleapis.com"));
        assert!(!allowed(p, "https://p.googleapis.com"));
        assert!(!allowed(p, "https://a.p.googleapis.com.evil.example"));
        assert!(!allowed(p, "https://a.p.googleapis.com:8443"));
        assert!(!allowed(p, "http://a.p.googleapis.com"));
        let p = "https://vpce-*.kms.eu-west-1.vpce.amazonaws.com";
        assert!(allowed(
            p,
            "https://vpce-0abc.kms.eu-west-1.vpce.amazonaws.com"
        ));
        assert!(!allowed(
            p,
            "https://vpce-.kms.eu-west-1.vpce.amazonaws.com"
        ));
        assert!(!allowed(
            p,
            "https://x-vpce-0.kms.eu-west-1.vpce.amazonaws.com"
        ));
        let p = "http://127.0.0.1:*";
        assert!(allowed(p, "http://127.0.0.1:9443"));
        assert!(!allowed(p, "http://127.0.0.2:9443"));
        assert!(!allowed(p, "http://127.1:9443"));
        assert!(!allowed(p, "https://127.0.0.1:9443"));
    }

    /// A DNS label as an attacker might pick it (digits, letters, hyphens).
    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?"
    }

    const SUFFIX: &str = "p.googleapis.com";
    const PATTERN: &str = "https://*.p.googleapis.com";

    /// Ways to dress up a host so that a string match would still see the allowed suffix
    /// or prefix, while the request goes elsewhere (or the text is not canonical).
    fn hostile(label: String, other: String, port: u16) -> Vec<String> {
        vec![
            format!("https://{label}.{other}.{SUFFIX}"),
            format!("https://{other}/{label}.{SUFFIX}"),
            format!("https://127.0.0.1:{port}/.{SUFFIX}"),
            format!("https://{label}.{SUFFIX}@{other}.example"),
            format!("https://{other}.example#.{SUFFIX}"),
            format!("https://{other}.example?.{SUFFIX}"),
            format!("https://{other}.example\\.{SUFFIX}"),
            format!("https://{label}.{SUFFIX}:{port}"),
            format!("https://{label}.{SUFFIX}."),
            format!("https://{label}.{SUFFIX}.{other}"),
            format!("https://{}.{SUFFIX}", label.to_ascii_uppercase() + "X"),
            format!("https://{label}%2e{SUFFIX}"),
            format!("https://{label}.p.googleapis%2ecom"),
            format!("https://{label}\u{3002}{SUFFIX}"),
            format!("https://{label}\u{0131}.{SUFFIX}"),
            format!("http://{label}.{SUFFIX}"),
            format!("https://[::ffff:7f00:1]/.{SUFFIX}"),
            format!("https://{label}.{SUFFIX}/"),
        ]
    }

    proptest! {
        #[test]
        fn one_label_under_the_pattern_is_allowed(label in label()) {
            let endpoint = format!("https://{label}.{SUFFIX}");
            prop_assert!(allowed(PATTERN, &endpoint), "{}", endpoint);
            prop_assert!(allowed(PATTERN, &format!("{endpoint}/")), "{}", endpoint);
        }

        #[test]
        fn hostile_urls_are_refused(label in label(), other in label(), port in 1u16..) {
            let cases = hostile(label, other, port);
            // The last case is the valid form with a trailing slash: it must pass, so the
            // others fail for their trick and not for an unrelated reason.
            let (valid, tricks) = cases.split_last().unwrap();
            prop_assert!(allowed(PATTERN, valid), "{}", valid);
            for endpoint in tricks {
                prop_assert!(!allowed(PATTERN, endpoint), "{}", endpoint);
            }
        }

        #[test]
        fn exact_patterns_allow_only_themselves(
            label in label(),
            other in label(),
            port in 1u16..,
            other_port in 1u16..,
        ) {
            let pattern = format!("https://{label}.example:{port}");
            let pattern = if port == 443 { format!("https://{label}.example") } else { pattern };
            prop_assert!(allowed(&pattern, &pattern));
            if other != label {
                prop_assert!(!allowed(&pattern, &pattern.replace(&label, &other)));
            }
            if other_port != port && port != 443 {
                let moved = pattern.replace(&format!(":{port}"), &format!(":{other_port}"));
                prop_assert!(!allowed(&pattern, &moved), "{}", moved);
            }
            let with_path = format!("{pattern}/x");
            prop_assert!(!allowed(&pattern, &with_path));
            let with_user = pattern.replace("https://", &format!("https://{other}@"));
            prop_assert!(!allowed(&pattern, &with_user));
        }

        #[test]
        fn arbitrary_text_never_panics_and_never_matches_by_accident(text in ".{0,80}") {
            if let Ok(pattern) = EndpointPattern::parse(&text) {
                // A pattern without wildcard allows exactly its own text.
                if !text.contains('*') {
                    let text = text.trim();
                    prop_assert!(Endpoint::parse(text).is_ok_and(|e| pattern.matches(&e)));
                }
            }
            if let Ok(endpoint) = Endpoint::parse(&text) {
                let pattern = EndpointPattern::parse(PATTERN).unwrap();
                if pattern.matches(&endpoint) {
                    let text = text.strip_suffix('/').unwrap_or(&text);
                    let host = text.strip_prefix("https://").unwrap();
                    let dotted = format!(".{SUFFIX}");
                    prop_assert!(host.ends_with(&dotted));
                    prop_assert_eq!(host.matches('.').count(), 3);
                }
            }
        }
    }
}
