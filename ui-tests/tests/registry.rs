//! What `#[stem::task]` registers and generates, checked at run time on the
//! tasks of `fixture-tasks` (another crate, nested modules) and one local task.

use std::time::Duration;

use fixture_tasks::a::b;
use stem::{Backoff, DeliveryMode, RateLimit, TaskOptions};

#[stem::task(queue = "local")]
async fn local_task(word: String, times: u8) -> String {
    std::future::ready(word.repeat(usize::from(times))).await
}

fn entry(name: &str) -> &'static stem::__private::TaskEntry {
    stem::registry::entries()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no registry entry named {name:?}"))
}

#[test]
fn default_names_are_module_path_and_fn_name() {
    assert_eq!(b::cleanup::NAME, "fixture_tasks::a::b::cleanup");
    assert_eq!(fixture_tasks::cleanup::NAME, "fixture_tasks::cleanup");
    assert_eq!(local_task::NAME, "registry::local_task");
    assert_eq!(b::checksum::NAME, "fixture_tasks::a::b::checksum");
    assert_eq!(
        b::hidden_names(),
        [
            "fixture_tasks::a::b::private_task",
            "fixture_tasks::a::b::super_task",
            "fixture_tasks::a::b::ping",
        ]
    );
    assert_eq!(
        fixture_tasks::a::super_task_name(),
        "fixture_tasks::a::b::super_task"
    );
}

#[test]
fn name_key_overrides_the_default() {
    assert_eq!(b::send_welcome::NAME, "fixture.send_welcome");
    assert_eq!(
        <b::send_welcome::Task as stem::Task>::NAME,
        "fixture.send_welcome"
    );
}

#[test]
fn every_task_is_registered_once_with_its_location() {
    stem::registry::check().expect("no duplicate names");
    let names = [
        "fixture.send_welcome",
        "fixture_tasks::a::b::cleanup",
        "fixture_tasks::a::b::checksum",
        "fixture_tasks::a::b::ping",
        "fixture_tasks::a::b::private_task",
        "fixture_tasks::a::b::super_task",
        "fixture_tasks::cleanup",
        "registry::local_task",
    ];
    for name in names {
        let found = stem::registry::entries().filter(|e| e.name == name).count();
        assert_eq!(found, 1, "{name} registered {found} times");
    }
    let e = entry("fixture.send_welcome");
    // fn_path is the real path even when `name` overrides the name.
    assert_eq!(e.fn_path, "fixture_tasks::a::b::send_welcome");
    assert!(e.file.ends_with("fixture-tasks/src/lib.rs"), "{}", e.file);
    // The line is the fn's, not the attribute's.
    let source = include_str!("../fixture-tasks/src/lib.rs");
    let fn_line = source
        .lines()
        .position(|l| l.contains("pub async fn send_welcome("))
        .expect("fn in source")
        + 1;
    assert_eq!(e.line as usize, fn_line);
    let local = entry("registry::local_task");
    assert_eq!(local.fn_path, "registry::local_task");
    assert_eq!(local.options.queue, "local");
}

#[test]
fn options_hold_every_declared_key() {
    let expected = TaskOptions {
        queue: "emails.high",
        priority: 7,
        retries: 5,
        backoff: Backoff::Exponential {
            base: Duration::from_millis(250),
            max: Duration::from_secs(86_400),
        },
        timeout: Some(Duration::from_secs(30)),
        lease: Some(Duration::from_secs(300)),
        delivery: DeliveryMode::AtLeastOnce,
        rate_limit: Some(RateLimit {
            count: 100,
            per: Duration::from_secs(1),
        }),
        blocking: false,
    };
    assert_eq!(b::send_welcome::OPTIONS, expected);
    assert_eq!(<b::send_welcome::Task as stem::Task>::OPTIONS, expected);
    assert_eq!(entry("fixture.send_welcome").options, expected);

    assert_eq!(b::cleanup::OPTIONS, TaskOptions::DEFAULT);
    assert_eq!(
        b::checksum::OPTIONS,
        TaskOptions {
            backoff: Backoff::Fixed(Duration::from_secs(2)),
            delivery: DeliveryMode::AtMostOnce,
            rate_limit: Some(RateLimit {
                count: 20,
                per: Duration::from_secs(30),
            }),
            blocking: true,
            ..TaskOptions::DEFAULT
        }
    );
    let ping = entry("fixture_tasks::a::b::ping");
    assert_eq!(ping.options.backoff, Backoff::None);
    assert_eq!(ping.options.retries, 0);
}

#[test]
fn state_requirements_are_declared() {
    let e = entry("fixture.send_welcome");
    assert_eq!(e.states.len(), 1);
    assert_eq!((e.states[0].type_id)(), std::any::TypeId::of::<b::Mailer>());
    assert_eq!(e.states[0].type_name, "Mailer");
    assert!(entry("fixture_tasks::a::b::cleanup").states.is_empty());

    // A worker without the state is told which task needs what.
    let err = stem::registry::check_states([e], &stem::StateMap::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("fixture.send_welcome") && msg.contains("Mailer"),
        "{msg}"
    );
    let mut states = stem::StateMap::default();
    states.insert(b::Mailer {
        host: "smtp".into(),
    });
    stem::registry::check_states([e], &states).unwrap();
}

#[test]
fn args_are_a_json_object_with_named_fields_without_injected_params() {
    let args = b::send_welcome::Args {
        msg: b::Welcome {
            user_id: 7,
            locale: "fr".into(),
        },
        extra: [("k".to_owned(), "v".to_owned())].into(),
    };
    let json = serde_json::to_value(&args).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"msg": {"user_id": 7, "locale": "fr"}, "extra": {"k": "v"}})
    );
    let back: b::send_welcome::Args = serde_json::from_value(json).unwrap();
    assert_eq!(back.msg.user_id, 7);

    let local = serde_json::to_string(&local_task::Args {
        word: "ab".into(),
        times: 2,
    })
    .unwrap();
    assert_eq!(local, r#"{"word":"ab","times":2}"#);
    assert_eq!(
        serde_json::to_string(&fixture_tasks::a::b::cleanup::Args {
            older_than: Duration::from_secs(1)
        })
        .unwrap(),
        r#"{"older_than":{"secs":1,"nanos":0}}"#
    );
}

#[test]
fn a_signature_holds_the_envelope_a_worker_would_decode() {
    // Running the handler needs a Context (hence a broker); the worker
    // tests do that. Here: the envelope carries the name, queue and args.
    let signature = local_task::signature("x".into(), 3);
    let envelope = signature.into_envelope().expect("valid call");
    assert_eq!(envelope.name, "registry::local_task");
    assert_eq!(envelope.queue, "local");
    assert_eq!(envelope.args.get(), r#"{"word":"x","times":3}"#);
}

#[test]
fn signatures_carry_declared_and_per_call_options() {
    let env = b::send_welcome::signature(
        b::Welcome {
            user_id: 1,
            locale: "en".into(),
        },
        std::collections::BTreeMap::new(),
    )
    .into_envelope()
    .unwrap();
    assert_eq!(env.name, "fixture.send_welcome");
    assert_eq!(env.queue, "emails.high");
    assert_eq!(env.priority, 7);
    assert_eq!(env.max_retries, 5);

    let env = local_task::with()
        .queue("other")
        .priority(9)
        .retries(1)
        .header("trace", "abc")
        .signature("y".into(), 1)
        .into_envelope()
        .unwrap();
    assert_eq!(env.queue, "other");
    assert_eq!(env.priority, 9);
    assert_eq!(env.max_retries, 1);
    assert_eq!(env.headers.get("trace").map(String::as_str), Some("abc"));

    // An invalid per-call option is reported when the call is built.
    assert!(
        local_task::with()
            .queue("bad queue")
            .signature("z".into(), 1)
            .into_envelope()
            .is_err()
    );
}
