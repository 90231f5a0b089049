//! Frozen JSON of every event type and version ever stored. If one of these stops loading,
//! a stored event has been broken: add an upcaster and a new version instead.
//!
//! Fixture files are named `<EventType>.v<version>.json`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use cqrs_es::persist::SerializedEvent;
use cqrs_es::DomainEvent;
use ekm_domain::upcast::upcast;
use ekm_domain::ScopeEvent;

fn fixtures() -> Vec<(String, String, serde_json::Value)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/events");
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).expect("fixture directory") {
        let path = entry.expect("entry").path();
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_owned();
        let stem = file.strip_suffix(".json").expect("a .json fixture");
        let (event_type, version) = stem.split_once(".v").expect("<Type>.v<N>.json");
        let text = std::fs::read_to_string(&path).expect("fixture readable");
        let payload = serde_json::from_str(&text).expect("fixture is JSON");
        out.push((event_type.to_owned(), version.to_owned(), payload));
    }
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

fn load(event_type: &str, version: &str, payload: serde_json::Value) -> ScopeEvent {
    let stored = SerializedEvent::new(
        "id".into(),
        1,
        "scope".into(),
        event_type.into(),
        version.into(),
        payload,
        serde_json::Value::Null,
    );
    serde_json::from_value(upcast(stored).payload).expect("fixture loads after upcasting")
}

#[test]
fn every_stored_version_of_every_event_type_still_loads() {
    let fixtures = fixtures();
    for event_type in ScopeEvent::TYPES {
        assert!(
            fixtures.iter().any(|(t, _, _)| t == event_type),
            "no fixture for {event_type}"
        );
    }
    for (event_type, version, payload) in fixtures {
        let event = load(&event_type, &version, payload.clone());
        assert_eq!(event.event_type(), event_type);
        if event.event_version() == version {
            // The current version round-trips exactly.
            assert_eq!(serde_json::to_value(&event).expect("serializes"), payload);
        }
    }
}

#[test]
fn current_version_of_every_event_type_has_a_fixture() {
    let fixtures = fixtures();
    let samples = fixtures
        .iter()
        .map(|(t, v, p)| load(t, v, p.clone()))
        .collect::<Vec<_>>();
    for event in samples {
        let current = (event.event_type(), event.event_version());
        assert!(
            fixtures
                .iter()
                .any(|(t, v, _)| (t.clone(), v.clone()) == current),
            "no fixture for the current version {current:?}"
        );
    }
}

#[test]
fn organization_created_v1_is_read_as_v2_without_an_admin_token_id() {
    let v1 = serde_json::json!({"OrganizationCreated": {
        "org_id": "0190c7a2-8a1e-7c3b-9d4e-2f1a3b5c6d7e", "name": "Acme",
        "plan": "enterprise", "tier": "managed", "key_version": 1}});
    match load("OrganizationCreated", "1", v1) {
        ScopeEvent::OrganizationCreated {
            admin_token_id,
            name,
            ..
        } => {
            assert_eq!(admin_token_id, None);
            assert_eq!(name.as_str(), "Acme");
        }
        other => panic!("upcast to {other:?}"),
    }
}

#[test]
fn every_event_type_has_exactly_one_audit_action_and_back() {
    assert_eq!(ekm_domain::events::ACTIONS.len(), ScopeEvent::TYPES.len());
    for (event_type, version, payload) in fixtures() {
        let event = load(&event_type, &version, payload);
        assert_eq!(
            ScopeEvent::type_of_action(event.action()),
            Some(event_type.as_str()),
            "{event_type} is filtered by its action"
        );
    }
    assert_eq!(ScopeEvent::type_of_action("scope.explode"), None);
}
