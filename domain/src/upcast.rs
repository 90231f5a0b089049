//! Upcasters: how older stored event versions are read as the current ones.
//!
//! Stored events are never rewritten. When an event's shape changes, its version goes up and
//! an upcaster here turns the old JSON into the new shape on the way in. Every version ever
//! stored keeps a frozen fixture under `domain/tests/fixtures/events/`.

use cqrs_es::persist::{EventUpcaster, SerializedEvent};

/// All upcasters, oldest version first, as cqrs-es expects them.
pub fn upcasters() -> Vec<Box<dyn EventUpcaster>> {
    vec![]
}

/// Applies every upcaster that matches, in order.
pub fn upcast(event: SerializedEvent) -> SerializedEvent {
    upcasters().iter().fold(event, |event, upcaster| {
        if upcaster.can_upcast(&event.event_type, &event.event_version) {
            upcaster.upcast(event)
        } else {
            event
        }
    })
}
