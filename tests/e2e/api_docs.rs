//! docs/api.md stays true to the code (issue 18 §7): it lists every audit action with its
//! event type, and every problem code.

fn api_md() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md"))
        .expect("docs/api.md")
}

#[test]
fn the_api_docs_list_every_audit_action_with_its_event_type() {
    let docs = api_md();
    let missing: Vec<_> = ekm_domain::events::ACTIONS
        .iter()
        .filter(|(action, event)| !docs.contains(&format!("| `{action}` | `{event}` |")))
        .collect();
    assert!(missing.is_empty(), "docs/api.md does not list {missing:?}");
}

#[test]
fn the_api_docs_list_every_problem_code() {
    let docs = api_md();
    let missing: Vec<_> = ekm_api::Code::ALL
        .iter()
        .map(|code| code.as_str())
        .filter(|code| !docs.contains(&format!("| `{code}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/api.md's errors table lacks {missing:?}"
    );
}
