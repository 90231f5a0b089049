//! Frozen JSON of every event type and version ever stored. If one of these stops loading,
//! a stored event has been broken: add an upcaster and a new version instead.

use cqrs_es::DomainEvent;
use ekm_domain::ScopeEvent;

#[test]
fn every_event_type_has_a_fixture_that_loads_and_round_trips() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/events");
    for event_type in ScopeEvent::TYPES {
        let path = format!("{dir}/{event_type}.v1.json");
        let text = std::fs::read_to_string(&path).expect("fixture exists");
        let stored: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
        let event: ScopeEvent = serde_json::from_value(stored.clone()).expect("fixture loads");
        assert_eq!(event.event_type(), event_type);
        assert_eq!(event.event_version(), "1");
        assert_eq!(
            serde_json::to_value(&event).expect("serializes"),
            stored,
            "{path}"
        );
    }
}
