//! Batches on the data plane (issue 18 §5): `{"items": [...]}` in and out on encrypt,
//! decrypt and rewrap, a result or a problem per item, one access record per item served or
//! refused.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use super::managed_org;
use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

fn items(body: &Value) -> Vec<Value> {
    body["items"].as_array().cloned().unwrap_or_default()
}

fn problem_code(item: &Value) -> &str {
    item["problem"]["code"].as_str().unwrap_or_default()
}

/// The organization's access records, oldest first, as (operation, outcome).
async fn access(app: &TestApp, admin: &str, org: &str) -> Vec<(String, String)> {
    let listed = app
        .get(&format!("/v1/audit/access?org={org}&limit=500"), admin)
        .await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    items(&listed.body)
        .iter()
        .map(|r| {
            (
                r["operation"].as_str().unwrap_or_default().to_owned(),
                r["outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn a_batch_answers_each_item_in_order_and_records_each(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = managed_org(&app).await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let other = app.scope(&admin, "thread", "u", &team).await;

    // Given a batch of two plaintexts, one that is not base64 and one that is not an item
    let sealed = app
        .post(
            &format!("/v1/scopes/{thread}/encrypt"),
            &admin,
            json!({"items": [
                {"plaintext": STANDARD.encode("first"), "class": "messages"},
                {"plaintext": STANDARD.encode("second"), "class": "files"},
                {"plaintext": "%%%", "class": "messages"},
                {"plaintext": STANDARD.encode("no class")},
            ]}),
        )
        .await;
    // Then each item has its own answer, in the request's order
    assert_eq!(sealed.status, 200, "{}", sealed.body);
    let sealed = items(&sealed.body);
    assert_eq!(sealed.len(), 4);
    assert_eq!(sealed[0]["key_version"], 1);
    let first = sealed[0]["ciphertext"].as_str().unwrap().to_owned();
    let second = sealed[1]["ciphertext"].as_str().unwrap().to_owned();
    assert!(first.starts_with(&format!("ekm1.{thread}.1.messages.")));
    assert!(second.starts_with(&format!("ekm1.{thread}.1.files.")));
    assert_eq!(problem_code(&sealed[2]), "invalid_request", "{}", sealed[2]);
    assert_eq!(sealed[2]["problem"]["status"], 400);
    assert_eq!(problem_code(&sealed[3]), "invalid_request", "{}", sealed[3]);
    assert!(
        sealed[3]["problem"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("items[3]: "),
        "{}",
        sealed[3]
    );
    // And three uses are recorded: the item that did not parse used nothing
    assert_eq!(
        access(&app, &admin, &org).await,
        [
            ("encrypt", "ok"),
            ("encrypt", "ok"),
            ("encrypt", "invalid_request")
        ]
        .map(|(o, r)| (o.to_owned(), r.to_owned()))
    );

    // When they are decrypted with one made for another scope and one in the wrong class
    let foreign = items(
        &app.post(
            &format!("/v1/scopes/{other}/encrypt"),
            &admin,
            json!({"items": [{"plaintext": STANDARD.encode("x"), "class": "messages"}]}),
        )
        .await
        .body,
    )[0]["ciphertext"]
        .as_str()
        .unwrap()
        .to_owned();
    let opened = app
        .post(
            &format!("/v1/scopes/{thread}/decrypt"),
            &admin,
            json!({"items": [
                {"ciphertext": second, "class": "files"},
                {"ciphertext": foreign, "class": "messages"},
                {"ciphertext": first, "class": "messages", "justification": "agent_run"},
                {"ciphertext": first, "class": "files"},
            ]}),
        )
        .await;
    assert_eq!(opened.status, 200, "{}", opened.body);
    let opened = items(&opened.body);
    assert_eq!(
        STANDARD
            .decode(opened[0]["plaintext"].as_str().unwrap())
            .unwrap(),
        b"second"
    );
    assert_eq!(problem_code(&opened[1]), "invalid_ciphertext");
    assert_eq!(
        STANDARD
            .decode(opened[2]["plaintext"].as_str().unwrap())
            .unwrap(),
        b"first"
    );
    assert_eq!(problem_code(&opened[3]), "invalid_ciphertext");

    // And a rewrap of a batch seals again with the current version
    let rotated = app
        .post(
            &format!("/v1/scopes/{thread}/rotate"),
            &admin,
            json!({"reason": "batch"}),
        )
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let rewrapped = app
        .post(
            &format!("/v1/scopes/{thread}/rewrap"),
            &admin,
            json!({"items": [{"ciphertext": first, "class": "messages"}]}),
        )
        .await;
    assert_eq!(rewrapped.status, 200, "{}", rewrapped.body);
    let rewrapped = items(&rewrapped.body);
    assert_eq!(rewrapped[0]["key_version"], 2, "{}", rewrapped[0]);
    let again = rewrapped[0]["ciphertext"].as_str().unwrap();
    assert!(again.starts_with(&format!("ekm1.{thread}.2.messages.")));

    // A single request answers as it always did
    let one = app
        .post(
            &format!("/v1/scopes/{thread}/decrypt"),
            &admin,
            json!({"ciphertext": again, "class": "messages"}),
        )
        .await;
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(STANDARD.decode(one.str("plaintext")).unwrap(), b"first");
}
on_both_backends!(a_batch_answers_each_item_in_order_and_records_each);

async fn a_scope_that_cannot_be_used_refuses_the_whole_batch(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = managed_org(&app).await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    let sealed = app
        .post(
            &format!("/v1/scopes/{thread}/encrypt"),
            &admin,
            json!({"items": [{"plaintext": "aGk=", "class": "messages"}]}),
        )
        .await;
    let ciphertext = items(&sealed.body)[0]["ciphertext"]
        .as_str()
        .unwrap()
        .to_owned();

    // Given the scope is paused
    assert_eq!(app.pause(&admin, &thread).await.status, 200);
    // When a batch of two asks to decrypt
    let item = json!({"ciphertext": ciphertext, "class": "messages"});
    let refused = app
        .post(
            &format!("/v1/scopes/{thread}/decrypt"),
            &admin,
            json!({"items": [item, item]}),
        )
        .await;
    // Then the whole request is refused as a single one is, and each item is recorded
    refused.assert_problem(409, "scope_paused");
    let recorded = access(&app, &admin, &org).await;
    let refusals = recorded
        .iter()
        .filter(|(op, outcome)| op == "decrypt" && outcome == "scope_paused")
        .count();
    assert_eq!(refusals, 2, "{recorded:?}");
}
on_both_backends!(a_scope_that_cannot_be_used_refuses_the_whole_batch);

async fn batches_are_bounded_and_datakey_takes_none(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = managed_org(&app).await;
    let thread = app.scope(&admin, "thread", "t", &org).await;
    let encrypt = format!("/v1/scopes/{thread}/encrypt");
    let item = json!({"plaintext": "aGk=", "class": "messages"});

    app.post(&encrypt, &admin, json!({"items": []}))
        .await
        .assert_problem(400, "invalid_request");
    let too_many: Vec<Value> = (0..1001).map(|_| item.clone()).collect();
    app.post(&encrypt, &admin, json!({ "items": too_many }))
        .await
        .assert_problem(400, "invalid_request");
    // 1,000 is the most, and each is answered
    let most: Vec<Value> = (0..1000).map(|_| item.clone()).collect();
    let answered = app.post(&encrypt, &admin, json!({ "items": most })).await;
    assert_eq!(answered.status, 200, "{}", answered.body);
    assert_eq!(items(&answered.body).len(), 1000);
    // Anything beside `items` is neither a batch nor a request
    app.post(
        &encrypt,
        &admin,
        json!({"items": [item], "class": "messages"}),
    )
    .await
    .assert_problem(400, "invalid_request");
    app.post(&encrypt, &admin, json!({"items": item}))
        .await
        .assert_problem(400, "invalid_request");
    app.post(
        &format!("/v1/scopes/{thread}/datakey"),
        &admin,
        json!({"items": [{"class": "messages"}]}),
    )
    .await
    .assert_problem(400, "invalid_request");
    // Nothing of these was used: only the 1,000 are recorded
    let log = app.app.access_log().expect("an access log");
    let filter = ekm_store::AccessFilter {
        org_id: org.clone(),
        limit: 2000,
        ..Default::default()
    };
    assert_eq!(log.query(&filter).await.unwrap().len(), 1000);
}
on_both_backends!(batches_are_bounded_and_datakey_takes_none);

async fn each_item_meets_the_policies_and_is_recorded_on_its_own(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.data_org("enterprise", "default").await;
    let agent = app.scope(&admin, "agent", "bot", &org).await;
    // Given a policy that requires a reason, and a tier that covers credentials, not messages
    let set = app
        .call(
            "PUT",
            &format!("/v1/scopes/{org}/justification-policy"),
            Some(&admin),
            Some(json!({"required": true, "allowed": ["agent_run"], "reason": "KAJ"})),
        )
        .await;
    assert_eq!(set.status, 200, "{}", set.body);
    let good = json!({"plaintext": "aGk=", "class": "credentials", "justification": "agent_run"});
    let mut batch = vec![
        json!({"plaintext": "aGk=", "class": "credentials"}),
        json!({"plaintext": "aGk=", "class": "credentials", "justification": "debugging"}),
        json!({"plaintext": "aGk=", "class": "messages", "justification": "agent_run"}),
    ];
    // and 200 items that pass, more than one turn of the runtime's budget
    batch.extend((0..200).map(|_| good.clone()));
    let answered = app
        .post(
            &format!("/v1/scopes/{agent}/encrypt"),
            &admin,
            json!({ "items": batch }),
        )
        .await;
    assert_eq!(answered.status, 200, "{}", answered.body);
    let answered = items(&answered.body);
    // Then each item is refused or served on its own
    assert_eq!(problem_code(&answered[0]), "justification_required");
    assert_eq!(answered[0]["problem"]["policy_scope_id"], org.as_str());
    assert_eq!(problem_code(&answered[1]), "justification_not_allowed");
    assert_eq!(problem_code(&answered[2]), "class_not_covered");
    assert_eq!(answered[2]["problem"]["status"], 403);
    assert!(answered[3..]
        .iter()
        .all(|item| item["ciphertext"].is_string() && item["key_version"] == 1));
    // And every item is in the access log with its own outcome and reason
    let log = app.app.access_log().expect("an access log");
    let filter = ekm_store::AccessFilter {
        org_id: org.clone(),
        limit: 1000,
        ..Default::default()
    };
    let stored = log.query(&filter).await.unwrap();
    assert_eq!(stored.len(), 203, "{stored:?}");
    let outcomes = |outcome: &str| {
        stored
            .iter()
            .filter(|entry| entry.record.outcome == outcome)
            .count()
    };
    assert_eq!(outcomes("ok"), 200);
    assert_eq!(outcomes("justification_required"), 1);
    assert_eq!(outcomes("justification_not_allowed"), 1);
    assert_eq!(outcomes("class_not_covered"), 1);
    assert!(stored
        .iter()
        .filter(|entry| entry.record.outcome == "ok")
        .all(
            |entry| entry.record.justification.as_deref() == Some("agent_run")
                && entry.record.key_version == Some(1)
        ));
}
on_both_backends!(each_item_meets_the_policies_and_is_recorded_on_its_own);
