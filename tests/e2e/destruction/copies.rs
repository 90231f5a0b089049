//! Copies of the database (backups, WAL archives, replicas) made before a revoke or a
//! switch to a customer key open nothing once the platform master key is rotated.

use crate::data_plane::managed_org;
use crate::harness::{decrypt, encrypt};
use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

use super::*;

async fn revoke_holds_against_copies_once_the_master_key_is_rotated(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, token) = managed_org(&app).await;
    let team = app.scope(&token, "team", "research", &org).await;
    let thread = app.scope(&token, "thread", "t", &team).await;
    let survivor = app.scope(&token, "thread", "kept", &team).await;
    let ct = |r: crate::harness::Response| r.str("ciphertext");
    let secret = ct(encrypt(
        &app,
        &token,
        &thread,
        b"the merger closes friday",
        "messages",
    )
    .await);
    let team_data = ct(encrypt(&app, &token, &team, b"team notes", "messages").await);
    let kept = ct(encrypt(&app, &token, &survivor, b"kept thread", "messages").await);
    let old_master = master_key(app.data_dir());

    // The attacker's copy, made before the revoke; with the master key it opens the thread
    // (so this test can fail).
    let before = KeyCopy::take(&app.db).await;
    assert!(opens(
        &before.recover(std::slice::from_ref(&old_master)),
        &secret
    ));

    let revoked = app.revoke(&token, &thread).await;
    assert_eq!(revoked.status, 200, "{:?}", revoked.body);
    assert_eq!(destruction(&revoked.body).1, "after_master_key_rotation");
    // The job runs in the background from the revoke on; waiting for it here is
    // deterministic (one run at a time per process).
    app.rekeyer.run_pending().await.unwrap();
    let scope = app.get(&format!("/v1/scopes/{thread}"), &token).await;
    assert_eq!(
        destruction(&scope.body),
        ("done".to_owned(), "after_master_key_rotation".to_owned())
    );
    // A scope below a revoke reports the same; one beside it has no destruction.
    let beside = app.get(&format!("/v1/scopes/{survivor}"), &token).await;
    assert!(beside.body.get("destruction").is_none());

    // The live database alone no longer opens the thread, and still opens the rest.
    let after = KeyCopy::take(&app.db).await;
    let live = after.recover(std::slice::from_ref(&old_master));
    assert!(!opens(&live, &secret));
    assert!(opens(&live, &team_data) && opens(&live, &kept));
    // Every ancestor was re-keyed: the old copy's wrapping keys of the team and the
    // organization are gone from the live database, so the old copy together with today's
    // rows opens the thread only through the old master key.
    let with_old_copy = KeyCopy::merge(&[&before, &after]);
    assert!(
        opens(
            &with_old_copy.recover(std::slice::from_ref(&old_master)),
            &secret
        ),
        "until the master key rotates, an old copy still opens the thread: `copies` says so"
    );

    let app = rotate_master_key(app).await;
    let new_master = master_key(app.data_dir());
    assert_ne!(new_master.fingerprint(), old_master.fingerprint());
    assert!(!app.data_dir().join("master.key.new").exists());
    let rotated = KeyCopy::take(&app.db).await;
    // Everything the platform holds afterwards (every row, the master key) plus every copy
    // ever made: the thread stays closed, the survivors open.
    let everything = KeyCopy::merge(&[&before, &after, &rotated]);
    let keys = everything.recover(&[new_master]);
    assert!(!opens(&keys, &secret), "no copy opens the revoked thread");
    assert!(opens(&keys, &team_data) && opens(&keys, &kept));
    // The server (which loads the rotated key from the file) still serves the survivors.
    for (scope, ciphertext) in [(&team, &team_data), (&survivor, &kept)] {
        let answer = decrypt(&app, &token, scope, ciphertext, "messages").await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    let scope = app.get(&format!("/v1/scopes/{thread}"), &token).await;
    assert_eq!(
        destruction(&scope.body),
        ("done".to_owned(), "done".to_owned())
    );
    // The re-key is in the audit log.
    let audit = app
        .get(&format!("/v1/audit?org={org}&scope={thread}"), &token)
        .await;
    let actions: Vec<&str> = audit.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(
        actions[actions.len() - 5..],
        [
            "scope.revoke",
            "scope.rekey_start",
            "scope.rekey_progress",
            "scope.rekey_progress",
            "scope.rekey_complete"
        ],
        "{actions:?}"
    );
    app.stop().await;
}
on_both_backends!(revoke_holds_against_copies_once_the_master_key_is_rotated);

/// BYOK: a copy made while the platform key alone wrapped the organization key, together
/// with everything the platform holds after the switch and a master-key rotation, yields
/// nothing without the customer's KMS.
async fn byok_switch_holds_against_copies_once_the_master_key_is_rotated(backend: Backend) {
    let customer = CustomerKey::create().await;
    let options = || customer.options();
    let app = TestApp::spawn_with(backend, options()).await;
    let (org, token) = managed_org(&app).await;
    let thread = app.scope(&token, "thread", "t", &org).await;
    let secret = encrypt(&app, &token, &thread, b"before byok", "messages")
        .await
        .str("ciphertext");
    let old_master = master_key(app.data_dir());
    let before = KeyCopy::take(&app.db).await;
    assert!(opens(
        &before.recover(std::slice::from_ref(&old_master)),
        &secret
    ));

    customer.connect(&app, &token, &org).await;
    // Today's rows and the platform key: nothing, the customer's KMS is needed.
    let after = KeyCopy::take(&app.db).await;
    assert!(!opens(
        &after.recover(std::slice::from_ref(&old_master)),
        &secret
    ));
    // Until the platform key rotates, the old copy still opens with it.
    assert!(opens(
        &KeyCopy::merge(&[&before, &after]).recover(std::slice::from_ref(&old_master)),
        &secret
    ));

    let app = rotate_master_key_with(app, options()).await;
    let new_master = master_key(app.data_dir());
    let rotated = KeyCopy::take(&app.db).await;
    let everything = KeyCopy::merge(&[&before, &after, &rotated]);
    assert!(
        !opens(&everything.recover(&[new_master]), &secret),
        "every copy and the platform's keys open nothing without the customer's KMS"
    );
    // With the customer's KMS, the server still decrypts.
    let opened = decrypt(&app, &token, &thread, &secret, "messages").await;
    assert_eq!(opened.status, 200, "{:?}", opened.body);
    app.stop().await;
}
on_both_backends!(byok_switch_holds_against_copies_once_the_master_key_is_rotated);

/// BYOK and a revoke: the platform can still call the customer's key, so a copy made after
/// the switch would open the revoked thread through it if the customer key alone wrapped
/// the organization key. The platform key's seal around it makes the rotation retire that
/// copy too.
async fn byok_revoke_holds_against_copies_even_with_the_customer_kms(backend: Backend) {
    let customer = CustomerKey::create().await;
    let options = || customer.options();
    let app = TestApp::spawn_with(backend, options()).await;
    let (org, token) = managed_org(&app).await;
    customer.connect(&app, &token, &org).await;
    let team = app.scope(&token, "team", "research", &org).await;
    let thread = app.scope(&token, "thread", "t", &team).await;
    let secret = encrypt(&app, &token, &thread, b"byok secret", "messages")
        .await
        .str("ciphertext");
    let kms = ekm_kms::provider_for(
        &ekm_domain::MasterKeyRef::parse(
            ekm_domain::Provider::AwsKms,
            &customer.arn,
            None,
            Some(&customer.moto.url),
        )
        .unwrap(),
        &options().kms.settings,
    )
    .await
    .unwrap();
    let old_master = master_key(app.data_dir());
    let before = KeyCopy::take(&app.db).await;
    // With the KMS and the platform key, the copy opens the thread (the test can fail).
    assert!(opens(
        &before
            .recover_with_kms(std::slice::from_ref(&old_master), kms.as_ref())
            .await,
        &secret
    ));
    // With the KMS alone, nothing: the platform key's seal is needed too.
    assert!(!opens(
        &before.recover_with_kms(&[], kms.as_ref()).await,
        &secret
    ));

    assert_eq!(app.revoke(&token, &thread).await.status, 200);
    app.rekeyer.run_pending().await.unwrap();
    let app = rotate_master_key_with(app, options()).await;
    let new_master = master_key(app.data_dir());
    let everything = KeyCopy::merge(&[&before, &KeyCopy::take(&app.db).await]);
    assert!(
        !opens(
            &everything
                .recover_with_kms(&[new_master], kms.as_ref())
                .await,
            &secret
        ),
        "no copy opens the revoked thread, even with the customer's KMS"
    );
    app.stop().await;
}
on_both_backends!(byok_revoke_holds_against_copies_even_with_the_customer_kms);

/// A BYOK organization re-keyed after a platform-key rotation that ran beside the server:
/// the organization's new wrapping key must be sealed with the new platform key, not the
/// destroyed one the server may still hold in memory, or the organization is lost.
async fn byok_rekey_after_a_rotation_beside_the_server_seals_with_the_new_key(backend: Backend) {
    let customer = CustomerKey::create().await;
    // The re-key job runs only when the test runs it: the first run meets the destroyed
    // platform key the server still holds (on PostgreSQL), and must finish all the same.
    let options = || crate::harness::Options {
        rekey_in_background: false,
        ..customer.options()
    };
    let app = TestApp::spawn_with(backend, options()).await;
    let (org, token) = managed_org(&app).await;
    customer.connect(&app, &token, &org).await;
    let team = app.scope(&token, "team", "research", &org).await;
    let doomed = app.scope(&token, "thread", "doomed", &team).await;
    let kept = app.scope(&token, "thread", "kept", &team).await;
    let secret = encrypt(&app, &token, &kept, b"kept", "messages")
        .await
        .str("ciphertext");
    let app = rotate_master_key_with(app, options()).await;
    let new_master = master_key(app.data_dir()).fingerprint();

    assert_eq!(app.revoke(&token, &doomed).await.status, 200);
    app.rekeyer.run_pending().await.unwrap();
    for row in app.db.wrapping_keys(&org).await.unwrap() {
        assert_eq!(
            row.master_fingerprint.as_deref(),
            Some(format!("aws-kms:{}+local:{new_master}", customer.arn).as_str()),
            "sealed with the platform key in force"
        );
    }
    // A fresh instance (no cached keys) still opens the survivor.
    let fresh = app.peer_with(options()).await;
    let opened = decrypt(&fresh, &token, &kept, &secret, "messages").await;
    assert_eq!(opened.status, 200, "{:?}", opened.body);
    fresh.stop().await;
    app.stop().await;
}
on_both_backends!(byok_rekey_after_a_rotation_beside_the_server_seals_with_the_new_key);

/// The KMS key that holds the platform's own master key cannot be connected as an
/// organization's customer key: the customer would hold nothing the platform does not.
async fn the_platform_key_cannot_be_an_organizations_customer_key(backend: Backend) {
    let customer = CustomerKey::create().await;
    let mut options = customer.options();
    options.kms.platform_key = Some(
        ekm_domain::MasterKeyRef::parse(
            ekm_domain::Provider::AwsKms,
            &customer.arn,
            None,
            Some(&customer.moto.url),
        )
        .unwrap(),
    );
    let app = TestApp::spawn_with(backend, options).await;
    let (org, token) = managed_org(&app).await;
    let refused = crate::byok::connect(
        &app,
        &token,
        &org,
        serde_json::json!({"provider": "aws-kms", "key_id": customer.arn, "endpoint_url": customer.moto.url}),
    )
    .await;
    refused.assert_problem(400, "invalid_request");
    let org_now = app.get(&format!("/v1/orgs/{org}"), &token).await;
    assert_eq!(org_now.body["tier"], "managed", "nothing changed");
    app.stop().await;
}
on_both_backends!(the_platform_key_cannot_be_an_organizations_customer_key);
