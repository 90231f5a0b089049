//! The latency of a cold organization-key unwrap through AWS KMS (a real `moto_server` on
//! loopback), beside the baseline of a bare KMS call to the same server in the same run,
//! and the local provider's unwrap.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use ekm_kms::{Environment, KmsSettings, MasterKeyProvider, WrapContext};

const AUTH: &str = "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=0";

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index.min(samples.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

pub async fn run(unwraps: usize) -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut moto = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("moto_server (pip install 'moto[server]')")?;
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let raw = |target: &str, body: serde_json::Value| {
        client
            .post(&url)
            .header("X-Amz-Target", format!("TrentService.{target}"))
            .header("Content-Type", "application/x-amz-json-1.1")
            .header("Authorization", AUTH)
            .json(&body)
            .send()
    };
    let mut ready = false;
    for _ in 0..400 {
        if client.get(format!("{url}/moto-api/")).send().await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::ensure!(ready, "moto_server did not start");
    let created: serde_json::Value = raw("CreateKey", serde_json::json!({}))
        .await?
        .json()
        .await?;
    let arn = created["KeyMetadata"]["Arn"]
        .as_str()
        .context("CreateKey answer")?
        .to_owned();

    let key =
        ekm_domain::MasterKeyRef::parse(ekm_domain::Provider::AwsKms, &arn, None, Some(&url))?;
    let settings = KmsSettings {
        environment: Environment::from_map(HashMap::from([
            ("AWS_ACCESS_KEY_ID".to_owned(), "bench".to_owned()),
            ("AWS_SECRET_ACCESS_KEY".to_owned(), "bench".to_owned()),
        ])),
        allowed_endpoints: vec![url.clone()],
        ..KmsSettings::default()
    };
    let provider = ekm_kms::provider_for(&key, &settings).await?;
    let context = WrapContext::key_version("0190c7a2-8a1e-7c3b-9d4e-2f1a3b5c6d7e", 1);
    let secret = [7u8; 64];
    let wrapped = provider.wrap(&secret, context).await?;

    // Warm-up of both paths (connections, moto's first-call costs).
    for _ in 0..20 {
        provider.unwrap(&wrapped, context).await?;
        raw("DescribeKey", serde_json::json!({"KeyId": arn})).await?;
    }
    let mut unwrap_times = Vec::with_capacity(unwraps);
    let mut baseline_times = Vec::with_capacity(unwraps);
    for _ in 0..unwraps {
        let started = Instant::now();
        provider.unwrap(&wrapped, context).await?;
        unwrap_times.push(started.elapsed());
        let started = Instant::now();
        raw("DescribeKey", serde_json::json!({"KeyId": arn}))
            .await?
            .bytes()
            .await?;
        baseline_times.push(started.elapsed());
    }

    let local_key = ekm_keys::Kek::generate();
    let dir = std::env::temp_dir().join(format!("ekm-bench-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir)?;
    let master = ekm_keys::LocalMasterKey::load(&dir.join("master.key"), true)?
        .context("local master key")?;
    let local = ekm_kms::LocalProvider::new(master);
    let local_wrapped = local
        .wrap(&local_key.for_master_key_provider(), context)
        .await?;
    let mut local_times = Vec::with_capacity(unwraps);
    for _ in 0..unwraps {
        let started = Instant::now();
        local.unwrap(&local_wrapped, context).await?;
        local_times.push(started.elapsed());
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = moto.kill();
    let _ = moto.wait();

    let unwrap_median = percentile(&mut unwrap_times, 0.5);
    let baseline_median = percentile(&mut baseline_times, 0.5);
    let mut out = std::io::stdout().lock();
    writeln!(out, "| figure | measured | baseline (same run) | ratio |")?;
    writeln!(out, "|---|---|---|---|")?;
    writeln!(
        out,
        "| cold organization-key unwrap through AWS KMS (moto on loopback), {unwraps} unwraps | median {}, p99 {} | bare DescribeKey to the same moto: median {}, p99 {} | {:.2} |",
        ms(unwrap_median),
        ms(percentile(&mut unwrap_times, 0.99)),
        ms(baseline_median),
        ms(percentile(&mut baseline_times, 0.99)),
        unwrap_median.as_secs_f64() / baseline_median.as_secs_f64()
    )?;
    writeln!(
        out,
        "| the same unwrap with the local provider (platform key) | median {:.1} µs | | |",
        percentile(&mut local_times, 0.5).as_secs_f64() * 1e6
    )?;
    Ok(())
}
