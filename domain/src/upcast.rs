//! Upcasters: how older stored event versions are read as the current ones.
//!
//! Stored events are never rewritten. When an event's shape changes, its version goes up and
//! an upcaster here turns the old JSON into the new shape on the way in. Every version ever
//! stored keeps a frozen fixture under `domain/tests/fixtures/events/`.

use cqrs_es::persist::{EventUpcaster, SerializedEvent};

/// All upcasters, oldest version first, as cqrs-es expects them.
pub fn upcasters() -> Vec<Box<dyn EventUpcaster>> {
    vec![Box::new(OrganizationCreatedV1)]
}

/// `OrganizationCreated` version 1 had no `admin_token_id`: read it as `null`.
struct OrganizationCreatedV1;

impl EventUpcaster for OrganizationCreatedV1 {
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        event_type == "OrganizationCreated" && event_version == "1"
    }

    fn upcast(&self, mut event: SerializedEvent) -> SerializedEvent {
        if let Some(body) = event
            .payload
            .get_mut("OrganizationCreated")
            .and_then(|b| b.as_object_mut())
        {
            body.entry("admin_token_id")
                .or_insert(serde_json::Value::Null);
        }
        event.event_version = "2".to_owned();
        event
    }
}

static UPCASTERS: std::sync::LazyLock<Vec<Box<dyn EventUpcaster>>> =
    std::sync::LazyLock::new(upcasters);

/// Whether an event of this type and version is read through an upcaster (else its payload
/// is already the current shape).
pub fn needs_upcast(event_type: &str, event_version: &str) -> bool {
    UPCASTERS
        .iter()
        .any(|upcaster| upcaster.can_upcast(event_type, event_version))
}

/// Applies every upcaster that matches, in order.
pub fn upcast(event: SerializedEvent) -> SerializedEvent {
    UPCASTERS.iter().fold(event, |event, upcaster| {
        if upcaster.can_upcast(&event.event_type, &event.event_version) {
            upcaster.upcast(event)
        } else {
            event
        }
    })
}
