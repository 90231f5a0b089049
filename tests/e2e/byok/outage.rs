//! When the customer's KMS fails: the grace period then fail-closed, a failed unwrap
//! prompting a health check, and a warm cache that needs no KMS call.

use super::*;

/// An outage is not the customer's decision: cached organization keys keep serving for the
/// grace period, after which the monitor records `unavailable` (unreachable) and requests
/// fail closed; the KMS answering again brings the organization back.
async fn decrypt_fails_closed_after_the_grace_period_when_the_kms_is_out(backend: Backend) {
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let (proxy, faults) = aws_fault_proxy(&moto.url).await;
    let grace = Duration::from_secs(2);
    let app = TestApp::spawn_with(
        backend,
        options(aws_environment(), grace, Duration::from_millis(300)),
    )
    .await;
    let (org, token) = enterprise_org(&app).await;
    let thread = app.scope(&token, "thread", "t", &org).await;
    let connected = connect(
        &app,
        &token,
        &org,
        json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": proxy}),
    )
    .await;
    assert_eq!(connected.status, StatusCode::OK, "{}", connected.body);
    let sealed = encrypt(&app, &token, &thread, "during an outage")
        .await
        .str("ciphertext");

    // KMS stops answering.
    let outage = Instant::now();
    faults.arm(
        "*",
        aws_error("ServiceUnavailable", "the service is unavailable"),
        usize::MAX,
    );
    // Past the cache TTL but within the grace period, the cached organization key serves.
    // This sleep is the behaviour under test (the TTL has to pass), not synchronisation.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let opened = decrypt(&app, &token, &thread, &sealed).await;
    assert_eq!(opened.status, StatusCode::OK, "{}", opened.body);
    assert_eq!(
        app.get(&format!("/v1/scopes/{thread}"), &token).await.body["effective_state"],
        "active"
    );

    // After the grace period the monitor records the outage, and requests fail closed.
    wait_for_state(&app, &token, &thread, "unavailable").await;
    // A lower bound (not before the grace period is over): a busy machine cannot break it.
    assert!(
        outage.elapsed() >= grace,
        "recorded after {:?}",
        outage.elapsed()
    );
    let shown = app.get(&format!("/v1/orgs/{org}/master-key"), &token).await;
    assert_eq!(shown.body["reason"], "unreachable");
    assert_eq!(
        decrypt(&app, &token, &thread, &sealed).await.body["code"],
        "key_unavailable"
    );

    // KMS is back.
    faults.clear();
    wait_for_state(&app, &token, &thread, "active").await;
    assert_eq!(
        decrypt(&app, &token, &thread, &sealed).await.status,
        StatusCode::OK
    );
}
on_both_backends!(decrypt_fails_closed_after_the_grace_period_when_the_kms_is_out);

/// A customer who removes the platform's permission to decrypt (DescribeKey still works):
/// the first failed unwrap makes the monitor check at once, and the organization is
/// unavailable with the reason, without waiting for the interval.
async fn decrypt_triggers_a_health_check_at_once_when_the_unwrap_fails(backend: Backend) {
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let (proxy, faults) = aws_fault_proxy(&moto.url).await;
    // No key caching at all: the decrypt below must reach KMS. (A 1 ms cache made this test
    // flaky: a decrypt served within a millisecond of the encrypt used the cached key.)
    let mut options = options(aws_environment(), Duration::from_secs(60), Duration::ZERO);
    options.health_interval = Some(Duration::from_secs(3600));
    let app = TestApp::spawn_with(backend, options).await;
    let (org, token) = enterprise_org(&app).await;
    let thread = app.scope(&token, "thread", "t", &org).await;
    assert_eq!(
        connect(
            &app,
            &token,
            &org,
            json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": proxy})
        )
        .await
        .status,
        StatusCode::OK
    );
    let sealed = encrypt(&app, &token, &thread, "x").await.str("ciphertext");
    faults.arm(
        "Decrypt",
        aws_error(
            "AccessDeniedException",
            "not authorized to perform kms:Decrypt",
        ),
        usize::MAX,
    );
    let refused = decrypt(&app, &token, &thread, &sealed).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.body
    );
    assert_eq!(refused.body["code"], "key_unavailable");
    assert_eq!(refused.body["provider_error"]["kind"], "access_denied");
    wait_for_state(&app, &token, &thread, "unavailable").await;
    let shown = app.get(&format!("/v1/orgs/{org}/master-key"), &token).await;
    assert_eq!(shown.body["reason"], "access_denied");
}
on_both_backends!(decrypt_triggers_a_health_check_at_once_when_the_unwrap_fails);

/// Warm cache: no KMS call per data-plane request.
async fn decrypt_calls_kms_zero_times_when_the_cache_is_warm(backend: Backend) {
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let app = TestApp::spawn_with(
        backend,
        options(
            aws_environment(),
            Duration::from_secs(60),
            Duration::from_secs(300),
        ),
    )
    .await;
    let (org, token) = enterprise_org(&app).await;
    let threads = [
        app.scope(&token, "thread", "a", &org).await,
        app.scope(&token, "thread", "b", &org).await,
    ];
    assert_eq!(
        connect(
            &app,
            &token,
            &org,
            json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": moto.url})
        )
        .await
        .status,
        StatusCode::OK
    );
    // Cold: the first request of each scope; the organization key is unwrapped once.
    let before = app.app.keys().kms_call_count();
    for thread in &threads {
        assert_eq!(
            encrypt(&app, &token, thread, "warm-up").await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        app.app.keys().kms_call_count() - before,
        1,
        "one unwrap for both scopes"
    );
    let warm = app.app.keys().kms_call_count();
    for i in 0..500 {
        let thread = &threads[i % 2];
        let sealed = encrypt(&app, &token, thread, "hello")
            .await
            .str("ciphertext");
        assert_eq!(
            decrypt(&app, &token, thread, &sealed).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        app.app.keys().kms_call_count(),
        warm,
        "0 KMS calls for 1,000 warm requests"
    );
}
on_both_backends!(decrypt_calls_kms_zero_times_when_the_cache_is_warm);

// ---------------------------------------------------------------------------------------
// Google Cloud KMS and Azure Key Vault, over HTTP against fakes of their documented APIs.

/// One encrypt per thread of an organization, all at once.
async fn burst(
    app: &TestApp,
    (token, threads): &(String, Vec<String>),
    text: &str,
) -> Vec<crate::harness::Response> {
    futures_util::future::join_all(
        threads
            .iter()
            .map(|thread| encrypt(app, token, thread, text)),
    )
    .await
}

/// Many requests that miss the cache at once make one unwrap through the customer's KMS
/// (coalescing); while it fails, one call per second, not one per request (negative cache).
async fn concurrent_misses_call_the_kms_once_when_it_is_slow_or_failing(backend: Backend) {
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let (proxy, faults) = aws_fault_proxy(&moto.url).await;
    // No health monitor: every Decrypt counted is one the data plane made.
    let app = TestApp::spawn_with(
        backend,
        Options {
            health_interval: None,
            ..options(
                aws_environment(),
                Duration::from_secs(60),
                Duration::from_secs(300),
            )
        },
    )
    .await;
    // Each organization's key is unwrapped through the KMS on its first request after the
    // key is connected: its cache starts cold.
    let mut orgs = vec![];
    for _ in 0..2 {
        let (org, token) = enterprise_org(&app).await;
        let mut threads = vec![];
        for i in 0..16 {
            threads.push(app.scope(&token, "thread", &format!("t{i}"), &org).await);
        }
        let connected = connect(
            &app,
            &token,
            &org,
            json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": proxy}),
        )
        .await;
        assert_eq!(connected.status, StatusCode::OK, "{}", connected.body);
        orgs.push((token, threads));
    }

    // A KMS that takes 300 ms to answer: 16 requests at once, one Decrypt.
    faults.arm(
        "Decrypt",
        Fault::Delay(Duration::from_millis(300)),
        usize::MAX,
    );
    let before = faults.seen("Decrypt");
    let answers = burst(&app, &orgs[0], "slow").await;
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    assert_eq!(
        faults.seen("Decrypt") - before,
        1,
        "one unwrap for 16 misses"
    );
    assert_eq!(
        app.app.keys().pending_slots(),
        (0, 0),
        "nothing left in flight"
    );

    // A KMS that refuses: 16 requests at once, one Decrypt, all refused.
    faults.clear();
    faults.arm(
        "Decrypt",
        aws_error("KMSInvalidStateException", "the key is disabled"),
        usize::MAX,
    );
    let before = faults.seen("Decrypt");
    let answers = burst(&app, &orgs[1], "refused").await;
    assert!(answers.iter().all(|a| a.status != StatusCode::OK));
    assert_eq!(
        faults.seen("Decrypt") - before,
        1,
        "the failure answers the other 15 from the negative cache"
    );
    assert_eq!(
        app.app.keys().pending_slots().0,
        0,
        "nothing left in flight"
    );
}
on_both_backends!(concurrent_misses_call_the_kms_once_when_it_is_slow_or_failing);

/// Health checks run side by side, each within its own deadline: an organization whose
/// KMS answers after 15 s does not delay another organization's detection of a disabled key.
/// (The bound asserted is the behaviour: checked one after the other, the disabled key would
/// be found only after the slow KMS had answered, 15 s later.)
async fn a_slow_customer_kms_delays_no_other_organizations_health_check(backend: Backend) {
    let moto = Moto::start().await;
    let slow_key = moto.create_key().await;
    let fast_key = moto.create_key().await;
    let (proxy, faults) = aws_fault_proxy(&moto.url).await;
    // Each KMS call may take 20 s: only the check's own deadline (10 s) cuts the slow one.
    let mut slow_calls = options(
        aws_environment(),
        Duration::from_secs(60),
        Duration::from_secs(300),
    );
    slow_calls.kms.settings.timeout = Duration::from_secs(20);
    let app = TestApp::spawn_with(backend, slow_calls).await;
    let (slow_org, slow_token) = enterprise_org(&app).await;
    let (fast_org, fast_token) = enterprise_org(&app).await;
    let fast_thread = app.scope(&fast_token, "thread", "t", &fast_org).await;
    for (org, token, key, endpoint) in [
        (&slow_org, &slow_token, &slow_key, &proxy),
        (&fast_org, &fast_token, &fast_key, &moto.url),
    ] {
        let connected = connect(
            &app,
            token,
            org,
            json!({"provider": "aws-kms", "key_id": key, "endpoint_url": endpoint}),
        )
        .await;
        assert_eq!(connected.status, StatusCode::OK, "{}", connected.body);
    }
    // The slow organization's KMS now answers after 15 s.
    faults.arm("*", Fault::Delay(Duration::from_secs(15)), usize::MAX);
    let disabled = Instant::now();
    moto.disable(&fast_key).await;
    wait_for_state(&app, &fast_token, &fast_thread, "unavailable").await;
    assert!(
        disabled.elapsed() < Duration::from_secs(12),
        "the disabled key was found after {:?}",
        disabled.elapsed()
    );
    assert!(
        faults.seen("DescribeKey") >= 1,
        "the slow KMS was being checked"
    );
}
on_both_backends!(a_slow_customer_kms_delays_no_other_organizations_health_check);

/// The circuit breaker (issue 20 §3): after 3 unwraps in a row time out against a customer
/// key, calls to it stop for the cooldown: the next organization's request fails at once
/// (not after the KMS's timeout and retries) and the KMS sees no call. Once the KMS
/// answers again, the first call past the cooldown is the probe, and it closes the breaker.
async fn a_failing_kms_key_is_not_called_while_its_breaker_is_open(backend: Backend) {
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    let (proxy, faults) = aws_fault_proxy(&moto.url).await;
    let mut options = options(aws_environment(), Duration::ZERO, Duration::from_secs(60));
    options.health_interval = None;
    options.kms.breaker = ekm_service::breaker::BreakerSettings {
        failures: 3,
        cooldown: Duration::from_millis(400),
        max_cooldown: Duration::from_millis(400),
    };
    let app = TestApp::spawn_with(backend, options).await;
    // Four organizations on the same customer key; their caches start cold.
    let mut orgs = vec![];
    for _ in 0..4 {
        let (org, token) = enterprise_org(&app).await;
        let thread = app.scope(&token, "thread", "t", &org).await;
        let connected = connect(
            &app,
            &token,
            &org,
            json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": proxy}),
        )
        .await;
        assert_eq!(connected.status, StatusCode::OK, "{}", connected.body);
        orgs.push((token, thread));
    }

    // The KMS stops answering: three organizations' first requests each wait out the
    // timeout and retries.
    faults.arm("Decrypt", Fault::Stall(Duration::from_secs(5)), usize::MAX);
    let before = faults.seen("Decrypt");
    let failed = futures_util::future::join_all(
        orgs[..3]
            .iter()
            .map(|(token, thread)| encrypt(&app, token, thread, "outage")),
    )
    .await;
    assert!(
        failed
            .iter()
            .all(|a| a.status == StatusCode::SERVICE_UNAVAILABLE),
        "{failed:?}"
    );
    let calls = faults.seen("Decrypt") - before;
    assert!(calls >= 3, "{calls} calls");

    // The breaker is open: the fourth organization's request fails at once, no call made.
    let (token, thread) = &orgs[3];
    let started = Instant::now();
    let refused = encrypt(&app, token, thread, "outage").await;
    let took = started.elapsed();
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.body
    );
    assert_eq!(faults.seen("Decrypt") - before, calls, "no call while open");
    assert!(
        took < Duration::from_millis(800),
        "failed after {took:?}, the KMS timeout is 800 ms"
    );

    // The KMS is back: past the cooldown one call goes through, and it closes the breaker.
    faults.clear();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = encrypt(&app, token, thread, "back").await;
        if answer.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {}", answer.body);
        // Polling the server from outside: nothing to await until the cooldown ends.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(faults.seen("Decrypt") - before, calls + 1, "one probe");
    for (token, thread) in &orgs {
        assert_eq!(
            encrypt(&app, token, thread, "back").await.status,
            StatusCode::OK
        );
    }
}
on_both_backends!(a_failing_kms_key_is_not_called_while_its_breaker_is_open);
