//! A mixed deployment: tasks travel through the Redis broker, their
//! results are kept by the Postgres result backend. A chord (ten `square`
//! members, then a `total` callback fired once when all ten are done) runs
//! on a worker in this process, and the callback's result is printed.
//!
//! ```text
//! cargo run -p example-redis-postgres
//! STEM_BROKER_URL=redis://10.0.0.5:6379/2 STEM_RESULT_BACKEND_URL=postgres://app@db.internal:5432/app \
//!     cargo run -p example-redis-postgres
//! ```
//!
//! The broker is `STEM_BROKER_URL` (default `redis://127.0.0.1:6379`), the
//! backend `STEM_RESULT_BACKEND_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). Each run uses a namespace of
//! its own, so a Postgres schema of its own (`stem_` and the namespace),
//! and at the end deletes its Redis keys and drops that schema. Exits 2
//! when no Redis or no Postgres answers.

// A program that shows its results prints them.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;
use std::time::Duration;

use stem::{GroupSpec, TaskHandle, TaskId, TaskState};
use stem_adapters::postgres::{PostgresBroker, PostgresOptions};
use stem_adapters::redis::{RedisBroker, RedisOptions};

/// How many members the chord has.
const MEMBERS: u64 = 10;

/// A member of the chord.
#[stem::task(queue = "squares")]
async fn square(n: u64) -> u64 {
    n * n
}

/// The chord's callback: sums the results of its group's members, read
/// from the result backend.
#[stem::task(queue = "totals", retries = 0)]
async fn total(ctx: stem::Context, group: TaskId) -> Result<u64, String> {
    let backend = ctx
        .client()
        .and_then(|c| c.backend())
        .ok_or("the worker has no result backend")?;
    let status = backend
        .group(group)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("group {group} is unknown"))?;
    let mut sum = 0;
    for (id, record) in status.members {
        match record.map(|r| r.state) {
            Some(TaskState::Succeeded { result }) => {
                sum += serde_json::from_str::<u64>(result.get()).map_err(|e| e.to_string())?;
            }
            other => return Err(format!("member {id} did not succeed: {other:?}")),
        }
    }
    Ok(sum)
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .init();
    let broker_url = env_or("STEM_BROKER_URL", "redis://127.0.0.1:6379");
    let backend_url = env_or(
        "STEM_RESULT_BACKEND_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    // Letters and digits only, so the schema is `stem_` and the namespace
    // itself (see `stem_adapters::postgres::schema_name`).
    let namespace = format!("redispostgres{}", TaskId::new().as_uuid().simple());

    // Is Redis there? This client also deletes the run's keys at the end.
    let redis = match RedisBroker::connect(
        &broker_url,
        RedisOptions {
            namespace: namespace.clone(),
            ..RedisOptions::default()
        },
    )
    .await
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "redis-postgres: no Redis answers at {broker_url}: {e}\n\
                 Start one (`redis-server --port 6379`) or point STEM_BROKER_URL at one (redis://host:port[/db])."
            );
            return ExitCode::from(2);
        }
    };
    // Is Postgres there? This client makes the run's schema and drops it at
    // the end.
    let postgres = match PostgresBroker::connect(
        &backend_url,
        PostgresOptions {
            namespace: namespace.clone(),
            max_connections: Some(2),
            ..PostgresOptions::default()
        },
    )
    .await
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "redis-postgres: no Postgres answers at {backend_url}: {e}\n\
                 Start one or point STEM_RESULT_BACKEND_URL at one (postgres://user@host:5432/database)."
            );
            return ExitCode::from(2);
        }
    };

    let outcome = run_chord(&broker_url, &backend_url, &namespace).await;
    let mut clean = true;
    match redis.delete_namespace(&namespace).await {
        Ok(n) => println!("cleanup: deleted {n} Redis keys of namespace {namespace}"),
        Err(e) => {
            eprintln!("redis-postgres: could not delete the run's Redis keys: {e}");
            clean = false;
        }
    }
    match postgres.drop_schema().await {
        Ok(()) => println!("cleanup: dropped Postgres schema {}", postgres.schema()),
        Err(e) => {
            eprintln!(
                "redis-postgres: could not drop Postgres schema {}: {e}",
                postgres.schema()
            );
            clean = false;
        }
    }
    match outcome {
        Ok(()) if clean => ExitCode::SUCCESS,
        Ok(()) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("redis-postgres: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_chord(
    broker_url: &str,
    backend_url: &str,
    namespace: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let stem = stem::connect_with(broker_url, Some(backend_url), namespace).await?;
    println!("broker:  {}", stem.broker().describe());
    let backend = stem.backend().ok_or("no result backend")?;
    println!("backend: {}", backend.describe());
    println!("namespace: {namespace}");

    let worker = stem::worker::Worker::builder()
        .client(&stem)
        .queues(["squares", "totals"])
        .concurrency(4)
        .build()
        .await?
        .start();

    // A chord is a group of members plus a callback envelope, stored in the
    // result backend before any member is published; the worker that
    // finishes the last member publishes the callback, exactly once.
    let group = TaskId::new();
    let mut members = Vec::new();
    for n in 1..=MEMBERS {
        let mut env = square::with().on(&stem).signature(n).into_envelope()?;
        env.group_id = Some(group);
        members.push(env);
    }
    let callback = total::with().on(&stem).signature(group).into_envelope()?;
    let callback_id = callback.id;
    backend
        .create_group(GroupSpec {
            id: group,
            members: members.iter().map(|e| e.id).collect(),
            callback: Some(callback),
            ttl: Duration::from_secs(3600),
        })
        .await?;
    stem.publish_many(members).await?;
    println!("chord {group}: {MEMBERS} squares published, callback {callback_id}");

    let result = TaskHandle::<u64>::new(callback_id, stem.clone())
        .wait(Duration::from_secs(30))
        .await;
    worker.shutdown();
    let report = worker.join().await;
    let sum = result?;
    let want: u64 = (1..=MEMBERS).map(|n| n * n).sum();
    println!("total(squares of 1..={MEMBERS}) = {sum}");
    println!(
        "worker: {} started, {} succeeded, {} failed",
        report.started, report.succeeded, report.failed
    );
    if sum != want {
        return Err(format!("the callback returned {sum}, expected {want}").into());
    }
    Ok(())
}
